"""Prefect flow for the ``detect`` stage: shards mapped over a configurable task runner.

The stage's three steps, ``plan`` and ``collect`` (:mod:`tasks.detect`) and ``detect_shard``
(:mod:`tasks.detect_shard`), become Prefect tasks here; the work itself stays in ``tasks/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from cvpipe.layout import DETECT_METRICS, DETECT_SUMMARY, FAILURES
from cvpipe.params import DetectParams, Params, load_params
from flows import subflows
from flows.tracking import flatten, stage_run
from tasks.detect import collect, plan
from tasks.detect_shard import ShardResult, detect_shard
from tasks.detect_staging import staged_outputs

plan_task = task(plan, name="detect-plan", cache_policy=NO_CACHE)
detect_shard_task = task(detect_shard, name="detect-shard", cache_policy=NO_CACHE)
collect_task = task(collect, name="detect-collect", cache_policy=NO_CACHE)


def task_runner(dp: DetectParams) -> TaskRunner:
    """Threads by default; with ``task_runner: dask``, the scheduler at ``dask_address`` or a
    temporary local cluster of ``workers`` single-threaded processes."""
    if dp.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=dp.workers)
    from prefect_dask import DaskTaskRunner

    if dp.dask_address:
        return DaskTaskRunner(address=dp.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": dp.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def network_threads(dp: DetectParams) -> int | None:
    """Cores each shard's network may use. Shards on threads share one process and take turns at
    one network that uses every core (None: the library's default). A local Dask cluster runs
    ``workers`` processes side by side on this machine, so each gets its share of the cores; on
    a remote cluster the workers' own defaults stay."""
    if dp.task_runner == "dask" and not dp.dask_address:
        return max(1, (os.cpu_count() or 1) // dp.workers)
    return None


@flow(name="detect-shards", flow_run_name="detect-shards")
def detect_shards(p: Params, staging: Path) -> list[ShardResult]:
    """List and shard the inputs and create ``staging``, then run one ``detect-shard`` task per
    shard on this flow's task runner, annotated images going to ``staging`` (the shards stay
    out of the flow's parameters, which the Prefect API stores)."""
    shards, images_dir = plan_task(p, staging)
    futures = detect_shard_task.map(shards, detector_dir=unmapped(p.paths.detector.resolve()),
                                    dp=unmapped(p.detect), images_dir=unmapped(images_dir),
                                    shard=range(len(shards)), of=unmapped(len(shards)),
                                    device=unmapped(p.device), threads=unmapped(network_threads(p.detect)))
    return futures.result()


@flow(name="detect", flow_run_name="detect", log_prints=True)
def detect_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None,
                input: str | None = None) -> dict:
    """Detect objects in every input image with YOLOv3; ``input`` overrides ``detect.input``.

    The outputs are written into a staging folder and replace ``paths.detect`` as one set
    once all are written; a failure leaves the previous set as it was.
    """
    overrides = {**(overrides or {}), **({"detect.input": input} if input is not None else {})}
    p = load_params(params_file, overrides)
    with stage_run(p, "detect") as run:
        with staged_outputs(p.paths.detect) as staging:
            with subflows():
                results = detect_shards.with_options(task_runner=task_runner(p.detect))(p, staging)
            summary = collect_task(p, results, staging)
        run.log_metrics({k: v for k, v in flatten(summary).items() if isinstance(v, (int, float))})
        run.log_artifact(p.paths.detect / DETECT_METRICS)
        run.log_artifact(p.paths.detect / DETECT_SUMMARY)
        run.log_artifact(p.paths.detect / FAILURES)
    print(f"detect: {summary['images']} images, {summary['detections']} detections, "
          f"{summary['failures']} failures, {summary['images_per_s']} images/s")
    return summary
