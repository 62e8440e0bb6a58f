"""Prefect flow for the ``evaluate`` stage: results are logged into each model's own MLflow run."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from cvpipe.layout import (
    ACCURACY_PLOT,
    CONFUSION_COUNTS,
    EVAL_METRICS,
    PER_CLASS,
    confusion_plot,
)
from cvpipe.params import Params, load_params
from flows.registry import register_best
from flows.run_tags import reap_stale_runs
from flows.tracking import StageRun, configure, stage_run
from tasks.evaluate import evaluate, model_run_id

log = logging.getLogger(__name__)

evaluate_task = task(evaluate, name="evaluate", cache_policy=NO_CACHE)


@contextlib.contextmanager
def model_run(p: Params, mode: str) -> Iterator[StageRun]:
    """The MLflow run that trained ``mode``; a new ``evaluate-<mode>`` run (with a warning) when it is unknown."""
    from mlflow.exceptions import MlflowException

    client, _ = configure(p)
    run_id = model_run_id(p, mode)
    found = False
    if run_id is not None:
        try:
            found = client.get_run(run_id) is not None
        except MlflowException:
            found = False
    if found:
        yield StageRun(client, run_id)
        return
    log.warning("evaluate %s: the model's MLflow run (%s) is not in %s; logging to a new run",
                mode, run_id, p.mlflow.tracking_uri)
    with stage_run(p, "evaluate", run_name=f"evaluate-{mode}", tags={"mode": mode}) as run:
        yield run


@flow(name="evaluate", flow_run_name="evaluate", log_prints=True)
def evaluate_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """Evaluate every mode of ``train.modes`` that has a trained model; returns {mode: test metrics}."""
    p = load_params(params_file, overrides)
    reap_stale_runs(*configure(p))  # evaluate logs into the train runs: mark those of killed processes first
    metrics = evaluate_task(p)
    out = p.paths.evaluate
    run_ids = {}
    for mode, m in metrics.items():
        with model_run(p, mode) as run:
            run_ids[mode] = run.run_id
            # Headline metrics only: per-class accuracy is the per_class.json artifact (as metrics, one
            # bar chart per class would bury the training curves on the run page).
            run.log_metrics({"test_acc": m["test_acc"], "test_loss": m["test_loss"]})
            run.set_tags({"evaluated": "true"})
            run.log_artifact(out / confusion_plot(mode), "evaluate/confusion")
            for name in (CONFUSION_COUNTS, ACCURACY_PLOT, EVAL_METRICS, PER_CLASS):
                run.log_artifact(out / name, "evaluate")
    trained = {m: r for m, r in run_ids.items() if r == model_run_id(p, m)}
    if trained:
        reg = register_best(p, metrics, trained)
        verdict = "now champion" if reg["champion"] else f"champion stays ({reg['previous_champion_acc']:.4f})"
        print(f"registered {reg['name']} v{reg['version']} ({reg['mode']}, test_acc {reg['test_acc']:.4f}): {verdict}")
    return metrics
