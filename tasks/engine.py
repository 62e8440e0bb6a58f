"""The loops: one training epoch, one evaluation pass and one feature-extraction pass, each a plain
function of a model, tensors, a transform and a :class:`~tasks.runtime.Runtime`.

All randomness of an epoch (order, flips, dropout) is drawn from generators seeded by
(seed, epoch) (:func:`epoch_generator`), so a resumed run repeats exactly what an uninterrupted
one does.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tasks.backbones import forward_features, get_backbone, set_train_mode
from tasks.runtime import Runtime, autocast
from tasks.transforms import Transform


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Seed torch's global RNG (dropout, stochastic depth) and return a generator for order and flips."""
    s = seed * 100_003 + epoch
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


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
        with autocast(rt):
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
        with autocast(rt):
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
        with autocast(rt):
            out.append(forward_features(model, spec, xb).float().cpu())
    seconds = time.perf_counter() - t0
    return torch.cat(out).numpy(), len(x) / max(seconds, 1e-9)
