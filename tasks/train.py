"""The ``train`` stage: transfer learning in two modes from one set of functions.

``feature_extractor``: the backbone is frozen (eval mode); its features are computed
once per image (and flip variant), cached under ``paths.features``, and a new
``Linear`` head is trained on them. ``fine_tune``: every weight not in the first
``freeze_stages`` stages is trained, on randomly flipped images.

Images stay uint8 until they reach the device; each batch is then resized with
``interpolate`` and normalised there (:func:`prepare_batch`). All randomness of an
epoch (order, flips, dropout) is drawn from generators seeded by (seed, epoch), so
a resumed run repeats exactly what an uninterrupted one does.

Outputs in ``<paths.train>/<mode>/``: ``model.pt`` (lowest validation loss),
``checkpoint.pt`` (last epoch), ``history.json`` (one row per epoch, a DVC plots
file) and ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn
from tqdm import tqdm

from cvpipe.layout import MODES
from cvpipe.errors import UserError
from cvpipe.io import CorruptFile, atomic_path, file_hash, load_npz, read_json, save_npz, write_json
from cvpipe.params import Params, TrainParams
from tasks.backbones import (
    ImageClassifier,
    build_model,
    forward_features,
    freeze,
    get_backbone,
    get_head,
    normalize,
    set_bn_momentum,
    set_train_mode,
)
from tasks.amp import CACHE_FILE as AMP_CACHE, AmpChoice, choose_amp, dtype_name, model_step_timer
from tasks.download import MANIFEST
from tasks.preprocess import CARD, load_split

log = logging.getLogger(__name__)

MODEL, CHECKPOINT, HISTORY, METRICS, RUN = "model.pt", "checkpoint.pt", "history.json", "metrics.json", "run.json"
EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")
# Train params that may change between a checkpoint and its resumption: they do not change what an epoch computes.
RESUMABLE_KEYS = {"modes", "epochs", "fine_tune_epochs", "resume", "num_threads"}

Transform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


# --------------------------------------------------------------------------- runtime


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
    supported and full precision on a CPU. :func:`train` resolves ``auto`` on a CPU that may compute
    bf16 natively with a timed probe instead (:func:`resolve_amp`)."""
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
        return choose_amp(tp.amp, device, p.paths.cache / AMP_CACHE, fields, timer)


def make_runtime(p: Params) -> Runtime:
    """Resolve ``device``, ``train.amp``, ``train.channels_last`` and ``train.num_threads``."""
    if p.train.num_threads:
        torch.set_num_threads(p.train.num_threads)
    device = resolve_device(p.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Runtime(device, autocast_dtype(p.train.amp, device), p.train.channels_last)


def _autocast(rt: Runtime):
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Seed torch's global RNG (dropout, stochastic depth) and return a generator for order and flips."""
    s = seed * 100_003 + epoch
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


# --------------------------------------------------------------------------- input pipeline


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


def _identity(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return x


# --------------------------------------------------------------------------- epochs


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                    batch_size: int, transform: Transform, generator: torch.Generator, rt: Runtime,
                    desc: str = "train") -> dict[str, float]:
    """One pass over (x, y) in an order drawn from ``generator``; cross-entropy, one step per batch.

    Args:
        model: trained in place (frozen batch norms stay in eval mode).
        x, y: inputs on the CPU (uint8 images or float features) and int64 labels.
        transform: maps a device batch (and ``generator``) to the model's input.

    Returns:
        {"loss", "acc", "images", "seconds"} over the epoch.
    """
    set_train_mode(model)
    order = torch.randperm(len(y), generator=generator)
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), dtype=torch.long, device=rt.device)
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(y), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start:start + batch_size]
        xb = transform(x[idx].to(rt.device, non_blocking=True), generator)
        yb = y[idx].to(rt.device, non_blocking=True)
        with _autocast(rt):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(yb)
        correct += (logits.argmax(1) == yb).sum()
    seconds = time.perf_counter() - t0
    n = len(y)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "images": n, "seconds": seconds}


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, transform: Transform,
             rt: Runtime, desc: str = "eval") -> dict[str, Any]:
    """Loss, accuracy and predictions of ``model`` (eval mode) on (x, y).

    Returns:
        {"loss", "acc", "pred" (int64 numpy array), "seconds"}.
    """
    model.eval()
    loss_sum, preds = 0.0, []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(y), batch_size), desc=desc, unit="batch", leave=False):
        xb = transform(x[start:start + batch_size].to(rt.device, non_blocking=True), None)
        yb = y[start:start + batch_size].to(rt.device, non_blocking=True)
        with _autocast(rt):
            logits = model(xb).float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        preds.append(logits.argmax(1).cpu())
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    acc = float((pred == y.numpy()).mean()) if len(y) else 0.0
    return {"loss": loss_sum / max(len(y), 1), "acc": acc, "pred": pred, "seconds": time.perf_counter() - t0}


