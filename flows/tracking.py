"""MLflow at the edge: one experiment, one run per stage execution, tagged with the stage name.

Stage code never imports MLflow; flows open a run here and log what the pure
functions return. Everything goes through an explicit run id (MlflowClient), so
logging is safe from Prefect's worker threads.

Failure modes handled here: a tracking server that does not answer is one clear error
within seconds (:func:`check_tracking`), not MLflow's twenty minutes of retries; runs left
RUNNING by a killed process are marked KILLED when the next stage starts (each run is
tagged with its owner's host and pid: :mod:`flows.run_tags`); and a project never writes its artifacts into
the folder of another clone that shares its tracking store.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from cvpipe import mlflow_db
from cvpipe.errors import UserError
from cvpipe.params import Params
from flows.run_tags import (
    current_extra_tags,
    dvc_tags,
    owner_tags,
    reap_stale_runs,
    source_tags,
)

# MLflow's HTTP defaults (7 retries with backoff, 120 s timeouts) turn an unreachable server into a
# twenty-minute hang; these apply unless the user set the variables.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
REACHABILITY_TIMEOUT_S = 5.0


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking store cannot be used as configured; the message says what to do."""


class TrackingUnreachable(TrackingError):
    """The tracking server does not answer."""


class ArtifactLocationConflict(TrackingError):
    """The experiment stores its artifacts somewhere else than this project's ``mlflow.artifact_location``."""


def tracking_uri(p: Params) -> str:
    """The tracking URI, with a relative sqlite path made absolute against the working directory."""
    uri = p.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        db = Path(uri[len(prefix):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"{prefix}{db}"
    return uri


def limit_http_retries() -> None:
    """Short HTTP timeouts and few retries for MLflow in this process, unless the user chose them."""
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)


_reachable: set[str] = set()


def check_tracking(p: Params, timeout: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail fast when ``mlflow.tracking_uri`` is a server that does not answer (local stores pass).

    Asks ``<uri>/health``; when that is not 200, the REST API (any answer below 500, such as 401
    from a server that needs credentials, counts as reachable). A server found once is not asked again.

    Raises:
        TrackingUnreachable: no answer within ``timeout`` seconds, or not an MLflow server.
    """
    limit_http_retries()
    uri = tracking_uri(p)
    if not uri.startswith(("http://", "https://")) or uri in _reachable:
        return
    base = uri.rstrip("/")
    try:
        status = _http_status(f"{base}/health", timeout)
        if status != 200:
            status = _http_status(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout)
        if status < 500 and status != 404:
            _reachable.add(uri)
            return
        reason = f"it answers HTTP {status} on /health and on the REST API: not an MLflow tracking server?"
    except (OSError, ValueError) as err:  # URLError, timeouts and refused connections are OSErrors
        if isinstance(getattr(err, "reason", err), ssl.SSLError):
            return  # it answered; MLflow applies its own TLS settings (MLFLOW_TRACKING_INSECURE_TLS, ...)
        reason = _reason(err)
    raise TrackingUnreachable(f"MLflow tracking server {uri} is not reachable ({reason}); "
                              "start it or fix mlflow.tracking_uri")


def _http_status(url: str, timeout: float) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _reason(err: BaseException) -> str:
    inner = getattr(err, "reason", None)
    if isinstance(inner, BaseException):
        err = inner
    if isinstance(err, TimeoutError):
        return "no answer within the timeout"
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(text).splitlines()[0][:200]


def _local_path(location: str) -> Path | None:
    """The folder of a local artifact location (a plain path or ``file://``); None for remote ones."""
    parsed = urlparse(location)
    if not parsed.scheme:
        return Path(location).resolve()
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path)).resolve()
    return None


def check_artifact_location(p: Params, experiment_location: str) -> None:
    """Refuse an existing experiment whose artifacts live in another local folder than this project's.

    Two clones sharing one tracking store (an absolute sqlite path) and one experiment name would
    otherwise write every model of the second clone into the first clone's folder.

    Raises:
        ArtifactLocationConflict: naming both folders and the remedies.
    """
    ours, theirs = _local_path(p.mlflow.artifact_location), _local_path(experiment_location)
    if ours is None or theirs is None or ours == theirs:
        return
    raise ArtifactLocationConflict(
        f"MLflow experiment {p.mlflow.experiment!r} in {tracking_uri(p)} keeps its artifacts in {theirs}, "
        f"but this project's mlflow.artifact_location is {ours}: its models would be stored in another "
        "project's folder. Give this project its own experiment (--set mlflow.experiment=<name>, or in "
        "params.yaml), or track through an MLflow server with proxied artifacts (mlflow server "
        "--artifacts-destination ...), or point mlflow.artifact_location at the experiment's folder "
        "if it is really this project's.")


def configure(p: Params):
    """Point MLflow at the project's store and return (client, experiment_id).

    A new sqlite store starts as a copy of the packaged migrated one (:mod:`cvpipe.mlflow_db`), or
    else MLflow runs its migrations; either races when two processes start at once: a file lock next
    to the database makes them take turns.

    Raises:
        TrackingUnreachable: the tracking server does not answer (within seconds).
        ArtifactLocationConflict: the experiment stores its artifacts in another project's folder.
    """
    check_tracking(p)
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
        mlflow_db.seed(uri)  # a new SQLite store starts as the packaged migrated one (cvpipe/mlflow_db.py)
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # opens the store: creates/migrates its tables
        exp = client.get_experiment_by_name(p.mlflow.experiment)
        if exp is not None:
            check_artifact_location(p, exp.artifact_location)
            return client, exp.experiment_id
        loc = p.mlflow.artifact_location
        if uri.startswith(("http://", "https://")):
            # A tracking server keeps the artifacts (`mlflow server --serve-artifacts`): every clone
            # reads and writes them through it, so none is stored in one clone's folder.
            loc = None
        elif "://" not in loc:
            Path(loc).mkdir(parents=True, exist_ok=True)
            loc = Path(loc).resolve().as_uri()
        from mlflow.exceptions import MlflowException

        try:
            return client, client.create_experiment(p.mlflow.experiment, artifact_location=loc)
        except MlflowException as err:  # another clone created it on the server in the meantime
            exp = client.get_experiment_by_name(p.mlflow.experiment)
            if exp is None or err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client, exp.experiment_id


def ui_runs_url(p: Params, base: str) -> str:
    """Where MLflow 3's UI at ``base`` shows the training runs of the project's experiment.

    The UI's default for an experiment is the GenAI overview (traces); the ``/runs`` page with
    ``workflowType=machine_learning`` is the runs table, in the UI's model-training mode (which the
    UI then remembers). Falls back to the list of experiments when the experiment does not exist yet.
    """
    from mlflow.tracking import MlflowClient

    base = base.rstrip("/")
    exp = MlflowClient(tracking_uri(p)).get_experiment_by_name(p.mlflow.experiment)
    page = f"experiments/{exp.experiment_id}/runs" if exp is not None else "experiments"
    return f"{base}/#/{page}?workflowType=machine_learning"


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

    The run records the stage's params section plus the shared sections, and its owner
    (:func:`owner_tags`); runs that killed processes left RUNNING are marked KILLED first.
    """
    client, exp_id = configure(p)
    reap_stale_runs(client, exp_id)
    all_tags = {"stage": stage, "mlflow.runName": run_name or stage, **source_tags(stage), **owner_tags()}
    all_tags.update(dvc_tags())
    all_tags.update(current_extra_tags())
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
