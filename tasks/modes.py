"""The two training modes as setups of one epoch loop.

``feature_extractor``: the backbone is frozen (eval mode); its features are computed once per
image (and flip variant), cached under ``paths.features`` (:mod:`tasks.features`), and a new
``Linear`` head is trained on them. ``fine_tune``: every weight not in the first
``freeze_stages`` stages is trained, on randomly flipped images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cvpipe.params import Params, TrainParams
from tasks.backbones import get_backbone, get_head
from tasks.features import cached_features
from tasks.runtime import Runtime
from tasks.transforms import Transform, identity, image_transforms


@dataclass
class ModeSetup:
    """What the epoch loop trains, on which inputs, with which transforms."""

    trainable: nn.Module  # the head (feature_extractor) or the whole model (fine_tune)
    rt: Runtime
    train_tf: Transform
    eval_tf: Transform
    epoch_inputs: Callable[[torch.Generator], torch.Tensor]  # the training inputs of an epoch
    x_val: torch.Tensor
    extra: dict[str, Any]  # mode-specific metrics


def feature_extractor_setup(model: nn.Module, p: Params, rt: Runtime, weights_tag: str, data_hash: str,
                            x_tr: torch.Tensor, x_va: torch.Tensor) -> ModeSetup:
    """Train the head on cached features; each epoch draws one cached flip variant per image."""
    tp = p.train
    feats, meta = cached_features(model, tp, rt, p.paths.features,
                                  {"backbone": tp.backbone, "weights": weights_tag, "data_hash": data_hash},
                                  {"train": x_tr, "val": x_va})
    train_feats = torch.from_numpy(feats["train"])
    n = train_feats.shape[1]

    def epoch_inputs(g: torch.Generator) -> torch.Tensor:
        variant = torch.randint(len(train_feats), (n,), generator=g)
        return train_feats[variant, torch.arange(n)]

    return ModeSetup(get_head(model, get_backbone(tp.backbone)),
                     Runtime(rt.device, None, False),  # a Linear on features: nothing to gain from autocast
                     identity, identity, epoch_inputs, torch.from_numpy(feats["val"]),
                     {"feature_images_per_s": meta["images_per_s"], "feature_cache_hit": meta["cache_hit"]})


def fine_tune_setup(model: nn.Module, tp: TrainParams, rt: Runtime, x_tr: torch.Tensor,
                    x_va: torch.Tensor) -> ModeSetup:
    """Train the whole model (less its frozen stages) on randomly flipped images."""
    train_tf, eval_tf = image_transforms(tp, rt)
    return ModeSetup(model, rt, train_tf, eval_tf, lambda g: x_tr, x_va, {})
