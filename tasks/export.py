"""The exported classifier: a trained model as data, ``classifier.json`` and ``weights.npz``.

The card (``classifier.json``) holds the class names, the channels and size of the images the
network was trained on, its input size, mean/std and interpolation; ``weights.npz`` holds the
network's tensors as plain numpy arrays, read with pickle disabled. The architecture is rebuilt
from the installed :mod:`tasks.backbones` and inputs are preprocessed with the functions training
uses, so loading an exported model never runs code, and never unpickles objects, that its folder
holds. MLflow logs this folder as a registered model's data; its pyfunc loader reads it back with
:func:`load_classifier_data`.

:class:`Classifier` is the loaded model: :meth:`Classifier.predict` takes what a client has
(:func:`tasks.inputs.images_from_input`) and returns, per image, the most probable class and its
probability, the top ``k`` classes (default :data:`TOP_K`), and the logits and probabilities
(float32, class order of the card).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cvpipe.backbones import BACKBONES
from cvpipe.errors import UserError
from cvpipe.io import load_npz, save_npz, write_json
from cvpipe.layout import CLASSIFIER_CARD, CLASSIFIER_WEIGHTS, MODEL
from cvpipe.params import Params
from tasks.inputs import InvalidInput, images_from_input

FORMAT = 1
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_BATCH = 32  # images per forward pass: bounds memory for large batches at large network sizes
TOP_K = 3  # classes reported per image unless the caller passes the param ``k``


class UntrustedModel(UserError, RuntimeError):
    """A stored model would run code from its store when loaded, or is malformed."""


# --------------------------------------------------------------------------- the card


def make_card(*, backbone: str, mode: str, classes: list[str], channels: int, input_size: tuple[int, int],
              image_size: int, mean: list[float], std: list[float], interpolation: str) -> dict[str, Any]:
    """What :func:`load_classifier_data` needs besides the weights, validated.

    Args:
        backbone: a key of :data:`cvpipe.backbones.BACKBONES`.
        mode: the training mode (recorded for people reading the store).
        classes: class names, in the order of the network's outputs.
        channels: channels of the training images (1 for grey datasets such as digits).
        input_size: (H, W) of the training images as ``preprocess`` stored them.
        image_size: the network's input side (``train.image_size``).
        mean, std: normalisation, in [0, 1] units.
        interpolation: ``train.interpolation``.
    """
    card = {"format": FORMAT, "backbone": backbone, "mode": mode, "classes": list(classes),
            "channels": int(channels), "input_size": [int(input_size[0]), int(input_size[1])],
            "image_size": int(image_size), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "interpolation": interpolation}
    return validate_card(card)


def validate_card(card: Any) -> dict[str, Any]:
    """``card`` if every field has the type and range a classifier card needs.

    Raises:
        UntrustedModel: naming the first bad field.
    """

    def bad(field: str, why: str) -> UntrustedModel:
        return UntrustedModel(f"{CLASSIFIER_CARD}: {field} {why}")

    def is_int(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    def floats3(v: Any, positive: bool) -> bool:
        return (isinstance(v, list) and len(v) == 3
                and all(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f)
                        and (f > 0 or not positive) for f in v))

    if not isinstance(card, dict):
        raise UntrustedModel(f"{CLASSIFIER_CARD} is not a JSON object")
    if card.get("format") != FORMAT:
        raise bad("format", f"is {str(card.get('format'))[:20]!r}, this cvpipe reads format {FORMAT}")
    if card.get("backbone") not in BACKBONES:
        raise bad("backbone", f"must be one of {sorted(BACKBONES)}")
    classes = card.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise bad("classes", "must be a non-empty list of names")
    if card.get("channels") not in (1, 3):
        raise bad("channels", "must be 1 or 3")
    size = card.get("input_size")
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v, 1, 65536) for v in size)):
        raise bad("input_size", "must be [H, W], positive integers")
    if not is_int(card.get("image_size"), 1, 65536):
        raise bad("image_size", "must be a positive integer")
    if not floats3(card.get("mean"), positive=False) or not floats3(card.get("std"), positive=True):
        raise bad("mean/std", "must be three finite numbers each (std > 0)")
    if card.get("interpolation") not in INTERPOLATIONS:
        raise bad("interpolation", f"must be one of {INTERPOLATIONS}")
    return card


def read_card(data_dir: str | Path) -> dict[str, Any]:
    """The validated ``classifier.json`` of a model's data folder."""
    path = Path(data_dir) / CLASSIFIER_CARD
    try:
        return validate_card(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UntrustedModel(f"{path}: not a readable classifier card ({err})") from None


# --------------------------------------------------------------------------- the model


def top_k(probabilities: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one image, most probable first: [{"label", "probability"}]."""
    idx = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": classes[i], "probability": float(probabilities[i])} for i in idx]


def _k_param(params: Mapping[str, Any] | None) -> int:
    k = (params or {}).get("k", TOP_K)
    if k is None:
        return TOP_K
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInput(f"param k must be a positive integer, got {str(k)[:20]!r}")
    return int(k)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, as float32."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class Classifier:
    """A trained network with its card; what MLflow's ``pyfunc.load_model`` returns inside its wrapper."""

    def __init__(self, card: Mapping[str, Any], network):
        """``network``: a :class:`tasks.backbones.ImageClassifier` (uint8 images in, logits out)."""
        self.card = dict(card)
        self.network = network.eval()

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Classify images; see :func:`images_from_input` for what ``model_input`` may be.

        Args:
            model_input: encoded image files or image arrays.
            params: ``{"k": classes reported per image}`` (default :data:`TOP_K`; at most all classes).

        Returns:
            One entry per image in each of: ``label`` (the most probable class), ``probability``
            (its probability), ``top_k`` ([{"label", "probability"}], most probable first),
            ``logits`` and ``probabilities`` ((N, K) float32 arrays, class order of the card).

        Raises:
            InvalidInput: an input the model cannot take (one short line).
        """
        import torch

        k = _k_param(params)
        x = images_from_input(model_input, self.card["channels"], self.card["input_size"])
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), _BATCH):
                out.append(self.network(torch.from_numpy(x[start:start + _BATCH])).float().numpy())
        logits = np.concatenate(out).astype(np.float32)
        probs = softmax(logits)
        best = probs.argmax(axis=1)
        classes = self.classes
        return {"label": [classes[i] for i in best], "probability": probs[np.arange(len(best)), best],
                "top_k": [top_k(row, classes, k) for row in probs], "logits": logits, "probabilities": probs}

    def get_raw_model(self):
        """The torch module (uint8 images at the training size in, logits out)."""
        return self.network


def classifier_from_checkpoint(ckpt: Mapping[str, Any], channels: int, input_size: tuple[int, int]) -> Classifier:
    """A :class:`Classifier` from a ``model.pt`` checkpoint of the train stage (already loaded)."""
    card = make_card(backbone=ckpt["backbone"], mode=ckpt.get("mode", ""), classes=ckpt["classes"],
                     channels=channels, input_size=input_size, image_size=ckpt["image_size"],
                     mean=ckpt["mean"], std=ckpt["std"], interpolation=ckpt["interpolation"])
    return _build(card, ckpt["state_dict"])


def _build(card: Mapping[str, Any], state_dict: Mapping[str, Any]) -> Classifier:
    import torch

    from tasks.backbones import ImageClassifier, build_model

    net = build_model(card["backbone"], len(card["classes"]))
    tensors = {k: torch.as_tensor(v) for k, v in state_dict.items()}
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise UntrustedModel(f"{CLASSIFIER_WEIGHTS} does not fit a {card['backbone']} with "
                             f"{len(card['classes'])} classes: {str(err).splitlines()[0]}") from None
    return Classifier(card, ImageClassifier(net, card["image_size"], card["mean"], card["std"], card["classes"],
                                            card["interpolation"]))


def save_classifier_data(clf: Classifier, out_dir: str | Path) -> Path:
    """Write ``classifier.json`` and ``weights.npz`` into ``out_dir`` (created); returns it."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CLASSIFIER_CARD, clf.card)
    state = clf.network.net.state_dict()
    save_npz(out / CLASSIFIER_WEIGHTS,
             **{k: (v.float() if v.is_floating_point() and v.dtype != torch.float64 else v).detach().cpu().numpy()
                for k, v in state.items()})
    return out


def load_classifier_data(data_dir: str | Path) -> Classifier:
    """Rebuild the classifier from a data folder written by :func:`save_classifier_data`.

    Only JSON and pickle-free numpy arrays are read; the architecture comes from the installed package.

    Raises:
        UntrustedModel: a file is missing or malformed, or the weights do not fit the card.
    """
    data_dir = Path(data_dir)
    card = read_card(data_dir)
    try:
        weights = load_npz(data_dir / CLASSIFIER_WEIGHTS)
    except (OSError, ValueError) as err:  # ValueError: object arrays (pickle), or not an .npz
        raise UntrustedModel(f"{data_dir / CLASSIFIER_WEIGHTS}: not a pickle-free .npz of weights ({err})") from None
    return _build(card, weights)


def exported_model(p: Params, mode: str, n_examples: int = 2) -> tuple[Classifier, np.ndarray, dict[str, Any]]:
    """The best model of ``mode`` as it is exported, an input example and its output.

    Returns:
        (:class:`Classifier` built from ``model.pt`` and the training images' channels and size,
        uint8 validation images (n_examples, C, H, W), its output {"logits", "probabilities", ...} on them).
    """
    # Imported here: loading an exported model needs neither the training files nor the datasets' readers.
    from tasks.checkpoints import load_torch
    from tasks.splits import load_split

    ckpt = load_torch(p.paths.train / mode / MODEL)
    x, _ = load_split(p.paths.processed, "val")
    clf = classifier_from_checkpoint(ckpt, channels=x.shape[1], input_size=(x.shape[2], x.shape[3]))
    example = np.ascontiguousarray(x[:n_examples])
    return clf, example, clf.predict(example)
