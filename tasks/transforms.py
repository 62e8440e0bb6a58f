"""The input pipeline: uint8 device batches to network inputs, train and eval transforms side by side.

Images stay uint8 until they reach the device; each batch is then resized with ``interpolate``
and normalised there (:func:`prepare_batch`). Training flips each image at random, drawing from
the epoch's generator, so a resumed run flips exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cvpipe.params import TrainParams
from tasks.backbones import normalize
from tasks.runtime import Runtime

#: A device batch (and the epoch's generator, None when evaluating) -> the model's input.
Transform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def prepare_batch(x: torch.Tensor, image_size: int, mean: Sequence[float], std: Sequence[float],
                  channels_last: bool = False, interpolation: str = "bicubic") -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W), already on its device -> normalised float32 (N, 3, S, S).

    Args:
        x: a uint8 batch; grey images are expanded to three channels after resizing.
        image_size: S, the network's input size (``interpolate``, antialiased when shrinking).
        mean, std: per-channel statistics of the backbone's training data, in [0, 1] units.
        channels_last: return an NHWC-strided tensor (faster convolutions on most hardware).
        interpolation: ``bicubic``, ``bilinear`` or ``nearest``.
    """
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    out = normalize(x, image_size, m, s, interpolation)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()


def random_flips(x: torch.Tensor, hflip: bool, vflip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Flip each image left-right and/or up-down with probability 1/2 (per image, drawn from ``generator``)."""
    for enabled, dim in ((hflip, -1), (vflip, -2)):
        if enabled:
            mask = (torch.rand(len(x), generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
            x = torch.where(mask, x.flip(dim), x)
    return x


def flip_variants(tp: TrainParams) -> list[tuple[bool, bool]]:
    """(hflip, vflip) variants whose features are cached for ``feature_augment: flips``; identity first."""
    if tp.feature_augment == "none":
        return [(False, False)]
    hs = [False, True] if tp.hflip else [False]
    vs = [False, True] if tp.vflip else [False]
    return [(h, v) for v in vs for h in hs]


def apply_flip(x: torch.Tensor, hflip: bool, vflip: bool) -> torch.Tensor:
    """``x`` flipped left-right and/or up-down, every image alike."""
    dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
    return x.flip(dims) if dims else x


def image_transforms(tp: TrainParams, rt: Runtime) -> tuple[Transform, Transform]:
    """(train, eval) transforms from uint8 device batches to network inputs, side by side."""
    def train_tf(x, g):
        return prepare_batch(random_flips(x, tp.hflip, tp.vflip, g), tp.image_size, tp.mean, tp.std,
                             rt.channels_last, tp.interpolation)

    def eval_tf(x, g):
        return prepare_batch(x, tp.image_size, tp.mean, tp.std, rt.channels_last, tp.interpolation)

    return train_tf, eval_tf


def identity(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """The transform of inputs that are already the model's (cached features)."""
    return x
