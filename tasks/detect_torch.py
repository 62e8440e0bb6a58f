"""The ``torch`` backend of the ``detect`` stage: the Darknet network of :mod:`tasks.darknet` run by
PyTorch, on CUDA when there is one.

It overrides steps of :class:`tasks.predictor.Predictor`: ``network_input`` (the batch stays uint8),
``inference`` (uint8 pixels sent to the device as they are and scaled there;
``torch.inference_mode``; on CUDA bf16 autocast and channels_last) and ``postprocess`` (scores,
boxes in original pixels and class-aware NMS with ``torchvision.ops.batched_nms`` on the device,
so only the kept boxes come back to the host).
Preprocessing, reading and writing are the shared ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torchvision.ops import batched_nms

from cvpipe.layout import DETECTOR_CFG, DETECTOR_CLASSES, DETECTOR_WEIGHTS
from cvpipe.params import DetectParams
from tasks.darknet import Darknet, load_darknet
from tasks.boxes import Detections, split_per_image
from tasks.predictor import Batch, Predictor, read_classes


class TorchNet(NamedTuple):
    """A loaded network and the device it lives on."""

    model: Darknet
    device: torch.device


class TorchPredictor(Predictor):
    """YOLOv3 through PyTorch (see the module docstring)."""

    backend = "torch"

    @classmethod
    def load(cls, detector_dir: Path, dp: DetectParams, device: str) -> "TorchPredictor":
        """Build the network of the cfg file with the weights file (read as raw float32) on ``device``."""
        dev = torch.device(device)
        model = load_darknet((detector_dir / DETECTOR_CFG).read_text(), detector_dir / DETECTOR_WEIGHTS).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return cls(read_classes(detector_dir / DETECTOR_CLASSES), dp, TorchNet(model, dev))

    def network_input(self, pixels: list[np.ndarray]) -> np.ndarray:
        """(N, S, S, 3) uint8: a quarter of the float bytes go to the device, scaled there."""
        return np.stack(pixels)

    def inference(self, batch: Batch) -> list[torch.Tensor]:
        """The raw YOLO rows of the batch, on the device (float32)."""
        model, dev = self.det
        cuda = dev.type == "cuda"
        with torch.inference_mode():
            x = torch.from_numpy(batch.inputs)
            x = (x.pin_memory() if cuda else x).to(dev, non_blocking=cuda)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                rows = [r.float() for r in model(x)]
            if cuda:  # the network's time is counted here, not in whatever waits for it next
                torch.cuda.synchronize(dev)
            return rows

    def postprocess(self, outputs: list[torch.Tensor], batch: Batch) -> list[Detections]:
        """Score = objectness x class probability above ``detect.conf_threshold``, boxes mapped back
        to original pixels and clipped, class-aware NMS per image, all on the device."""
        dev = outputs[0].device
        with torch.inference_mode():
            rows = torch.cat(outputs, 1)
            scores, class_ids = rows[..., 5:].max(-1)
            img, r = torch.nonzero(scores > self.dp.conf_threshold, as_tuple=True)
            sizes = torch.as_tensor(batch.sizes, dtype=torch.float32, device=dev)[img]
            frames = torch.as_tensor(batch.frames, dtype=torch.float32, device=dev)[img]
            sel = rows[img, r]
            centre = (sel[:, 0:2] - frames[:, 2:]) / frames[:, :2]
            half = sel[:, 2:4] / frames[:, :2] / 2
            top_left = torch.minimum((centre - half).clamp(min=0), sizes)
            bottom_right = torch.minimum((centre + half).clamp(min=0), sizes)
            wh = bottom_right - top_left
            keep = (wh > 0).all(1)
            xyxy, scores, class_ids, img = (torch.cat([top_left, bottom_right], 1)[keep], scores[img, r][keep],
                                            class_ids[img, r][keep], img[keep])
            kept = batched_nms(xyxy, scores, img * len(self.classes) + class_ids, self.dp.nms_threshold)
            order = np.lexsort((-scores[kept].cpu().numpy(), img[kept].cpu().numpy()))
            kept = kept.cpu().numpy()[order]
            xyxy, scores, class_ids, img = (t.cpu().numpy() for t in (xyxy, scores, class_ids, img))
        boxes = np.concatenate([xyxy[kept, :2], xyxy[kept, 2:] - xyxy[kept, :2]], 1).astype(np.float64)
        dets = Detections(img[kept].astype(np.int64), boxes, scores[kept], class_ids[kept].astype(np.int64))
        return split_per_image(dets, len(batch.sizes))
