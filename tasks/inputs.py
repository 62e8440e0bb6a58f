"""What a client sends to the exported classifier, as the images it was trained on.

Encoded image files (bytes, or base64 text as JSON carries them) or arrays of images of any size
become uint8 (N, C, H, W) at the channels and size of the training images, resized as ``preprocess``
resized those (OpenCV's area resize, grey from RGB with OpenCV's weights). Each bad input is one
short :class:`InvalidInput` line.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

IMAGE_FIELD = "image"  # the field (column) of encoded images in a JSON request


class InvalidInput(ValueError):
    """Images given to the classifier have a shape, type or range it cannot take."""


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
