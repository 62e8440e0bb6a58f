"""MLflow at the edge: one experiment, one run per stage execution, tagged with the stage name.

Stage code never imports MLflow; flows open a run here and log what the pure
functions return. Everything goes through an explicit run id (MlflowClient), so
logging is safe from Prefect's worker threads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cvpipe.params import Params

# DVC sets these while `dvc exp run` executes a stage; recording them lets both tools name the same run.
DVC_ENV_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev", "DVC_ROOT": "dvc.root"}


def tracking_uri(p: Params) -> str:
    """The tracking URI, with a relative sqlite path made absolute against the working directory."""
    uri = p.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        db = Path(uri[len(prefix):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"{prefix}{db}"
    return uri


def configure(p: Params):
    """Point MLflow at the project's store and return (client, experiment_id).

    Creating a new sqlite store runs MLflow's migrations, which race when two processes
    start at once; a file lock next to the database makes them take turns.
    """
    import mlflow
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(p)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    lock = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        lock = FileLock(uri[len("sqlite:///"):] + ".lock", timeout=600)
    with lock:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # opens the store: creates/migrates its tables
        exp = client.get_experiment_by_name(p.mlflow.experiment)
        if exp is not None:
            return client, exp.experiment_id
        loc = p.mlflow.artifact_location
        if "://" not in loc:
            Path(loc).mkdir(parents=True, exist_ok=True)
            loc = Path(loc).resolve().as_uri()
        return client, client.create_experiment(p.mlflow.experiment, artifact_location=loc)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageRun:
    """An open MLflow run for one stage execution."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)


@contextlib.contextmanager
def stage_run(p: Params, stage: str, run_name: str | None = None,
              tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """Open an MLflow run tagged ``stage=<stage>``; it ends FINISHED, or FAILED on an exception.

    The run records the stage's params section plus the shared sections.
    """
    client, exp_id = configure(p)
    all_tags = {"stage": stage, "mlflow.runName": run_name or stage}
    all_tags.update({t: os.environ[e] for e, t in DVC_ENV_TAGS.items() if os.environ.get(e)})
    all_tags.update(tags or {})
    run = client.create_run(exp_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name or stage)
    sr = StageRun(client, run.info.run_id)
    data = p.model_dump(mode="json")
    sr.log_params({k: data[k] for k in ("seed", "device", "data", stage) if k in data})
    try:
        yield sr
    except BaseException:
        client.set_terminated(sr.run_id, "FAILED")
        raise
    client.set_terminated(sr.run_id, "FINISHED")
