"""The seed experiment's training at full size on one accelerator: how fast, and how long it would take.

CIFAR-10-sized data (50,000 x 3 x 32 x 32 uint8, generated) lives on the device; each batch is
flipped, resized to 224 and normalised there by our own transforms (no DataLoader, no host copy);
ResNet-18 (random weights: speed does not depend on them) runs under bf16 autocast, channels_last.
Feature extraction is our ``extract_features``, fine-tuning our ``train_one_epoch``, each after one
untimed warm-up batch (cuDNN's algorithm search). The projection is the seed experiment's
fine-tune: 5 epochs over 50,000 images plus a test pass over 10,000.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from cvpipe.params import TrainParams
from tasks.backbones import build_model, freeze, get_backbone
from tasks.engine import epoch_generator, extract_features, train_one_epoch
from tasks.runtime import Runtime
from tasks.transforms import image_transforms

BACKBONE = "resnet18"
SEED_EPOCHS, SEED_TRAIN, SEED_TEST = 5, 50_000, 10_000
GOAL_S = 60.0  # the seed experiment's fine-tune on one H200


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_throughput(tp: TrainParams, device: torch.device, *, n_images: int, image_size: int, batch_size: int,
                   steps: int, amp: torch.dtype | None = torch.bfloat16) -> dict[str, Any]:
    """Images/s of feature extraction and fine-tuning of ResNet-18 on device-resident uint8 data.

    Args:
        tp: train parameters (mean, std, interpolation, flips, lr); backbone and sizes come from here.
        n_images: generated images held on the device (50,000 for CIFAR-10's training set).
        image_size: the size each batch is resized to on the device (224 for the seed).
        batch_size, steps: each measurement runs ``steps`` batches after one warm-up batch.

    Returns:
        {"fe_images_per_s", "ft_images_per_s", "projected_seed_ft_s", ...}.
    """
    tp = tp.model_copy(update={"backbone": BACKBONE, "image_size": image_size, "batch_size": batch_size})
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    g = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    x = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, device=device, generator=g)
    y = torch.randint(0, 10, (n_images,), device=device, generator=g)
    _sync(device)
    gen_s = time.perf_counter() - t0
    rt = Runtime(device, amp, True)
    train_tf, eval_tf = image_transforms(tp, rt)
    n = min(steps * batch_size, n_images)
    warm = min(batch_size, n_images)

    torch.manual_seed(0)
    model = build_model(BACKBONE, 10).to(device, memory_format=torch.channels_last)
    freeze(model, get_backbone(BACKBONE), None)
    extract_features(model, BACKBONE, x[:warm], batch_size=batch_size, transform=eval_tf, rt=rt, desc="warm-up")
    _sync(device)
    t0 = time.perf_counter()
    feats, _ = extract_features(model, BACKBONE, x[:n], batch_size=batch_size, transform=eval_tf, rt=rt,
                                desc="gpu features")
    _sync(device)
    fe_ips = n / (time.perf_counter() - t0)

    torch.manual_seed(0)
    model = build_model(BACKBONE, 10).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=tp.lr)
    gen = epoch_generator(0, 1)
    train_one_epoch(model, opt, x[:warm], y[:warm], batch_size=batch_size, transform=train_tf, generator=gen, rt=rt,
                    desc="warm-up")
    _sync(device)
    t0 = time.perf_counter()
    stats = train_one_epoch(model, opt, x[:n], y[:n], batch_size=batch_size, transform=train_tf, generator=gen,
                            rt=rt, desc="gpu fine_tune")
    _sync(device)
    ft_ips = n / (time.perf_counter() - t0)
    projected = SEED_EPOCHS * SEED_TRAIN / ft_ips + SEED_TEST / fe_ips
    return {"backbone": BACKBONE, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "amp": str(amp).replace("torch.", "") if amp else "off", "channels_last": True,
            "n_images": n_images, "image_size": image_size, "batch_size": batch_size, "steps": steps,
            "measured_images": n, "generate_s": gen_s, "feature_dim": int(feats.shape[1]),
            "fe_images_per_s": fe_ips, "ft_images_per_s": ft_ips, "ft_loss": stats["loss"],
            "projected_seed_ft_s": projected, "goal_s": GOAL_S,
            "projected_seed_fe_s": (SEED_TRAIN + SEED_TEST) / fe_ips}
