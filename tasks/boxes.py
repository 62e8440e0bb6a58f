"""Box geometry of the ``detect`` stage: fitting an image to the network's square input (letterbox
or stretch), decoding YOLO rows into boxes in original pixels, and class-aware NMS.

Pure array code shared by every backend: :class:`tasks.predictor.Predictor` uses all of it; the
torch backend (:mod:`tasks.detect_torch`) does its own decoding and NMS on the device and shares
:class:`Detections` and :func:`split_per_image`.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np


class Detections(NamedTuple):
    """Detections as parallel arrays: ``image`` (index in the batch), ``boxes`` (x, y, w, h in
    original pixels), ``scores`` and ``class_ids``."""

    image: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def select(self, idx: np.ndarray) -> "Detections":
        return Detections(*(a[idx] for a in self))


def fit_image(image: np.ndarray, size: int, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """``image`` as the network sees it, and how its coordinates map there.

    ``stretch`` resizes to ``size`` x ``size`` whatever the aspect ratio (what
    ``blobFromImages`` does). ``letterbox`` keeps the aspect ratio: the image is resized to
    fit (its longer side becomes ``size``) and centred on a grey (127) square, as Darknet does.

    Returns:
        (the uint8 ``size`` x ``size`` x 3 image, its frame ``(kx, ky, ox, oy)``): a point ``x``
        in original pixels lies at ``x * kx + ox`` in the network's relative coordinates (0..1).
        Both sizes are whole pixels, so the frame is exact for the resized content.
    """
    h, w = image.shape[:2]
    if resize == "stretch":
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR), np.array([1 / w, 1 / h, 0.0, 0.0])
    s = min(size / w, size / h)
    nw, nh = max(1, min(size, round(w * s))), max(1, min(size, round(h * s)))
    x0, y0 = (size - nw) // 2, (size - nh) // 2
    out = np.full((size, size, 3), 127, np.uint8)
    out[y0:y0 + nh, x0:x0 + nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return out, np.array([nw / (w * size), nh / (h * size), x0 / size, y0 / size])


def decode(outputs: list[np.ndarray], sizes: np.ndarray, conf_threshold: float,
           frames: np.ndarray | None = None) -> Detections:
    """Turn raw YOLO layer outputs into boxes in original pixel coordinates, with array operations.

    Each output row is ``cx, cy, w, h, objectness, s_0 .. s_{C-1}`` with the box relative to
    the network input. OpenCV's YOLO layer already writes ``s_c = objectness x P(class c |
    object)`` (it multiplies in place), so the score of a row is its best ``s_c`` and its
    class that ``c``. The seed thresholded ``objectness`` (column 4) alone: a box sure that
    *something* is there but torn between classes passed with a high score, and the class
    probability never lowered it. Here a box passes only when objectness x class probability
    is above ``conf_threshold``.

    Args:
        outputs: per output layer, (N, R_l, 5 + C), or (R_l, 5 + C) when N is 1 (OpenCV drops
            the batch axis then).
        sizes: (N, 2) original (width, height) of each image.
        conf_threshold: keep rows whose score is strictly above it.
        frames: (N, 4) ``(kx, ky, ox, oy)`` of each image from :func:`fit_image`; None for a
            stretched image (``kx = 1 / width``, no offset).

    Returns:
        The kept rows (one class each), boxes clipped to their image; boxes with no area
        left after clipping are dropped.
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    n = len(sizes)
    if frames is None:  # stretched: relative coordinates times the image's own width and height
        frames = np.concatenate([1 / sizes, np.zeros_like(sizes)], axis=1)
    frames = np.asarray(frames, dtype=np.float64).reshape(n, 4)
    rows = np.concatenate([np.asarray(o, np.float32).reshape(n, -1, o.shape[-1]) for o in outputs], axis=1)
    class_scores = rows[..., 5:]
    class_ids = class_scores.argmax(axis=-1)
    scores = np.take_along_axis(class_scores, class_ids[..., None], axis=-1)[..., 0]
    img, row = np.nonzero(scores > conf_threshold)
    wh, scale, offset = sizes[img], frames[img, :2], frames[img, 2:]
    centre = (rows[img, row, 0:2].astype(np.float64) - offset) / scale
    half = rows[img, row, 2:4].astype(np.float64) / scale / 2
    top_left = np.clip(centre - half, 0, wh)
    bottom_right = np.clip(centre + half, 0, wh)
    boxes = np.concatenate([top_left, bottom_right - top_left], axis=1)
    keep = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    return Detections(img, boxes, scores[img, row], class_ids[img, row]).select(keep)


def nms(dets: Detections, num_classes: int, iou_threshold: float) -> Detections:
    """Class-aware NMS over a whole batch with ``cv2.dnn.NMSBoxesBatched``.

    Boxes are grouped by (image, class): a box only suppresses boxes of the same class in
    the same image whose IoU with it is above ``iou_threshold``.

    Returns:
        The kept detections, ordered by image, then by descending score.
    """
    if len(dets.scores) == 0:
        return dets
    groups = dets.image.astype(np.int64) * num_classes + dets.class_ids
    keep = cv2.dnn.NMSBoxesBatched(dets.boxes.tolist(), dets.scores.astype(float).tolist(),
                                   groups.tolist(), 0.0, iou_threshold)
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)
    kept = dets.select(keep)
    return kept.select(np.lexsort((-kept.scores, kept.image)))


def split_per_image(dets: Detections, n: int) -> list[Detections]:
    """One :class:`Detections` per image of a batch of ``n`` (``image`` all zero)."""
    per_image = []
    for i in range(n):
        d = dets.select(dets.image == i)
        per_image.append(d._replace(image=np.zeros_like(d.image)))
    return per_image


def postprocess(outputs: list[np.ndarray], sizes: np.ndarray, num_classes: int,
                conf_threshold: float, iou_threshold: float, frames: np.ndarray | None = None) -> list[Detections]:
    """Decode + NMS for a batch; one :class:`Detections` per image (``image`` all zero)."""
    dets = nms(decode(outputs, sizes, conf_threshold, frames), num_classes, iou_threshold)
    return split_per_image(dets, len(sizes))
