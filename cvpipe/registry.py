"""MLflow model registry: register the best evaluated model; `champion` only when it beats the current one.

`cvpipe predict` and `cvpipe serve-model` load ``models:/<name>@champion`` (:func:`load_registered`):
a :mod:`cvpipe.model_flavor` pyfunc (image files or arrays of any size in; top-k classes,
logits and probabilities out, class names in its card); predict prints the top-k classes of each
image file. It loads only models whose MLmodel runs nothing but the installed package: a
version with code paths, a pickled python model or a foreign loader module is refused unless the
caller trusts the store (``trust_model_code``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
    from cvpipe.tracking import configure

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
        _settle_champion(client, name, since)
    return {"name": name, "version": int(mv.version), "mode": mode, "test_acc": acc,
            "champion": promote, "previous_champion_acc": prev}


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

    from cvpipe.tracking import configure

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
    from cvpipe.model_flavor import CARD, DATA_DIR, UntrustedModel, read_card

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


# --------------------------------------------------------------------------- predict


@dataclass
class LoadedModel:
    """A registered version loaded for inference (see :func:`load_registered`)."""

    model: Any                     # mlflow.pyfunc.PyFuncModel
    card: dict[str, Any] | None    # the cvpipe card; None for a trusted model of another flavour
    name: str
    alias: str
    version: Any                   # mlflow.entities.model_registry.ModelVersion

    @property
    def classes(self) -> list[str] | None:
        if self.card is not None:
            return list(self.card["classes"])
        return json.loads(self.version.tags["classes"]) if "classes" in self.version.tags else None

    def describe(self, max_classes: int = 20) -> str:
        """One line: which version this is, what it was trained on, and the classes it knows."""
        tags = self.version.tags
        made = ", ".join(tags[t] for t in ("mode", "backbone") if tags.get(t))
        acc = f", test accuracy {float(tags['test_acc']):.3f}" if tags.get("test_acc") else ""
        classes = self.classes or []
        shown = ", ".join(classes[:max_classes])
        if len(classes) > max_classes:
            shown += f", ... ({len(classes)} in all)"
        return (f"model: models:/{self.name}@{self.alias} = version {self.version.version}"
                f"{f' ({made})' if made else ''}, trained on {tags.get('dataset', 'unknown data')}{acc}; "
                f"{len(classes)} classes: {shown}")


def load_registered(p: Params, alias: str = CHAMPION, trust_model_code: bool = False) -> LoadedModel:
    """Load ``models:/<registered_model>@<alias>`` for inference: what predict and serve-model use.

    The version is downloaded, its MLmodel checked (:func:`cvpipe.model_flavor.check_model_dir`)
    and only then loaded through ``mlflow.pyfunc`` from the checked copy.

    Args:
        p: parameters (tracking store and registered model name).
        alias: the registered model's alias.
        trust_model_code: load a model even when loading it runs code or unpickles objects from the
            tracking store (models logged by other tools or older cvpipe versions).

    Raises:
        UntrustedModel: the version would run code from the store and ``trust_model_code`` is False,
            or its data are malformed.
        MlflowException: no such registered model or alias.
    """
    import mlflow.artifacts
    import mlflow.pyfunc

    from cvpipe.model_flavor import UntrustedModel, check_model_dir, read_card
    from cvpipe.tracking import configure, tracking_uri

    client, _ = configure(p)
    name = p.mlflow.registered_model
    version = client.get_model_version_by_alias(name, alias)
    where = f"models:/{name}@{alias} (version {version.version})"
    with tempfile.TemporaryDirectory(prefix="cvpipe-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                         dst_path=tmp))
        try:
            card = read_card(check_model_dir(local))
        except UntrustedModel as err:
            if not trust_model_code:
                raise UntrustedModel(
                    f"refusing to load {where}: {err}. Register a model made by this cvpipe (cvpipe train, "
                    f"then evaluate), or pass --trust-model-code if you trust everyone who can write to "
                    f"{tracking_uri(p)}") from None
            log.warning("loading %s although %s (trust_model_code)", where, err)
            card = None
        # A cvpipe model is data rebuilt by the installed package: MLflow's comparison of its pinned
        # requirements with the installed ones (1-2 s of package metadata scans) tells nothing.
        model = mlflow.pyfunc.load_model(str(local), suppress_warnings=card is not None)
    return LoadedModel(model, card, name, alias, version)


def classify(loaded: LoadedModel, paths: list[Path], k: int = 3) -> list[dict[str, Any]]:
    """Classify image files with a loaded model; a file that is not a readable image is its own error.

    A cvpipe model is given each file's bytes, as the model server is: it decodes them with the
    project's image reader (pixel limit included), converts and resizes them as training did.

    Returns:
        One {"path", "version", "top": [(class, probability), ...]} or {"path", "version", "error"}
        per file, in order.
    """
    from cvpipe.model_flavor import InvalidInput

    results = []
    for path in paths:
        row: dict[str, Any] = {"path": str(path), "version": int(loaded.version.version)}
        try:
            if loaded.card is not None:
                out = loaded.model.predict(Path(path).read_bytes(), params={"k": k})
                row["top"] = [(t["label"], t["probability"]) for t in out["top_k"][0]]
            else:
                prob = _foreign_predict(loaded.model, [Path(path)])[0]
                names = loaded.classes
                names = names if names is not None and len(names) == len(prob) else [str(i) for i in range(len(prob))]
                row["top"] = top_k(prob, names, k)
        except InvalidInput as err:
            row["error"] = str(err).removeprefix("image 0: ")
        except (OSError, ValueError) as err:
            row["error"] = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        results.append(row)
    return results


def image_batch(paths: list[Path], channels: int = 3, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Each image as uint8 (1, C, H, W); C=1 for ``channels`` 1 (grey), else RGB.

    ``size`` (H, W), when given, resizes (OpenCV's area interpolation); a cvpipe model needs
    neither: it brings any image to its training size and channels itself.
    """
    import cv2

    from tasks.images import read_image

    out = []
    for path in paths:
        rgb = read_image(path)
        if size is not None and rgb.shape[:2] != size:
            rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        if channels == 1:
            out.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[None, None])
        else:
            out.append(rgb.transpose(2, 0, 1)[None])
    return out


