"""The registered classifier as an MLflow pyfunc whose only code is the installed package.

A logged model is data: ``classifier.json`` (class names, the channels and size of the images
the network was trained on, its input size, mean/std, interpolation) and ``weights.npz`` (the
network's tensors as plain numpy arrays, read with pickle disabled). Its MLmodel names
``loader_module: cvpipe.model_flavor``; this module rebuilds the architecture from the installed
:mod:`tasks.backbones` and preprocesses with the functions training uses, so loading a model from
a tracking store never runs code, and never unpickles objects, that the store holds.

Why not a ``torch.export`` program (.pt2): ``torch.export.load`` unpickles parts of the archive
(its sample inputs fall back to ``weights_only=False``) and evaluates symbolic shape expressions,
so anyone who can write to the store could make a .pt2 run code on the reader's machine.

The pyfunc's ``predict`` takes what a client has (see :func:`images_from_input`): encoded image
files (PNG, JPEG, ...; bytes, or base64 strings as JSON carries them, alone, in a list, or in an
``image`` field or column), or arrays of uint8 (N, C, H, W) images (C = 1 or 3, any H and W) or of
floats in [0, 1]. It returns, per image, the most probable class and its probability, the top ``k``
classes (param ``k``, default :data:`TOP_K`), and the logits and probabilities (float32, class
order of ``classifier.json``). Its signature declares the ``k`` param and no input schema: MLflow
would otherwise cast every input to one dtype before the model sees it (floats in [0, 1] to uint8
zeros) and refuse strings; the model checks its inputs itself, with short messages.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cvpipe.tracking import TrackingError

FORMAT = 1
CARD = "classifier.json"
WEIGHTS = "weights.npz"
DATA_DIR = "classifier"  # the folder MLflow copies under the model's data/
LOADER_MODULE = __name__
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# What may appear in the pyfunc section of a trusted MLmodel (anything else, e.g. `code`,
# `python_model` or `model_code_path`, makes MLflow import or unpickle something from the store).
PYFUNC_KEYS = {"loader_module", "python_version", "data", "env", "streamable"}
_GREY = (0.299, 0.587, 0.114)  # ITU-R BT.601, as OpenCV's RGB2GRAY
_BATCH = 32  # images per forward pass: bounds memory for large batches at large network sizes
TOP_K = 3  # classes reported per image unless the caller passes the param ``k``
IMAGE_FIELD = "image"  # the field (column) of encoded images in a JSON request


class UntrustedModel(TrackingError):
    """A model in the tracking store would run code from the store when loaded, or is malformed."""


class InvalidInput(ValueError):
    """Images given to the classifier have a shape, type or range it cannot take."""


# --------------------------------------------------------------------------- the card


def make_card(*, backbone: str, mode: str, classes: list[str], channels: int, input_size: tuple[int, int],
              image_size: int, mean: list[float], std: list[float], interpolation: str) -> dict[str, Any]:
    """What :func:`load_classifier_data` needs besides the weights, validated.

    Args:
        backbone: a key of :data:`tasks.backbones.BACKBONES`.
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
    from tasks.backbones import BACKBONES

    def bad(field: str, why: str) -> UntrustedModel:
        return UntrustedModel(f"{CARD}: {field} {why}")

    def is_int(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    def floats3(v: Any, positive: bool) -> bool:
        return (isinstance(v, list) and len(v) == 3
                and all(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f)
                        and (f > 0 or not positive) for f in v))

    if not isinstance(card, dict):
        raise UntrustedModel(f"{CARD} is not a JSON object")
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
    path = Path(data_dir) / CARD
    try:
        return validate_card(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UntrustedModel(f"{path}: not a readable classifier card ({err})") from None


# --------------------------------------------------------------------------- inputs


def as_model_input(images: Any, channels: int, input_size: tuple[int, int] | list[int]) -> np.ndarray:
    """Images as the training data were stored: uint8 (N, ``channels``, H, W) at ``input_size``.

    This is what ``preprocess`` did to the training images (OpenCV's area resize, grey from RGB
    with OpenCV's weights); the network-side resize and normalisation follow in the model
    (:func:`tasks.backbones.normalize`, the function training uses).

    Args:
        images: (N, C, H, W) or one (C, H, W) image; C = 1 or 3; uint8 (or integers in 0..255),
            or floats in [0, 1].
        channels: channels of the training images.
        input_size: (H, W) of the training images.

    Raises:
        InvalidInput: wrong rank, channel count, dtype or value range.
    """
    import cv2

    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0 or min(x.shape[2:]) == 0:
        hint = " (channels last? send (N, C, H, W))" if x.ndim == 4 and x.shape[3] in (1, 3) else ""
        raise InvalidInput(f"expected images as (N, C, H, W) with C = 1 or 3, got shape {tuple(x.shape)}{hint}")
    x = _to_uint8(x)
    if x.shape[1] == 3 and channels == 1:
        x = np.stack([cv2.cvtColor(np.ascontiguousarray(im.transpose(1, 2, 0)), cv2.COLOR_RGB2GRAY)
                      for im in x])[:, None]
    h, w = int(input_size[0]), int(input_size[1])
    if x.shape[2:] != (h, w):
        # cv2.resize drops a trailing channel axis of 1: resize each channel plane.
        x = np.stack([np.stack([cv2.resize(plane, (w, h), interpolation=cv2.INTER_AREA) for plane in im])
                      for im in x])
    return np.ascontiguousarray(x)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind in "iu":
        if x.min() < 0 or x.max() > 255:
            raise InvalidInput(f"integer images must be in 0..255, got {x.min()}..{x.max()}")
        return x.astype(np.uint8)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise InvalidInput("float images contain NaN or infinity")
        if x.min() < 0 or x.max() > 1:
            raise InvalidInput(f"float images must be in [0, 1], got {x.min():.4g}..{x.max():.4g} "
                               "(pass uint8 for 0..255)")
        return np.rint(x * 255.0).astype(np.uint8)
    raise InvalidInput(f"expected uint8 or float images, got dtype {x.dtype}")


def images_from_input(model_input: Any, channels: int, input_size: tuple[int, int] | list[int],
                      max_pixels: int | None = None) -> np.ndarray:
    """What a client sends, as :func:`as_model_input` returns it: uint8 (N, ``channels``, H, W).

    Accepted (what MLflow's scoring server makes of a JSON request without an input schema):

    - encoded image files: ``bytes``, or base64 ``str`` (a ``data:image/...;base64,`` prefix is
      allowed), alone, in a list or 1-D array, or under the key (column) ``image`` of a dict or
      DataFrame (``{"inputs": {"image": [...]}}``, ``{"instances": [{"image": ...}]}``,
      ``{"dataframe_records": [{"image": ...}]}``); each is decoded by the project's image reader
      (:func:`tasks.images.decode_image`, with its pixel limit), any size, grey or colour;
    - arrays (or nested lists) of images: see :func:`as_model_input`.

    Raises:
        InvalidInput: naming the first bad image (its index) and why, in one short line.
    """
    pd = sys.modules.get("pandas")  # a DataFrame comes only from code that imported pandas

    x = model_input
    if pd is not None and isinstance(x, pd.DataFrame):
        if IMAGE_FIELD not in x.columns:
            raise InvalidInput(f"expected a column {IMAGE_FIELD!r} of base64-encoded image files, "
                               f"got columns {[str(c)[:40] for c in x.columns[:5]]}")
        x = x[IMAGE_FIELD].tolist()
    elif isinstance(x, Mapping):
        if IMAGE_FIELD not in x:
            raise InvalidInput(f"expected the field {IMAGE_FIELD!r} (base64-encoded image files), "
                               f"got fields {[str(k)[:40] for k in list(x)[:5]]}")
        x = x[IMAGE_FIELD]
    if isinstance(x, (str, bytes)):
        x = [x]
    if isinstance(x, np.ndarray) and x.dtype.kind in "USO":
        x = x.reshape(-1).tolist() if x.ndim <= 1 else x
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, (str, bytes)) for v in x):
        # One at a time: only one full-size decoded image is held, however many the request has.
        return np.concatenate([as_model_input(_decode_one(v, i, max_pixels).transpose(2, 0, 1), channels,
                                              input_size) for i, v in enumerate(x)])
    if isinstance(x, (list, tuple)) and any(isinstance(v, (str, bytes)) for v in x):
        raise InvalidInput("expected either encoded image files or image arrays, not both in one request")
    try:
        arr = np.asarray(x)
    except ValueError:
        raise InvalidInput("images in one array must all have one shape: send images of different sizes "
                           "as encoded files (base64), or in separate requests") from None
    if arr.dtype.kind in "USO":
        raise InvalidInput(f"expected encoded image files (base64 strings) or numeric image arrays, "
                           f"got {'mixed values' if arr.dtype.kind == 'O' else 'strings'} of shape {arr.shape}")
    return as_model_input(arr, channels, input_size)


