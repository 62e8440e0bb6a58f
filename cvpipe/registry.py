"""MLflow model registry: register the best evaluated model; `champion` only when it beats the current one.

`cvpipe predict` loads ``models:/<name>@champion``: a :mod:`cvpipe.model_flavor` pyfunc (images of
any size in, logits and probabilities out, class names in its card) and prints the top-k classes
of each image. It loads only models whose MLmodel runs nothing but the installed package: a
version with code paths, a pickled python model or a foreign loader module is refused unless the
caller trusts the store (``trust_model_code``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cvpipe.params import Params

log = logging.getLogger(__name__)

CHAMPION = "champion"
# Tags predict and the champion comparison rely on; a version lacking one is repaired from its run.
REQUIRED_TAGS = ("classes", "test_acc")


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
        run_ids: {mode: MLflow run id that logged that mode's model as ``model``}.

    Returns:
        {"name", "version", "mode", "test_acc", "champion": bool, "previous_champion_acc"}.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from cvpipe.io import read_json
    from cvpipe.tracking import configure

    client, _ = configure(p)
    candidates = {m: r for m, r in results.items() if m in run_ids}
    if not candidates:
        raise ValueError("no evaluated model has an MLflow run to register")
    mode = max(candidates, key=lambda m: candidates[m]["test_acc"])
    acc = float(candidates[mode]["test_acc"])
    name = p.mlflow.registered_model
    repair_version_tags(p)
    classes = read_json(p.paths.processed / "card.json")["classes"]
    mv = mlflow.register_model(f"runs:/{run_ids[mode]}/model", name,
                               tags=version_tags(acc, mode, p.train.backbone, p.data.dataset, classes))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        prev = float(current.tags.get("test_acc", "-inf"))
    except MlflowException:
        current, prev = None, None
    promote = prev is None or acc > prev
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return {"name": name, "version": int(mv.version), "mode": mode, "test_acc": acc,
            "champion": promote, "previous_champion_acc": prev}


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


def image_batch(paths: list[Path], channels: int = 3, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Each image as uint8 (1, C, H, W); C=1 for ``channels`` 1 (grey), else RGB.

    ``size`` (H, W), when given, resizes (OpenCV's area interpolation); a cvpipe model needs
    neither: it brings any image to its training size and channels itself.
    """
    import cv2

    from tasks.preprocess import read_image

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
    """Classify images with ``models:/<registered_model>@<alias>``.

    The model is downloaded, its MLmodel checked (:func:`cvpipe.model_flavor.check_model_dir`) and
    only then loaded through ``mlflow.pyfunc``.

    Args:
        p: parameters (tracking store and registered model name).
        paths: image files.
        k: classes reported per image.
        alias: the registered model's alias.
        trust_model_code: load a model even when loading it runs code or unpickles objects from the
            tracking store (models logged by other tools or older cvpipe versions).

    Returns:
        One {"path", "top": [(class, probability), ...], "version"} per image.

    Raises:
        UntrustedModel: the version would run code from the store and ``trust_model_code`` is False,
            or its data are malformed.
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
        model = mlflow.pyfunc.load_model(str(local))
    if card is not None:
        classes = card["classes"]
        probs = [model.predict(x)["probabilities"][0] for x in image_batch(paths)]
    else:
        probs = _foreign_predict(model, paths)
        classes = json.loads(version.tags["classes"]) if "classes" in version.tags else None
    results = []
    for path, prob in zip(paths, probs):
        names = classes if classes is not None and len(classes) == len(prob) else [str(i) for i in range(len(prob))]
        results.append({"path": str(path), "top": top_k(prob, names, k), "version": int(version.version)})
    return results


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
