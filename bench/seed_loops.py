"""The seed's training and detection loops, made runnable on our data, as the baseline of the benchmark.

These reproduce what the book's script did, on purpose: per-image PIL resizing in DataLoader
workers, ``model.train()`` on a frozen backbone, a full backbone forward every epoch, fp32
contiguous tensors, and a detection decode that visits every output row in Python.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T


class PilImages(Dataset):
    """uint8 (N, 1 or 3, H, W) images served as PIL images through a torchvision transform."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: T.Compose):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = self.x[i]
        pil = Image.fromarray(img[0]).convert("RGB") if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))
        return self.transform(pil), int(self.y[i])


def seed_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], hflip: bool,
                    vflip: bool) -> tuple[T.Compose, T.Compose]:
    """The seed's (train, test) transforms: PIL ``Resize``, random flips, ``ToTensor``, ``Normalize``."""
    flips = ([T.RandomHorizontalFlip()] if hflip else []) + ([T.RandomVerticalFlip()] if vflip else [])
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose([T.Resize(image_size), *flips, *tail]), T.Compose([T.Resize(image_size), *tail])


def seed_loader(x: np.ndarray, y: np.ndarray, transform: T.Compose, batch_size: int, shuffle: bool,
                workers: int, seed: int) -> DataLoader:
    return DataLoader(PilImages(x, y, transform), batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))


def seed_train(model: nn.Module, params: list[nn.Parameter], loader: DataLoader, *, epochs: int = 1,
               max_steps: int | None = None, lr: float = 1e-3, device: torch.device = torch.device("cpu")) -> dict:
    """The seed's loop: ``model.train()``, the full model forward on every batch, Adam on ``params``.

    Returns:
        {"seconds", "images", "steps", "loss"} of the training loop (worker start-up included).
    """
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    steps = images = 0
    loss = torch.zeros(())
    t0 = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps, images = steps + 1, images + len(yb)
            if max_steps is not None and steps >= max_steps:
                break
    return {"seconds": time.perf_counter() - t0, "images": images, "steps": steps, "loss": float(loss.detach())}


@torch.no_grad()
def seed_accuracy(model: nn.Module, loader: DataLoader, device: torch.device = torch.device("cpu")) -> dict:
    """Test accuracy with ``model.eval()``; {"acc", "seconds"}."""
    model.eval()
    correct = n = 0
    t0 = time.perf_counter()
    for xb, yb in loader:
        correct += int((model(xb.to(device)).argmax(1).cpu() == yb).sum())
        n += len(yb)
    return {"acc": correct / max(n, 1), "seconds": time.perf_counter() - t0}


def seed_detect(net: cv2.dnn.Net, output_names: list[str], paths: Sequence[str], input_size: int,
                conf_threshold: float, nms_threshold: float) -> list[list[tuple[int, float, list[int]]]]:
    """The seed's detection: one ``blobFromImage`` per image, a Python loop over every output row
    with an objectness threshold, then ``NMSBoxes`` after the loop.

    Returns:
        Per image, (class id, confidence, [x, y, w, h]) of the kept boxes.
    """
    results = []
    for path in paths:
        img = cv2.imread(str(path))
        h, w = img.shape[:2]
        blob = cv2.dnn.blobFromImage(img, 1 / 255.0, (input_size, input_size), swapRB=True, crop=False)
        net.setInput(blob)
        outs = net.forward(output_names)
        boxes, confidences, class_ids = [], [], []
        for out in outs:
            for row in out:
                scores = row[5:]
                class_id = int(np.argmax(scores))
                confidence = float(scores[class_id])
                if row[4] > conf_threshold:
                    cx, cy, bw, bh = row[0] * w, row[1] * h, row[2] * w, row[3] * h
                    boxes.append([int(cx - bw / 2), int(cy - bh / 2), int(bw), int(bh)])
                    confidences.append(confidence)
                    class_ids.append(class_id)
        keep = cv2.dnn.NMSBoxes(boxes, confidences, conf_threshold, nms_threshold) if boxes else []
        results.append([(class_ids[i], confidences[i], boxes[i]) for i in np.asarray(keep).reshape(-1)])
    return results