def _decode_one(value: str | bytes, index: int, max_pixels: int | None) -> np.ndarray:
    """One encoded image (bytes, or base64 text) as RGB uint8 (H, W, 3)."""
    import base64
    import binascii

    from tasks.images import MAX_PIXELS, decode_image

    data = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:  # a data URL, as browsers write them
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"image {index}: not base64 (send each image file base64-encoded)") from None
    try:
        return decode_image(data, MAX_PIXELS if max_pixels is None else max_pixels)
    except ValueError as err:
        raise InvalidInput(f"image {index}: {err}") from None


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


# --------------------------------------------------------------------------- the model


def softmax(logits: np.ndarray) -> np.ndarray:
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
        raise UntrustedModel(f"{WEIGHTS} does not fit a {card['backbone']} with {len(card['classes'])} classes: "
                             f"{str(err).splitlines()[0]}") from None
    return Classifier(card, ImageClassifier(net, card["image_size"], card["mean"], card["std"], card["classes"],
                                            card["interpolation"]))


def signature(example: np.ndarray | None = None, output: Mapping[str, Any] | None = None):
    """The MLflow signature: the ``k`` param and the outputs; no input schema.

    MLflow enforces an input schema before the model sees the data: a tensor schema casts every
    request to its one dtype (floats in [0, 1] become uint8 zeros) and refuses base64 strings, and
    a column schema refuses arrays. The model checks what it is given itself
    (:func:`images_from_input`). ``example`` and ``output`` are accepted for callers that pass them.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    outputs = Schema([
        ColSpec("string", "label"), ColSpec("float", "probability"),
        ColSpec(Array(Object([Property("label", "string"), Property("probability", "float")])), "top_k"),
        ColSpec(Array("float"), "logits"), ColSpec(Array("float"), "probabilities")])
    return ModelSignature(inputs=None, outputs=outputs, params=ParamSchema([ParamSpec("k", "long", TOP_K)]))


def save_classifier_data(clf: Classifier, out_dir: str | Path) -> Path:
    """Write ``classifier.json`` and ``weights.npz`` into ``out_dir`` (created); returns it."""
    import torch

    from cvpipe.io import save_npz, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CARD, clf.card)
    state = clf.network.net.state_dict()
    save_npz(out / WEIGHTS, **{k: (v.float() if v.is_floating_point() and v.dtype != torch.float64 else v)
                               .detach().cpu().numpy() for k, v in state.items()})
    return out


def load_classifier_data(data_dir: str | Path) -> Classifier:
    """Rebuild the classifier from a data folder written by :func:`save_classifier_data`.

    Only JSON and pickle-free numpy arrays are read; the architecture comes from the installed package.

    Raises:
        UntrustedModel: a file is missing or malformed, or the weights do not fit the card.
    """
    from cvpipe.io import load_npz

    data_dir = Path(data_dir)
    card = read_card(data_dir)
    try:
        weights = load_npz(data_dir / WEIGHTS)
    except (OSError, ValueError) as err:  # ValueError: object arrays (pickle), or not an .npz
        raise UntrustedModel(f"{data_dir / WEIGHTS}: not a pickle-free .npz of weights ({err})") from None
    return _build(card, weights)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> Classifier:
    """MLflow's entry point for ``loader_module: cvpipe.model_flavor``."""
    return load_classifier_data(data_path)