@torch.inference_mode()
def extract_features(model: nn.Module, backbone: str, x: torch.Tensor, *, batch_size: int,
                     transform: Transform, rt: Runtime, desc: str = "features") -> tuple[np.ndarray, float]:
    """Pooled backbone features (the classifier's input) for every image of ``x``.

    Returns:
        (float32 array (N, F), images per second).
    """
    spec = get_backbone(backbone)
    model.eval()
    out = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", leave=False):
        xb = transform(x[start:start + batch_size].to(rt.device, non_blocking=True), None)
        with _autocast(rt):
            out.append(forward_features(model, spec, xb).float().cpu())
    seconds = time.perf_counter() - t0
    return torch.cat(out).numpy(), len(x) / max(seconds, 1e-9)


# --------------------------------------------------------------------------- feature cache


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


# --------------------------------------------------------------------------- files


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states, for a checkpoint."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers, never arbitrary objects).

    Raises:
        CorruptFile: the file is truncated, not a PyTorch file, or holds pickled Python objects
            (the message names it).
    """
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running the file's code: never repeat it.
        raise CorruptFile(f"{path}: not a plain state dict: it holds pickled Python objects, which are "
                          "refused (they could run code); save only tensors and plain containers "
                          "(torch.save(model.state_dict(), path))") from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CorruptFile(f"{path}: not a readable PyTorch file, truncated or corrupt "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                          "delete it and run the stage that writes it again") from None


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> ImageClassifier:
    """Rebuild the classifier saved in ``model.pt`` (uint8 images in, logits out), in eval mode.

    Raises:
        CorruptFile: ``path`` is truncated, not a PyTorch file, or not a model written by ``train``.
    """
    ckpt = load_torch(path, map_location)
    keys = ("backbone", "classes", "state_dict", "image_size", "mean", "std", "interpolation")
    missing = [k for k in keys if k not in ckpt] if isinstance(ckpt, dict) else list(keys)
    if missing:
        raise CorruptFile(f"{path}: not a model written by `cvpipe train` (missing {', '.join(missing)}); "
                          "run `cvpipe train` to write it again")
    try:
        net = build_model(ckpt["backbone"], len(ckpt["classes"]))
        net.load_state_dict(ckpt["state_dict"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CorruptFile(f"{path}: its weights do not fit a {ckpt['backbone']} model "
                          f"({str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__}); "
                          "run `cvpipe train` to write it again") from None
    return ImageClassifier(net, ckpt["image_size"], ckpt["mean"], ckpt["std"], ckpt["classes"],
                           ckpt["interpolation"]).eval()


def resolve_weights(p: Params) -> tuple[Path | None, str]:
    """The weights file written by ``download`` and a tag identifying it (its sha256, or the random seed).

    Raises:
        FileNotFoundError: ``download`` has not provided weights for this backbone and source.
    """
    tp = p.train
    manifest_path = p.paths.backbone / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: run `cvpipe download` first")
    manifest = read_json(manifest_path)
    if (manifest.get("backbone"), manifest.get("weights")) != (tp.backbone, tp.weights):
        raise FileNotFoundError(
            f"{p.paths.backbone} holds {manifest.get('backbone')} weights {manifest.get('weights')!r}, but "
            f"train asks for {tp.backbone} weights {tp.weights!r}: run `cvpipe download` again")
    if manifest["file"] is None:
        return None, f"random-seed{p.seed}"
    path = p.paths.backbone / manifest["file"]
    actual = file_hash(path)
    if actual != manifest["sha256"]:
        raise FileNotFoundError(f"{path}: sha256 {actual} differs from its manifest; run `cvpipe download` again")
    return path, actual


def fingerprint(p: Params, mode: str, weights_tag: str, data_hash: str) -> dict[str, Any]:
    """What an epoch's computation depends on; a checkpoint resumes only under the same fingerprint."""
    train = {k: v for k, v in p.train.model_dump(mode="json").items() if k not in RESUMABLE_KEYS}
    return {"mode": mode, "seed": p.seed, "weights": weights_tag, "data_hash": data_hash, "train": train}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def resume_from(path: Path, fp: dict[str, Any], epochs: int, trainable: nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[int, list[dict], dict]:
    """Load a checkpoint into ``trainable`` and ``optimizer`` (and torch's RNG).

    Returns:
        (last epoch done, history so far, best epoch so far).

    Raises:
        ValueError: the checkpoint was made under another fingerprint, or is beyond ``epochs``.
    """
    ckpt = load_torch(path)
    if ckpt["fingerprint"] != fp:
        raise ValueError(f"cannot resume from {path}: it was made with other parameters:\n  "
                         + "\n  ".join(_diff(ckpt["fingerprint"], fp)))
    if ckpt["epoch"] > epochs:
        raise ValueError(f"{path} is at epoch {ckpt['epoch']}, beyond epochs={epochs}")
    trainable.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"], ckpt["history"], ckpt["best"]


# --------------------------------------------------------------------------- modes


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


def _feature_extractor_setup(model: nn.Module, p: Params, rt: Runtime, weights_tag: str, data_hash: str,
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
                     _identity, _identity, epoch_inputs, torch.from_numpy(feats["val"]),
                     {"feature_images_per_s": meta["images_per_s"], "feature_cache_hit": meta["cache_hit"]})


def _fine_tune_setup(model: nn.Module, tp: TrainParams, rt: Runtime, x_tr: torch.Tensor,
                     x_va: torch.Tensor) -> ModeSetup:
    """Train the whole model (less its frozen stages) on randomly flipped images."""
    train_tf, eval_tf = image_transforms(tp, rt)
    return ModeSetup(model, rt, train_tf, eval_tf, lambda g: x_tr, x_va, {})


# --------------------------------------------------------------------------- stage


def train(p: Params, mode: str, on_epoch: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train one mode and write its outputs; returns the final metrics.

    Args:
        p: parameters (``train``, ``seed``, ``device`` and ``paths``).
        mode: ``feature_extractor`` or ``fine_tune``.
        on_epoch: called with each epoch's row (epoch, train/val loss and accuracy, images/s).

    Raises:
        ValueError: unknown mode, train.image_size below the backbone's minimum, or a checkpoint
            made with other parameters when ``resume`` is on.
        FileNotFoundError: inputs from ``download`` / ``preprocess`` are missing.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if p.train.image_size < get_backbone(p.train.backbone).min_image_size:
        raise ValueError(f"train.image_size={p.train.image_size} is too small for {p.train.backbone}: "
                         f"it needs at least {get_backbone(p.train.backbone).min_image_size}")
    t_start = time.perf_counter()
    tp, rt = p.train, make_runtime(p)
    out = p.paths.train / mode
    out.mkdir(parents=True, exist_ok=True)
    card = read_json(p.paths.processed / CARD)
    classes = card["classes"]
    (x_tr, y_tr), (x_va, y_va) = (load_split(p.paths.processed, s) for s in ("train", "val"))
    x_tr, y_tr, x_va, y_va = map(torch.from_numpy, (x_tr, y_tr, x_va, y_va))
    weights_file, weights_tag = resolve_weights(p)
    fp = fingerprint(p, mode, weights_tag, card["data_hash"])

    torch.manual_seed(p.seed)  # the new head (and a random backbone) start from the seed
    model = build_model(tp.backbone, len(classes), weights_file)
    spec = get_backbone(tp.backbone)
    freeze(model, spec, None if mode == "feature_extractor" else tp.freeze_stages)
    if mode == "fine_tune" and tp.bn_momentum is not None:
        set_bn_momentum(model, tp.bn_momentum)
    model.to(rt.device, memory_format=rt.memory_format)
    amp = resolve_amp(p, mode, model, rt.device)
    rt = Runtime(rt.device, amp.dtype, rt.channels_last)
    print(f"train {mode}: amp {dtype_name(amp.dtype)} ({amp.source}"
          + (f", bf16 {amp.as_dict()['bf16_speedup']:.2f}x fp32 per step" if amp.fp32_s else "") + ")")

    if mode == "feature_extractor":
        setup = _feature_extractor_setup(model, p, rt, weights_tag, card["data_hash"], x_tr, x_va)
    else:
        setup = _fine_tune_setup(model, tp, rt, x_tr, x_va)
    trainable, x_va = setup.trainable, setup.x_val
    optimizer = torch.optim.Adam([q for q in trainable.parameters() if q.requires_grad], lr=tp.lr)
    epochs = tp.epochs_for(mode)
    history: list[dict[str, float]] = []
    best = {"epoch": 0, "val_loss": float("inf"), "val_acc": 0.0}
    start = 0
    if tp.resume and (out / CHECKPOINT).is_file():
        start, history, best = resume_from(out / CHECKPOINT, fp, epochs, trainable, optimizer)
        log.info("train %s: resuming after epoch %d of %d", mode, start, epochs)
    elif tp.resume:
        log.warning("train %s: resume is on but %s does not exist; starting at epoch 1", mode, out / CHECKPOINT)

    for epoch in range(start + 1, epochs + 1):
        g = epoch_generator(p.seed, epoch)
        tr = train_one_epoch(trainable, optimizer, setup.epoch_inputs(g), y_tr, batch_size=tp.batch_size,
                             transform=setup.train_tf, generator=g, rt=setup.rt, desc=f"{mode} {epoch}/{epochs}")
        va = evaluate(trainable, x_va, y_va, batch_size=tp.batch_size, transform=setup.eval_tf, rt=setup.rt,
                      desc=f"{mode} {epoch}/{epochs} val")
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
               "val_acc": va["acc"], "images_per_s": tr["images"] / tr["seconds"]}
        history.append(row)
        print(f"train {mode} epoch {epoch}/{epochs}: " + ", ".join(f"{k} {row[k]:.4f}" for k in EPOCH_KEYS)
              + f", {row['images_per_s']:.0f} images/s")
        # Validation loss picks the best epoch: on a small validation set accuracy moves in coarse,
        # noisy steps and tends to select an early epoch.
        if va["loss"] < best["val_loss"]:
            best = {"epoch": epoch, "val_acc": va["acc"], "val_loss": va["loss"]}
            save_torch(out / MODEL, {
                "backbone": tp.backbone, "classes": classes, "image_size": tp.image_size,
                "interpolation": tp.interpolation,
                "mean": list(tp.mean), "std": list(tp.std), "mode": mode, "epoch": epoch,
                "val_acc": va["acc"], "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}})
        save_torch(out / CHECKPOINT, {
            "epoch": epoch, "model": trainable.state_dict(), "optimizer": optimizer.state_dict(),
            "params": p.model_dump(mode="json"), "fingerprint": fp, "history": history, "best": best,
            "rng": rng_state()})
        write_json(out / HISTORY, history)
        if on_epoch is not None:
            on_epoch(row)

    last = history[-1]
    metrics = {"mode": mode, "backbone": tp.backbone, "epochs": len(history), "best_epoch": best["epoch"],
               "best_val_loss": best["val_loss"], "best_val_acc": best["val_acc"],
               **{k: last[k] for k in EPOCH_KEYS},
               "images_per_s": float(np.mean([r["images_per_s"] for r in history])), **setup.extra,
               "duration_s": time.perf_counter() - t_start, "device": str(rt.device),
               "amp": dtype_name(rt.amp_dtype), "amp_choice": amp.as_dict()}
    write_json(out / METRICS, metrics)
    return metrics


def model_for_logging(p: Params, mode: str, n_examples: int = 2):
    """The best model of ``mode`` in the registered model's flavour, an input example and its output.

    Returns:
        (:class:`cvpipe.model_flavor.Classifier` built from ``model.pt`` and the training images'
        channels and size, uint8 validation images (n_examples, C, H, W),
        its output {"logits", "probabilities"} on them).
    """
    from cvpipe.model_flavor import classifier_from_checkpoint

    ckpt = load_torch(p.paths.train / mode / MODEL)
    x, _ = load_split(p.paths.processed, "val")
    clf = classifier_from_checkpoint(ckpt, channels=x.shape[1], input_size=(x.shape[2], x.shape[3]))
    example = np.ascontiguousarray(x[:n_examples])
    return clf, example, clf.predict(example)


def inference_latency_ms(model: nn.Module, images: torch.Tensor, device: torch.device, warmup: int = 2) -> float:
    """Median wall time of one forward pass at batch 1, in milliseconds, over ``images`` (uint8 N, C, H, W).

    ``model`` is moved to ``device``; the first ``warmup`` passes (allocation, kernel choice) are not timed.
    """
    model = model.to(device).eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + len(images)):
            x = images[i % len(images)][None].to(device)
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def model_costs(p: Params, mode: str, device: str, n_images: int = 10) -> dict[str, float]:
    """What the best model of ``mode`` costs: parameters, size of ``model.pt`` and inference latency.

    Args:
        p: parameters (``paths``).
        mode: ``feature_extractor`` or ``fine_tune``.
        device: where the latency is measured (the training device).
        n_images: validation images timed one at a time (the model includes its preprocessing).

    Returns:
        {"n_params", "model_size_mb" (10^6 bytes), "latency_ms"}.
    """
    path = p.paths.train / mode / MODEL
    clf = load_classifier(path)
    x, _ = load_split(p.paths.processed, "val")
    return {"n_params": sum(q.numel() for q in clf.parameters()),
            "model_size_mb": path.stat().st_size / 1e6,
            "latency_ms": inference_latency_ms(clf, torch.from_numpy(x[:n_images]), torch.device(device))}


def write_run_id(p: Params, mode: str, run_id: str) -> None:
    """Record the MLflow run of a mode's model, so ``evaluate`` logs into the same run."""
    write_json(p.paths.train / mode / RUN, {"run_id": run_id})


train_task = task(train, name="train", cache_policy=NO_CACHE)
