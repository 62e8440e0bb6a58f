"""Inference with the registered model: `cvpipe predict` and `cvpipe serve-model`.

They load ``models:/<name>@champion`` (:func:`load_registered`): a :mod:`cvpipe.model_flavor`
pyfunc (image files or arrays of any size in; top-k classes, logits and probabilities out, class
names in its card); predict prints the top-k classes of each image file. It loads only models whose
MLmodel runs nothing but the installed package: a version with code paths, a pickled python model
or a foreign loader module is refused unless the caller trusts the store (``trust_model_code``).
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
from flows.registry import CHAMPION

log = logging.getLogger(__name__)


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

    from cvpipe.model_flavor import check_model_dir
    from flows.tracking import configure, tracking_uri
    from tasks.export import UntrustedModel, read_card

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
    from tasks.inputs import InvalidInput

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
    from tasks.export import softmax

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
