"""Where and how tensors are computed: the device, the autocast dtype (``train.amp``) and the
memory format, resolved once per stage from ``params.yaml``.

``train.amp: auto`` is resolved for a model by :func:`resolve_amp`, which hands the timed probe of
:mod:`tasks.amp` a step of that model; :func:`make_runtime` alone gives what needs no model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from cvpipe.errors import UserError
from cvpipe.layout import AMP_CHOICE
from cvpipe.params import Params
from tasks.amp import AmpChoice, choose_amp, model_step_timer
from tasks.backbones import forward_features, get_backbone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for full precision
    channels_last: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


class DeviceUnavailable(UserError, RuntimeError):
    """The ``device`` asked for is not available on this machine."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error, not a fallback.

    Raises:
        DeviceUnavailable: ``cuda`` was asked for and torch sees no CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("device: cuda was requested but torch sees no CUDA device "
                                "(set device: auto or cpu, or run on a machine with a GPU)")
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` without a model to time: ``auto`` is bf16 on CUDA where
    supported and full precision on a CPU. :func:`tasks.train.train` resolves ``auto`` on a CPU that may
    compute bf16 natively with a timed probe instead (:func:`resolve_amp`)."""
    return choose_amp(amp, device, None, {}, None).dtype


def resolve_amp(p: Params, mode: str, model: nn.Module, device: torch.device) -> AmpChoice:
    """``train.amp`` for ``mode`` on ``device``: ``auto`` on a CPU with AMX or AVX512-BF16 is decided by a
    timed probe of ``model`` at the run's image size and batch (fine_tune: forward, backward and step;
    feature_extractor: the feature forward), cached in ``<paths.cache>/amp_choice.json``."""
    tp = p.train
    spec = get_backbone(tp.backbone)
    kind = "infer" if mode == "feature_extractor" else "train"
    fields = {"backbone": tp.backbone, "image_size": tp.image_size, "batch_size": tp.batch_size, "kind": kind,
              "channels_last": tp.channels_last, "freeze_stages": tp.freeze_stages if kind == "train" else None}

    def timer():
        log.info("amp auto: timing fp32 and bf16 steps of %s at %d px, batch %d (%s), once for this machine",
                 tp.backbone, tp.image_size, tp.batch_size, kind)
        return model_step_timer(model, kind, tp.batch_size, tp.image_size, tp.channels_last, device,
                                lambda m, x: forward_features(m, spec, x))

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return choose_amp(tp.amp, device, p.paths.cache / AMP_CHOICE, fields, timer)


def make_runtime(p: Params) -> Runtime:
    """Resolve ``device``, ``train.amp``, ``train.channels_last`` and ``train.num_threads``."""
    if p.train.num_threads:
        torch.set_num_threads(p.train.num_threads)
    device = resolve_device(p.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Runtime(device, autocast_dtype(p.train.amp, device), p.train.channels_last)


def autocast(rt: Runtime):
    """The autocast context of ``rt`` (disabled when it computes in full precision)."""
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None)
