"""The classifier backbones as torch models: building them from their entry in
:data:`cvpipe.backbones.BACKBONES` (random initialisation, original 1000-class ImageNet head, so an
ImageNet weights file loads strictly), finding their classifier layer, freezing their stages, and
the model with its input pipeline (:class:`ImageClassifier`).

Adding a backbone is one entry in :data:`cvpipe.backbones.BACKBONES`; nothing here names one.
This module imports only torch (and the architecture's package, lazily), so an exported model can
be loaded without the rest of the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pickle

import torch
import torch.nn.functional as F
from torch import nn

from cvpipe.backbones import BACKBONES, Backbone
from cvpipe.errors import pickled_message
from cvpipe.io import CorruptFile


def get_backbone(name: str) -> Backbone:
    """The registry entry for ``name``; ``KeyError`` lists the known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}") from None


def build_architecture(spec: Backbone) -> nn.Module:
    """The architecture of ``spec`` with its ImageNet head, randomly initialised."""
    if spec.family == "torchvision":
        import torchvision.models as tvm

        return getattr(tvm, spec.arch)(weights=None)
    if spec.family == "efficientnet_lite":
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None: "same" padding computed per input, so any image_size works.
        return EfficientNet.from_name(spec.arch, image_size=None)
    raise ValueError(f"backbone {spec.name}: unknown family {spec.family!r}")


def get_head(model: nn.Module, spec: Backbone) -> nn.Linear:
    """The classifier layer of ``model``."""
    return model.get_submodule(spec.head)


def set_head(model: nn.Module, spec: Backbone, head: nn.Module) -> None:
    """Put ``head`` in place of the classifier layer."""
    parent, _, leaf = spec.head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, head)


def build_model(name: str, num_classes: int, weights_file: str | Path | None = None) -> nn.Module:
    """Build a backbone, load its weights and replace its classifier by a new ``Linear``.

    Args:
        name: a key of :data:`cvpipe.backbones.BACKBONES`.
        num_classes: outputs of the new classifier.
        weights_file: a state dict for the architecture *with its original head*
            (loaded strictly, ``weights_only=True``); None keeps the random initialisation.

    Returns:
        The model; the new head is initialised from torch's global RNG (seed it first).
    """
    spec = get_backbone(name)
    model = build_architecture(spec)
    if weights_file is not None:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CorruptFile(f"{weights_file}: {pickled_message(err)}") from err
        model.load_state_dict(state)
    set_head(model, spec, nn.Linear(get_head(model, spec).in_features, num_classes))
    return model


def num_features(model: nn.Module, spec: Backbone) -> int:
    """Width of the features that enter the classifier."""
    return get_head(model, spec).in_features


def forward_features(model: nn.Module, spec: Backbone, x: torch.Tensor) -> torch.Tensor:
    """The model's output with its classifier replaced by the identity: the pooled features."""
    head = get_head(model, spec)
    set_head(model, spec, nn.Identity())
    try:
        return model(x)
    finally:
        set_head(model, spec, head)


def stage_modules(model: nn.Module, spec: Backbone, k: int) -> list[nn.Module]:
    """Modules of the first ``k`` stages.

    Raises:
        ValueError: ``k`` exceeds the number of stages.
    """
    if k > len(spec.stages):
        raise ValueError(f"train.freeze_stages={k} but {spec.name} has {len(spec.stages)} stages")
    return [model.get_submodule(path) for stage in spec.stages[:k] for path in stage]


def freeze(model: nn.Module, spec: Backbone, stages: int | None) -> None:
    """Set ``requires_grad``: ``stages=None`` freezes everything but the head; k freezes the first k stages."""
    if stages is None:
        model.requires_grad_(False)
        get_head(model, spec).requires_grad_(True)
        return
    model.requires_grad_(True)
    for m in stage_modules(model, spec, stages):
        m.requires_grad_(False)


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Set the momentum of every batch norm (torch convention: new = (1 - m) * old + m * batch)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, except that batch norms whose parameters are frozen stay in eval mode.

    A frozen stage must not drift: its running statistics are part of the frozen weights.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()


class ImageClassifier(nn.Module):
    """A trained network with its input pipeline: uint8 (N, C, H, W) images in, logits out.

    This is the model logged to MLflow, so that serving it needs no preprocessing code.
    """

    def __init__(self, net: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float],
                 classes: Sequence[str] | None = None, interpolation: str = "bicubic"):
        super().__init__()
        self.net, self.image_size, self.interpolation = net, image_size, interpolation
        self.classes = list(classes) if classes is not None else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(x, self.image_size, self.mean, self.std, self.interpolation))


def normalize(x: torch.Tensor, image_size: int, mean: torch.Tensor, std: torch.Tensor,
              interpolation: str = "bicubic") -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W) -> float32 (N, 3, S, S): resize with ``interpolate``, then (x - mean) / std.

    Resizing happens before grey images are expanded to three channels, so it costs a third.
    Shrinking is antialiased; bicubic overshoot is clipped to the [0, 1] range of the images.
    """
    x = x.float().div_(255.0)
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        if interpolation == "nearest":
            x = F.interpolate(x, size=(image_size, image_size), mode="nearest-exact")
        else:
            shrink = h > image_size or w > image_size
            x = F.interpolate(x, size=(image_size, image_size), mode=interpolation, align_corners=False,
                              antialias=shrink)
            if interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    return (x - mean) / std
