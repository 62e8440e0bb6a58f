"""Annotated images of the ``detect`` stage: boxes in class colours with ``class:score`` captions
drawn on a copy of the photo, and the JPEG bytes written to ``paths.detect``'s annotated folder."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

from tasks.boxes import Detections


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A stable, distinct RGB colour per class (hues spaced by the golden ratio)."""
    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, dets: Detections, classes: list[str]) -> np.ndarray:
    """A copy of the RGB ``image`` with each box in its class colour and a ``class:score`` caption."""
    out = np.ascontiguousarray(image).copy()
    h_img, w_img = out.shape[:2]
    thickness = max(1, round(min(h_img, w_img) / 400))
    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, min(h_img, w_img) / 1000)
    for (x, y, w, h), score, c in zip(dets.boxes, dets.scores, dets.class_ids):
        colour = class_colour(int(c))
        x1, y1, x2, y2 = (int(round(v)) for v in (x, y, x + w, y + h))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        caption = f"{classes[c]}:{score:.2f}"
        (tw, th), base = cv2.getTextSize(caption, font, font_scale, 1)
        label_h = th + base + 2
        top = y1 - label_h if y1 >= label_h else y1  # above the box when there is room
        cv2.rectangle(out, (x1, top), (x1 + tw + 2, top + label_h), colour, -1)
        ink = (0, 0, 0) if sum(colour) > 382 else (255, 255, 255)
        cv2.putText(out, caption, (x1 + 1, top + th + 1), font, font_scale, ink, 1, cv2.LINE_AA)
    return out


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB image."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
