"""The ``train`` stage: transfer learning in two modes from one epoch loop.

``feature_extractor`` trains a new head on cached features of the frozen backbone;
``fine_tune`` trains every weight not in the first ``freeze_stages`` stages on randomly flipped
images (:mod:`tasks.modes`). The loop itself (:mod:`tasks.engine`) draws all randomness of an
epoch from generators seeded by (seed, epoch), and each epoch ends with a checkpoint
(:mod:`tasks.checkpoints`), so a resumed run repeats exactly what an uninterrupted one does.

Outputs in ``<paths.train>/<mode>/``: ``model.pt`` (lowest validation loss),
``checkpoint.pt`` (last epoch), ``history.json`` (one row per epoch, a DVC plots
file) and ``metrics.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from cvpipe.io import read_json, write_json
from cvpipe.layout import CARD, CHECKPOINT, HISTORY, MODEL, MODES, TRAIN_METRICS
from cvpipe.params import Params
from tasks.amp import dtype_name
from tasks.backbones import build_model, freeze, get_backbone, set_bn_momentum
from tasks.checkpoints import fingerprint, load_classifier, resolve_weights, resume_from, rng_state, save_torch
from tasks.engine import epoch_generator, evaluate, train_one_epoch
from tasks.modes import feature_extractor_setup, fine_tune_setup
from tasks.runtime import Runtime, make_runtime, resolve_amp
from tasks.splits import load_split

log = logging.getLogger(__name__)

EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")


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
        setup = feature_extractor_setup(model, p, rt, weights_tag, card["data_hash"], x_tr, x_va)
    else:
        setup = fine_tune_setup(model, tp, rt, x_tr, x_va)
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
    write_json(out / TRAIN_METRICS, metrics)
    return metrics


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
