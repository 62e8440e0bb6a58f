"""Reading image files and encoded image bytes as RGB uint8 arrays, under a pixel limit.

One reader for every stage that takes images from users (``preprocess`` for image folders,
``detect``, ``cvpipe predict`` and the served model): the size is read from the header before any
pixel is decoded, so a small file that decodes to gigabytes is refused. Kept free of Prefect and
scikit-learn so that ``cvpipe predict`` and the model server import it in milliseconds.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

#: Default pixel limit (width x height) of one image; ``detect.max_pixels`` sets it for detection.
#: The file suffixes read as images wherever a folder of user images is listed (preprocess, detect).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MAX_PIXELS = 100_000_000


def header_pixels(source: Path | bytes) -> tuple[int, str] | None:
    """Pixel count (width x height) and a size label, read from a file's (or encoded bytes') header
    without decoding its pixels; None when Pillow does not know the format (OpenCV may still decode
    it, under its own 2^30-pixel limit)."""
    import re
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
                w, h = im.size
                return w * h, f"{w}x{h}"
    except Image.DecompressionBombError as err:
        # Pillow refuses to open it at all (over 2x its own limit); its message has the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
        return pixels, f"{pixels:,}-pixel"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3): grayscale, RGBA and 16-bit are converted.

    The size is read from the header first: an image of more than ``max_pixels`` pixels is
    refused before any pixel is decoded (a small PNG can decode to gigabytes).

    Raises:
        ValueError: the file is empty, too large, unreadable or not an image.
        OSError: the file cannot be opened (missing, a directory, a symlink loop...).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory", str(path))
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    _check_size(header_pixels(path), max_pixels)
    return _decode(np.fromfile(path, dtype=np.uint8))


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The bytes of an image file (PNG, JPEG, ...) as RGB uint8 (H, W, 3); as :func:`read_image`.

    Raises:
        ValueError: the bytes are empty, too large, or not a decodable image.
    """
    if not data:
        raise ValueError("empty file")
    data = bytes(data)
    _check_size(header_pixels(data), max_pixels)
    return _decode(np.frombuffer(data, dtype=np.uint8))


def _check_size(header: tuple[int, str] | None, max_pixels: int) -> None:
    if header is not None and header[0] > max_pixels:
        raise ValueError(f"{header[1]} image: over the limit of {max_pixels:,} pixels")


def _decode(data: np.ndarray) -> np.ndarray:
    import cv2

    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ValueError("not a decodable image")
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
