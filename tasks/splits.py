"""The processed dataset on disk, as ``preprocess`` writes it and ``train`` and ``evaluate`` read it:
one ``<split>.npz`` per split (``x`` uint8 (N, C, H, W), ``y`` int64 (N,)) and ``card.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvpipe.io import array_hash, load_npz, save_npz, write_json
from cvpipe.layout import CARD, SPLITS, split_file


@dataclass
class Dataset:
    """Images (N, C, H, W) uint8 and labels (N,) int64 for each split, plus class names."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: list[str]


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
        save_npz(out_dir / split_file(s), x=x, y=y)
    write_json(out_dir / CARD, card)


def load_split(processed: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split written by :func:`write_dataset` (pickle disabled)."""
    d = load_npz(processed / split_file(split))
    return d["x"], d["y"]
