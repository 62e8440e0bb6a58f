"""The feature cache of ``feature_extractor``: the frozen backbone's features of every image (and
flip variant), computed once and kept under ``paths.features``, keyed by everything they depend on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cvpipe.io import load_npz, read_json, save_npz, write_json
from cvpipe.params import TrainParams
from tasks.engine import extract_features
from tasks.runtime import Runtime
from tasks.transforms import apply_flip, flip_variants, image_transforms

log = logging.getLogger(__name__)


def feature_cache_key(fields: dict[str, Any]) -> str:
    """sha256 of the fields that determine cached features."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def cached_features(model: nn.Module, tp: TrainParams, rt: Runtime, cache_dir: Path, key_fields: dict[str, Any],
                    splits: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Features of the train split (one array per flip variant) and the val split, from the cache or computed.

    The cache file is ``<cache_dir>/<backbone>-<key>.npz`` with a JSON sidecar of the key's fields.

    Returns:
        ({"train": (V, N, F), "val": (N, F)}, sidecar with the images/s measured when they were computed).
    """
    variants = flip_variants(tp)
    fields = {**key_fields, "image_size": tp.image_size, "interpolation": tp.interpolation,
              "mean": list(tp.mean), "std": list(tp.std),
              "flips": [list(v) for v in variants], "dtype": str(rt.amp_dtype or torch.float32)}
    key = feature_cache_key(fields)[:20]
    path = cache_dir / f"{tp.backbone}-{key}.npz"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        log.info("features: cache hit %s", path)
        meta = read_json(sidecar)
        return load_npz(path), {**meta, "cache_hit": True}
    _, eval_tf = image_transforms(tp, rt)
    n_images, seconds = 0, 0.0
    train = []
    for h, v in variants:
        feats, ips = extract_features(model, tp.backbone, apply_flip(splits["train"], h, v), batch_size=tp.batch_size,
                                      transform=eval_tf, rt=rt, desc=f"features train flip={int(h)}{int(v)}")
        train.append(feats)
        n_images, seconds = n_images + len(feats), seconds + len(feats) / ips
    val, ips = extract_features(model, tp.backbone, splits["val"], batch_size=tp.batch_size, transform=eval_tf,
                                rt=rt, desc="features val")
    n_images, seconds = n_images + len(val), seconds + len(val) / ips
    arrays = {"train": np.stack(train), "val": val}
    save_npz(path, **arrays)
    meta = {"key": key, **fields, "images": n_images, "images_per_s": n_images / seconds,
            "device": str(rt.device)}
    write_json(sidecar, meta)
    return arrays, {**meta, "cache_hit": False}
