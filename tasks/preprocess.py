"""The ``preprocess`` stage: raw dataset -> compact uint8 arrays (N, C, H, W) + int64 labels.

Writes ``train.npz``, ``val.npz`` and ``test.npz`` (arrays ``x`` and ``y``) and
``card.json`` (class names, counts per split, content hashes). The validation
split is carved from train by a seeded, stratified split. Images keep their
native size: resizing to the network's input size happens per batch in ``train``.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from cvpipe.io import array_hash, load_npz, save_npz, write_json
from cvpipe.params import Params
from tasks.download import CIFAR10_ARCHIVE, DIGITS_FILE

SPLITS = ("train", "val", "test")
CARD = "card.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

CIFAR10_RECORD = 1 + 3 * 32 * 32
CIFAR10_TRAIN = [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST = ["cifar-10-batches-bin/test_batch.bin"]
CIFAR10_META = "cifar-10-batches-bin/batches.meta.txt"


@dataclass
class Dataset:
    """Images (N, C, H, W) uint8 and labels (N,) int64 for each split, plus class names."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: list[str]


# --------------------------------------------------------------------------- readers


def _parse_cifar_records(buf: bytes, member: str) -> tuple[np.ndarray, np.ndarray]:
    if len(buf) % CIFAR10_RECORD:
        raise ValueError(f"{member}: size {len(buf)} is not a multiple of the {CIFAR10_RECORD}-byte record")
    rec = np.frombuffer(buf, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].astype(np.int64)


def read_cifar10_binary(archive: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Parse the official CIFAR-10 *binary* archive with numpy (no pickle, nothing extracted to disk).

    Each record is 1 label byte followed by 3072 pixel bytes (1024 R, 1024 G, 1024 B).

    Returns:
        (train_x, train_y, test_x, test_y, class_names)
    """
    with tarfile.open(archive) as tar:
        def read(member: str) -> bytes:
            try:
                f = tar.extractfile(member)
            except KeyError:
                raise ValueError(f"{archive}: member {member} is missing; not a CIFAR-10 binary archive") from None
            if f is None:
                raise ValueError(f"{archive}: member {member} is not a regular file")
            return f.read()

        train = [_parse_cifar_records(read(m), m) for m in CIFAR10_TRAIN]
        test = [_parse_cifar_records(read(m), m) for m in CIFAR10_TEST]
        classes = [c.strip() for c in read(CIFAR10_META).decode().splitlines() if c.strip()]
    tx, ty = np.concatenate([a for a, _ in train]), np.concatenate([b for _, b in train])
    vx, vy = np.concatenate([a for a, _ in test]), np.concatenate([b for _, b in test])
    for y in (ty, vy):
        if y.size and y.max() >= len(classes):
            raise ValueError(f"{archive}: label {y.max()} but only {len(classes)} class names")
    return tx, ty, vx, vy, classes


#: Default pixel limit (width x height) of one image; ``detect.max_pixels`` sets it for detection.
MAX_PIXELS = 100_000_000


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) read from the file's header without decoding its pixels; None when Pillow
    does not know the format (OpenCV may still decode it, under its own 2^30-pixel limit)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Image.DecompressionBombError:
        return (2 * Image.MAX_IMAGE_PIXELS + 1, 1)  # Pillow refused it: larger than any sane limit
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
    import cv2

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory", str(path))
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    size = header_size(path)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ValueError(f"{size[0]}x{size[1]} image: over the limit of {max_pixels:,} pixels")
    data = np.fromfile(path, dtype=np.uint8)
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


def read_imagefolder(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``root/<class>/<image>`` into (N, 3, size, size) uint8 and int64 labels.

    Raises:
        ValueError: no class folders, an empty class folder, or an unreadable image
            (named, so the user can fix or remove it).
    """
    import cv2

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"imagefolder {root}: no class sub-folders")
    files: list[tuple[Path, int]] = []
    for idx, c in enumerate(classes):
        imgs = sorted(f for f in (root / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise ValueError(f"imagefolder {root}: class folder {c!r} has no images")
        files += [(f, idx) for f in imgs]
    x = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, (f, _) in enumerate(tqdm(files, desc="read images", unit="img")):
        try:
            img = read_image(f)
        except ValueError as err:
            raise ValueError(f"imagefolder image {f}: {err}") from None
        x[i] = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    return x, np.array([lab for _, lab in files], dtype=np.int64), classes


# --------------------------------------------------------------------------- pure transforms


def stratified_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Seeded, stratified split; returns (x_keep, y_keep, x_out, y_out) with ``fraction`` in the second part."""
    idx = np.arange(len(y))
    keep, out = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y)
    keep, out = np.sort(keep), np.sort(out)
    return x[keep], y[keep], x[out], y[out]


def build_dataset(p: Params) -> Dataset:
    """Read the raw dataset named by ``data.dataset`` and split it into train / val / test."""
    pp, seed = p.preprocess, p.seed
    if p.data.dataset == "cifar10":
        tx, ty, test_x, test_y, classes = read_cifar10_binary(p.paths.raw / CIFAR10_ARCHIVE)
    else:
        if p.data.dataset == "digits":
            raw = load_npz(p.paths.raw / DIGITS_FILE)
            x, y, classes = raw["images"][:, None], raw["labels"], [str(c) for c in raw["classes"]]
        else:
            x, y, classes = read_imagefolder(p.data.imagefolder, pp.image_size)
        tx, ty, test_x, test_y = stratified_split(x, y, pp.test_fraction, seed)
    tx, ty, vx, vy = stratified_split(tx, ty, pp.val_fraction, seed)
    return Dataset({"train": (tx, ty), "val": (vx, vy), "test": (test_x, test_y)}, classes)


def dataset_card(ds: Dataset, name: str) -> dict:
    """Small JSON-able description: class names, counts per split and per class, content hashes."""
    n = len(ds.classes)
    return {
        "dataset": name,
        "classes": ds.classes,
        "image_shape": list(ds.splits["train"][0].shape[1:]),
        "counts": {s: int(len(y)) for s, (_, y) in ds.splits.items()},
        "class_counts": {s: np.bincount(y, minlength=n).tolist() for s, (_, y) in ds.splits.items()},
        "sha256": {s: array_hash(x, y) for s, (x, y) in ds.splits.items()},
        "data_hash": array_hash(*[a for s in SPLITS for a in ds.splits[s]]),
    }


def write_dataset(ds: Dataset, card: dict, out_dir: Path) -> None:
    """Write one .npz per split and the card, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, (x, y) in ds.splits.items():
        save_npz(out_dir / f"{s}.npz", x=x, y=y)
    write_json(out_dir / CARD, card)


def load_split(processed: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split written by :func:`write_dataset` (pickle disabled)."""
    d = load_npz(processed / f"{split}.npz")
    return d["x"], d["y"]


# --------------------------------------------------------------------------- stage


def preprocess(p: Params) -> dict:
    """Run the preprocess stage; returns the dataset card."""
    ds = build_dataset(p)
    card = dataset_card(ds, p.data.dataset)
    write_dataset(ds, card, p.paths.processed)
    return card


preprocess_task = task(preprocess, name="preprocess")
