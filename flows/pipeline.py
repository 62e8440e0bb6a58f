"""The whole DAG as one Prefect flow, in agreement with DVC about what is stale.

    download -> preprocess -> train@feature_extractor ─┐
                           -> train@fine_tune ─────────┴-> evaluate
    download -> detect

Independent branches run concurrently: detect beside training, the two training modes
side by side on a GPU (on a CPU their training takes turns: :func:`flows.train.training_slot`).
A stage that DVC reports up to date is skipped; after a stage runs, dvc.lock is updated
(beside the next stages; the run ends once every entry is written).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from cvpipe.lock import ProjectLock
from cvpipe.params import load_params
from flows import stage_flow, subflows
from flows.dvc_sync import DvcSync, wait_commits, wait_for_commits


def upstream_stages(modes) -> dict[str, tuple[str, ...]]:
    """Each stage of the DAG (upstream first) and the stages whose outputs it reads (dvc.yaml's edges)."""
    trains = tuple(f"train@{mode}" for mode in modes)
    return {"download": (), "preprocess": ("download",), **{t: ("preprocess", "download") for t in trains},
            "detect": ("download",), "evaluate": (*trains, "preprocess")}


@task(name="stage", task_run_name="{stage}")
def run_stage(stage: str, params_file: str, force: bool, upstream: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one DVC stage through its Prefect flow unless DVC says it is up to date; then commit it (in
    the background: :meth:`flows.dvc_sync.DvcSync.commit_soon`). Where those commits relink the
    outputs in the workspace, it starts once the ``upstream`` stages' commits are done."""
    wait_for_commits(upstream)
    sync = DvcSync()
    if not force and not sync.stale(stage):  # forced stages run whatever DVC would say
        print(f"{stage}: up to date (dvc status), skipped")
        return {"stage": stage, "status": "skipped", "seconds": 0.0}
    fn, kwargs = stage_flow(stage)
    t0 = time.perf_counter()
    with subflows():
        result = fn(params_file=params_file, **kwargs)
    seconds = time.perf_counter() - t0
    sync.commit_soon(stage)  # dvc.lock, while the next stages start (the pipeline waits for it at its end)
    return {"stage": stage, "status": "ran", "seconds": round(seconds, 1), "result": result}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def headline(row: dict[str, Any]) -> str:
    """A stage's headline figures from its result, for the summary artifact and the CLI's table.

    evaluate: test accuracy per mode (its result is nested, {mode: {test_acc, ...}}); detect:
    images, detections, failures and images/s; train: best validation accuracy, epochs, images/s;
    preprocess: split sizes; download: what it provided. Empty for a stage that did not run.
    """
    res = row.get("result")
    if not isinstance(res, dict) or not res:
        return ""
    stage = str(row.get("stage", "")).partition("@")[0]
    if stage == "evaluate":
        accs = {m: v["test_acc"] for m, v in res.items() if isinstance(v, dict) and "test_acc" in v}
        return ", ".join(f"test_acc[{m}]={_fmt(a)}" for m, a in accs.items())
    keys = {"detect": ("images", "detections", "failures", "images_per_s"),
            "train": ("best_val_acc", "epochs", "images_per_s"),
            "preprocess": ("dataset",),
            "download": ("detector", "samples")}.get(stage)
    if keys is None:
        keys = tuple(k for k, v in res.items() if isinstance(v, (int, float, str)) and len(str(v)) < 60)[:6]
    shown = [f"{k}={_fmt(res[k])}" for k in keys if k in res]
    if stage == "preprocess" and isinstance(res.get("counts"), dict):
        shown.append("/".join(f"{k} {v}" for k, v in res["counts"].items()))
    return ", ".join(shown)


def _summary_markdown(rows: list[dict], total: float) -> str:
    lines = ["# Pipeline run", "", "| stage | status | seconds | headline |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {headline(r)} |")
    lines += ["", f"Total wall time: {total:.1f} s"]
    return "\n".join(lines)


@flow(name="pipeline", flow_run_name="pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=4))
def pipeline_flow(params_file: str = "params.yaml", force: bool = False) -> list[dict]:
    """Run the whole DAG; stages that DVC reports up to date are skipped unless ``force``.

    Returns:
        One row per stage: stage, status (ran | skipped), seconds, and the stage's result.

    Raises:
        The first failing stage's own exception (downstream stages do not run).
    """
    # A scheduled run (`cvpipe serve`) runs in a process of Prefect's: it takes the project lock
    # here; under `cvpipe run`, this process holds it already and taking it again only counts up.
    with ProjectLock(Path.cwd()):
        return _run_pipeline(params_file, force)


def _run_pipeline(params_file: str, force: bool) -> list[dict]:
    p = load_params(params_file)
    t0 = time.perf_counter()

    futures: dict[str, Any] = {}
    for stage, after in upstream_stages(p.train.modes).items():  # in an order where upstream comes first
        futures[stage] = run_stage.submit(stage, params_file, force, after, wait_for=[futures[s] for s in after])
    order = list(futures.items())

    rows, first_error = [], None
    for stage, fut in order:
        fut.wait()
        state = fut.state
        if state.is_completed():
            rows.append(fut.result())
        else:
            rows.append({"stage": stage, "status": state.name.lower(), "seconds": 0.0})
            if first_error is None and state.is_failed():
                try:
                    fut.result()
                except BaseException as err:  # the stage's own exception
                    first_error = err
    for stage, err in wait_commits():  # every stage's dvc.lock entry is written before the run ends
        print(f"{stage} ran, but DVC could not record it in dvc.lock: {err}")
        first_error = first_error or err
    total = time.perf_counter() - t0
    create_markdown_artifact(_summary_markdown(rows, total), key="pipeline-summary",
                             description="Stages, wall time and key results of this pipeline run")
    if first_error is not None:
        raise first_error
    return rows


def pipeline_deployment(name: str, cron: str, params_file: str = "params.yaml", timezone: str | None = None):
    """A deployment of :func:`pipeline_flow` on a cron schedule (what `cvpipe serve` serves)."""
    from prefect.schedules import Cron

    schedule = Cron(cron, timezone=timezone) if timezone else Cron(cron)
    return pipeline_flow.to_deployment(
        name=name,
        schedules=[schedule],
        parameters={"params_file": params_file, "force": False},
        description="The cvpipe DAG; stages DVC reports up to date are skipped.",
        tags=["cvpipe"],
    )