def top_k(probabilities: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable classes, most probable first."""
    idx = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[i], float(probabilities[i])) for i in idx]


def predict(p: Params, paths: list[Path], k: int = 3, alias: str = CHAMPION,
            trust_model_code: bool = False) -> list[dict[str, Any]]:
    """Classify image files with ``models:/<registered_model>@<alias>``: :func:`load_registered`,
    then :func:`classify` (see both for arguments, results and errors)."""
    return classify(load_registered(p, alias, trust_model_code), paths, k)


def _foreign_predict(model, paths: list[Path]) -> list[np.ndarray]:
    """Probabilities from a trusted model of another flavour (uint8 images at its signature's size in,
    logits or a {"probabilities"} mapping out)."""
    from cvpipe.model_flavor import softmax

    channels, size = _input_shape(model.metadata.signature)
    out = []
    for x in image_batch(paths, channels, size):
        y = model.predict(x)
        if isinstance(y, dict) and "probabilities" in y:
            out.append(np.asarray(y["probabilities"], dtype=np.float32)[0])
        else:
            logits = np.asarray(y["logits"] if isinstance(y, dict) else y, dtype=np.float32).reshape(1, -1)
            out.append(softmax(logits)[0])
    return out


def _input_shape(sig) -> tuple[int, tuple[int, int] | None]:
    """Channels and fixed (H, W) of a model's input, from its signature (None: any size)."""
    try:
        shape = sig.inputs.inputs[0].shape
    except (AttributeError, IndexError, TypeError):
        shape = (-1, 3, -1, -1)
    if len(shape) != 4:
        shape = (-1, 3, -1, -1)
    channels = int(shape[1]) if shape[1] in (1, 3) else 3
    size = (int(shape[2]), int(shape[3])) if shape[2] > 0 and shape[3] > 0 else None
    return channels, size