# --------------------------------------------------------------------------- trust


def check_model_dir(model_dir: str | Path) -> Path:
    """Check that loading the MLflow model in ``model_dir`` runs only installed code; return its data folder.

    Trusted: a ``python_function`` flavour whose ``loader_module`` is a module of the installed
    ``cvpipe`` package, with no code paths, no pickled python model and no model-from-code file,
    and whose data folder lies inside ``model_dir``; no flavour declares code paths.

    Raises:
        UntrustedModel: naming what would be imported or unpickled from the store.
    """
    import yaml

    model_dir = Path(model_dir).resolve()
    try:
        meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UntrustedModel(f"no readable MLmodel ({err})") from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict) or not isinstance(flavors.get("python_function"), dict):
        raise UntrustedModel("its MLmodel has no python_function flavour")
    with_code = sorted(name for name, conf in flavors.items() if isinstance(conf, dict) and conf.get("code"))
    if with_code:
        raise UntrustedModel(f"its MLmodel declares code paths (flavour {', '.join(with_code)}): "
                             "Python files from the tracking store would be imported")
    conf = flavors["python_function"]
    loader = conf.get("loader_module")
    if not _installed_cvpipe_module(loader):
        raise UntrustedModel(f"its loader_module {str(loader)[:80]!r} is not a module of the installed cvpipe package")
    extra = sorted(k for k in conf if k not in PYFUNC_KEYS and conf[k] not in (None, "", {}, []))
    if extra:
        raise UntrustedModel(f"its MLmodel's python_function flavour has {', '.join(extra)}: "
                             "a pickled or code-defined model from the tracking store would be loaded")
    data = (model_dir / str(conf.get("data", ""))).resolve()
    if not data.is_relative_to(model_dir) or not data.is_dir():
        raise UntrustedModel(f"its data folder {str(conf.get('data'))[:80]!r} is not a folder inside the model")
    return data


def _installed_cvpipe_module(name: Any) -> bool:
    """True when ``name`` is a module of this cvpipe package (resolved without importing it)."""
    if not isinstance(name, str) or not name.startswith("cvpipe.") or not name.replace(".", "").replace("_", "").isalnum():
        return False
    package = Path(__file__).resolve().parent
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(package)
