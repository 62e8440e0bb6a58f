"""MLflow model registry: register the best evaluated model; `champion` only when it beats the current one.

What evaluate calls after scoring the modes; loading a registered version for inference is
:mod:`cvpipe.predict`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from cvpipe.params import Params

log = logging.getLogger(__name__)

CHAMPION = "champion"
# Tags predict and the champion comparison rely on; a version lacking one is repaired from its run.
REQUIRED_TAGS = ("classes", "test_acc")


def logged_model_name(mode: str) -> str:
    """The name the train flow logs a mode's model under (the UI lists each run's models by it)."""
    return f"model-{mode}"


def version_tags(test_acc: float, mode: str, backbone: str, dataset: str, classes: list[str]) -> dict[str, str]:
    """The tags of a registered version (all strings, as MLflow stores them)."""
    return {"test_acc": str(float(test_acc)), "mode": mode, "backbone": backbone, "dataset": dataset,
            "classes": json.dumps(classes)}


def register_best(p: Params, results: dict[str, dict[str, Any]], run_ids: dict[str, str]) -> dict[str, Any]:
    """Register the model with the highest test accuracy; move `champion` to it only if it is better.

    The version is created with its tags in one call, so a kill cannot leave it untagged; versions
    that an older cvpipe left without tags are repaired first (:func:`repair_version_tags`), so the
    comparison with the champion uses its real accuracy.

    Args:
        p: parameters (tracking store and registered model name).
        results: {mode: {"test_acc": float, ...}} from evaluate.
        run_ids: {mode: MLflow run id that logged that mode's model (:func:`logged_model_name`)}.

    Returns:
        {"name", "version", "mode", "test_acc", "champion": bool, "previous_champion_acc"}.

    Raises:
        ValueError: no evaluated mode has a run, or the best mode's run logged no model.
    """
    import mlflow

    from cvpipe.io import read_json
    from flows.tracking import configure, tracking_uri

    client, exp_id = configure(p)
    candidates = {m: r for m, r in results.items() if m in run_ids}
    if not candidates:
        raise ValueError("no evaluated model has an MLflow run to register")
    mode = max(candidates, key=lambda m: candidates[m]["test_acc"])
    acc = float(candidates[mode]["test_acc"])
    name = p.mlflow.registered_model
    repair_version_tags(p)
    classes = read_json(p.paths.processed / "card.json")["classes"]
    mv = mlflow.register_model(logged_model_uri(client, exp_id, run_ids[mode], mode), name,
                               tags=version_tags(acc, mode, p.train.backbone, p.data.dataset, classes))
    since, prev = _champion_acc(client, name)
    promote = prev is None or acc > prev
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
        if registry_shared(tracking_uri(p)):
            _settle_champion(client, name, since)
    return {"name": name, "version": int(mv.version), "mode": mode, "test_acc": acc,
            "champion": promote, "previous_champion_acc": prev}


def registry_shared(uri: str, root: Path | None = None) -> bool:
    """Whether another project's evaluate may move the champion while this one decides: always on a
    tracking server or a SQLite file outside the project (``root``, default: the working folder).

    A SQLite store inside the project is written by one command at a time (the project lock), so
    there is no race to settle and no reason to wait for one (:func:`_settle_champion`: 1.5 s).
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return True
    db = Path(uri[len(prefix):]).resolve()
    return not db.is_relative_to((root or Path.cwd()).resolve())


def _champion_acc(client, name: str) -> tuple[str | None, float | None]:
    """(version, test_acc) of the current champion; (None, None) when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    return str(current.version), float(current.tags.get("test_acc", "-inf"))


def _settle_champion(client, name: str, since: str | None, checks: int = 3, wait_s: float = 0.5) -> None:
    """Give ``champion`` to the best version from ``since`` on, unless a better one holds it.

    MLflow has no compare-and-set for aliases: two evaluates sharing a tracking server may both
    read the same champion (``since``; None: there was none) and both move the alias, the worse one
    last. Each evaluate therefore looks again a few times after its decision: among ``since`` and
    the versions registered after it, the best (the oldest on a tie) should hold the alias, and the
    alias only ever moves to a better version, so the evaluates converge on the same answer.
    """
    import time

    def acc_of(v) -> float:
        return float(v.tags.get("test_acc", "-inf"))

    for _ in range(checks):
        time.sleep(wait_s)
        current, current_acc = _champion_acc(client, name)
        versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        candidates = [v for v in versions if since is None or int(v.version) >= int(since)]
        if not candidates:
            return
        best = max(candidates, key=lambda v: (acc_of(v), -int(v.version)))
        if current is None or (str(best.version) != current and acc_of(best) > current_acc):
            client.set_registered_model_alias(name, CHAMPION, best.version)


def logged_model_uri(client, experiment_id: str, run_id: str, mode: str) -> str:
    """``models:/<model_id>`` of the newest model that run ``run_id`` logged for ``mode``.

    MLflow 3 keeps a logged model outside its run's artifacts: registering from it (rather than
    ``runs:/<id>/<name>``) is what MLflow 3 expects, without its warning about a missing artifact path.

    Raises:
        ValueError: the run logged no such model.
    """
    found = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{logged_model_name(mode)}'",
        order_by=[{"field_name": "creation_time", "ascending": False}], max_results=1)
    if not found:
        raise ValueError(f"MLflow run {run_id} logged no model named {logged_model_name(mode)!r}: "
                         f"run `cvpipe train --mode {mode}` again")
    return found[0].model_uri


def repair_version_tags(p: Params) -> list[int]:
    """Give each version of the registered model that lacks ``classes`` or ``test_acc`` what its run knows.

    Sources: the run's ``test_acc`` metric (logged by evaluate), its ``mode`` and ``backbone`` tags and
    ``data.dataset`` param, and the class names of the model's card (or of this project's dataset
    card when the run was trained on the same data). Versions whose run lacks a value keep that tag
    missing.

    Returns:
        The versions that were given at least one tag.
    """
    from mlflow.exceptions import MlflowException

    from flows.tracking import configure

    client, _ = configure(p)
    name = p.mlflow.registered_model
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    repaired = []
    for v in versions:
        if all(t in v.tags for t in REQUIRED_TAGS) or not v.run_id:
            continue
        try:
            run = client.get_run(v.run_id)
        except MlflowException:
            continue
        known = {"mode": run.data.tags.get("mode"), "backbone": run.data.tags.get("backbone"),
                 "dataset": run.data.params.get("data.dataset")}
        if "test_acc" in run.data.metrics:
            known["test_acc"] = str(run.data.metrics["test_acc"])
        classes = _version_classes(p, client, v, run)
        if classes is not None:
            known["classes"] = json.dumps(classes)
        missing = {k: val for k, val in known.items() if val is not None and k not in v.tags}
        for k, val in missing.items():
            client.set_model_version_tag(name, v.version, k, val)
        if missing:
            log.warning("registry: %s v%s lacked tags %s; restored from run %s",
                        name, v.version, sorted(missing), v.run_id)
            repaired.append(int(v.version))
    return repaired


def logged_model_id(version) -> str | None:
    """The MLflow 3 logged model behind a registered version (``models:/<id>`` source), if any."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/").split("/")[0] if source.startswith("models:/") else None


def _version_classes(p: Params, client, version, run) -> list[str] | None:
    """Class names of a registered version: its model card, else this project's data when the run used it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from cvpipe.io import read_json
    from cvpipe.layout import CLASSIFIER_CARD as CARD
    from cvpipe.model_flavor import DATA_DIR
    from tasks.export import UntrustedModel, read_card

    with tempfile.TemporaryDirectory(prefix="cvpipe-card-") as tmp:
        try:
            location = client.get_logged_model(logged_model_id(version)).artifact_location
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/data/{DATA_DIR}/{CARD}", dst_path=tmp)
            return read_card(Path(path).parent)["classes"]
        except (MlflowException, OSError, UntrustedModel, AttributeError, TypeError):
            pass  # an older model without a card, or a version without a logged model
    card_path = p.paths.processed / "card.json"
    if card_path.is_file():
        card = read_json(card_path)
        if card.get("data_hash") and card.get("data_hash") == run.data.tags.get("data_hash"):
            return card["classes"]
    return None
