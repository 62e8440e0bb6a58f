"""The ``preprocess`` stage: raw dataset -> compact uint8 arrays (N, C, H, W) + int64 labels.

Writes ``train.npz``, ``val.npz`` and ``test.npz`` (arrays ``x`` and ``y``) and
``card.json`` (class names, counts per split, content hashes; :mod:`tasks.splits`). The validation
split is carved from train by a seeded, stratified split. Images keep their
native size: resizing to the network's input size happens per batch in ``train``.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from cvpipe.errors import UserError
from cvpipe.io import load_npz
from cvpipe.layout import CIFAR10_ARCHIVE, DIGITS_FILE
from cvpipe.params import Params
# The image reader lives in a module of its own (no Prefect or scikit-learn: predict and serving
# import it quickly); stages import it from here.
from tasks.images import IMAGE_SUFFIXES, MAX_PIXELS, decode_image, header_pixels, read_image  # noqa: F401
from tasks.splits import Dataset, dataset_card, write_dataset


CIFAR10_RECORD = 1 + 3 * 32 * 32
CIFAR10_TRAIN = [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST = ["cifar-10-batches-bin/test_batch.bin"]
CIFAR10_META = "cifar-10-batches-bin/batches.meta.txt"


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


class DatasetError(UserError, ValueError):
    """The raw dataset cannot make a classification dataset (layout, too few images, unreadable files)."""


def _count_images(folder: Path) -> int:
    """Image files anywhere under ``folder`` (symlinked folders are not followed)."""
    return sum(Path(f).suffix.lower() in IMAGE_SUFFIXES for _, _, files in os.walk(folder) for f in files)


def list_imagefolder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """List ``root/<class>/<image>`` without reading any pixel: (files, int64 labels, class names).

    Only that layout is read. Images elsewhere are refused rather than silently left out: in a
    sub-folder of a class folder (its images would belong to no class, or to the wrong one) or
    directly in ``root``. Hidden entries (``.name``) and non-image files are ignored.

    Raises:
        DatasetError: no class folders, an empty class folder, a sub-folder inside a class
            folder (named, with its image count), images directly in ``root``, or an image
            entry that is not a regular file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"imagefolder {root}: not a folder (set data.imagefolder to the dataset's folder)")
    entries = sorted(e for e in root.iterdir() if not e.name.startswith("."))
    classes = [e.name for e in entries if e.is_dir()]
    loose = [e.name for e in entries if not e.is_dir() and e.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise DatasetError(f"imagefolder {root}: {len(loose)} image(s) directly in the folder (first: {loose[0]!r}); "
                           "put each image in the sub-folder of its class")
    if not classes:
        raise DatasetError(f"imagefolder {root}: no class sub-folders")
    files: list[Path] = []
    labels: list[int] = []
    for idx, c in enumerate(classes):
        imgs = []
        for f in sorted((root / c).iterdir()):
            if f.name.startswith("."):
                continue
            if f.is_dir():
                raise DatasetError(
                    f"imagefolder {root}: class folder {c!r} holds a sub-folder {f.name!r} with "
                    f"{_count_images(f)} image(s); images are read only from {root}/<class>/: "
                    "move them into the class folder or remove the sub-folder")
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not f.is_file():
                raise DatasetError(f"imagefolder image {f}: not a regular file (a broken or looping link?)")
            imgs.append(f)
        if not imgs:
            raise DatasetError(f"imagefolder {root}: class folder {c!r} has no images")
        files += imgs
        labels += [idx] * len(imgs)
    return files, np.array(labels, dtype=np.int64), classes


def read_images(files: list[Path], size: int) -> np.ndarray:
    """Read and resize images into (N, 3, size, size) uint8.

    Raises:
        DatasetError: an image is unreadable (named, so the user can fix or remove it).
    """
    import cv2

    x = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, f in enumerate(tqdm(files, desc="read images", unit="img")):
        try:
            img = read_image(f)
        except (ValueError, OSError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise DatasetError(f"imagefolder image {f}: {reason}") from None
        x[i] = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    return x


def read_imagefolder(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``root/<class>/<image>`` into (N, 3, size, size) uint8 and int64 labels.

    Raises:
        DatasetError: see :func:`list_imagefolder` and :func:`read_images`.
    """
    files, y, classes = list_imagefolder(root)
    return read_images(files, size), y, classes


# --------------------------------------------------------------------------- pure transforms


def stratified_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Seeded, stratified split; returns (x_keep, y_keep, x_out, y_out) with ``fraction`` in the second part."""
    idx = np.arange(len(y))
    keep, out = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y)
    keep, out = np.sort(keep), np.sort(out)
    return x[keep], y[keep], x[out], y[out]


def _splits_fit(y: np.ndarray, fractions: list[float], seed: int, num_classes: int) -> bool:
    """Whether the successive stratified splits of :func:`build_dataset` succeed on labels ``y``
    and leave every class in every part (a class missing from a split cannot be evaluated)."""
    for fraction in fractions:
        try:
            y, _, _, out = stratified_split(y, y, fraction, seed)
        except ValueError:
            return False
        if len(np.unique(out)) < num_classes:
            return False
    return len(np.unique(y)) == num_classes


def min_images_per_class(num_classes: int, fractions: list[float], seed: int, limit: int = 5_000_000) -> int | None:
    """Fewest images per class with which ``num_classes`` classes of equal size survive the splits
    with every class in every part (None above ``limit`` labels in all)."""
    def fits(m: int) -> bool:
        return _splits_fit(np.repeat(np.arange(num_classes), m), fractions, seed, num_classes)

    lo, hi = 1, 2
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi * num_classes > limit:
            return None
    while hi - lo > 1:  # fits(lo) is False, fits(hi) is True
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def check_splittable(y: np.ndarray, classes: list[str], fractions: dict[str, float], seed: int,
                     source: str) -> None:
    """Fail before any image is decoded when the dataset cannot be classified or split.

    Args:
        y: int64 labels of the images to split.
        classes: class names (index = label).
        fractions: the fractions carved out in turn, by parameter name
            ({"preprocess.test_fraction": 0.2, "preprocess.val_fraction": 0.1}).
        seed: the split seed.
        source: what the data are, for the message.

    Raises:
        DatasetError: fewer than 2 classes, or too few images for the splits: a split fails or
            leaves a class out of train, val or test (the message says how many images each class
            needs when all classes have the same size).
    """
    if len(classes) < 2:
        raise DatasetError(f"{source}: {len(classes)} class ({', '.join(map(repr, classes))}); "
                           "a classifier needs at least 2 classes")
    if _splits_fit(y, list(fractions.values()), seed, len(classes)):
        return
    counts = np.bincount(y, minlength=len(classes))
    need = min_images_per_class(len(classes), list(fractions.values()), seed)
    split = ", ".join(f"{k}={v}" for k, v in fractions.items())
    if need is None:
        raise DatasetError(f"{source}: too few images for the splits ({split})")
    small = [f"{classes[i]!r} has {n}" for i, n in enumerate(counts) if n < need] or \
            [f"the smallest class {classes[int(counts.argmin())]!r} has {counts.min()}"]
    raise DatasetError(f"{source}: too few images for the splits ({split}): each of the {len(classes)} classes "
                       f"needs at least {need} images; {', '.join(small[:5])}"
                       f"{f' and {len(small) - 5} more' if len(small) > 5 else ''}")


def build_dataset(p: Params) -> Dataset:
    """Read the raw dataset named by ``data.dataset`` and split it into train / val / test.

    The split sizes are checked on the labels first, so a dataset too small for them fails
    before its images are decoded.
    """
    pp, seed = p.preprocess, p.seed
    val = {"preprocess.val_fraction": pp.val_fraction}
    both = {"preprocess.test_fraction": pp.test_fraction, **val}
    if p.data.dataset == "cifar10":
        tx, ty, test_x, test_y, classes = read_cifar10_binary(p.paths.raw / CIFAR10_ARCHIVE)
        check_splittable(ty, classes, val, seed, f"cifar10 {p.paths.raw / CIFAR10_ARCHIVE}")
    else:
        if p.data.dataset == "digits":
            raw = load_npz(p.paths.raw / DIGITS_FILE)
            x, y, classes = raw["images"][:, None], raw["labels"], [str(c) for c in raw["classes"]]
            check_splittable(y, classes, both, seed, f"digits {p.paths.raw / DIGITS_FILE}")
        else:
            files, y, classes = list_imagefolder(p.data.imagefolder)
            check_splittable(y, classes, both, seed, f"imagefolder {p.data.imagefolder}")
            x = read_images(files, pp.image_size)
        tx, ty, test_x, test_y = stratified_split(x, y, pp.test_fraction, seed)
    tx, ty, vx, vy = stratified_split(tx, ty, pp.val_fraction, seed)
    return Dataset({"train": (tx, ty), "val": (vx, vy), "test": (test_x, test_y)}, classes)


# --------------------------------------------------------------------------- stage


def preprocess(p: Params) -> dict:
    """Run the preprocess stage; returns the dataset card."""
    ds = build_dataset(p)
    card = dataset_card(ds, p.data.dataset)
    write_dataset(ds, card, p.paths.processed)
    return card
