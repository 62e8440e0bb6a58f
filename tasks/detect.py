"""The ``detect`` stage: YOLOv3 (Darknet files) over a batch of images, through OpenCV's DNN module
or PyTorch (:mod:`tasks.detect_torch`, for GPUs).

A :class:`Predictor` runs ``preprocess -> inference -> postprocess``, each timed: images are
read as RGB on a reader thread (a bad file becomes a failure with its reason and the batch goes
on) and resized (``detect.resize``: letterbox or stretch) into one batch, run through the
network, decoded with array operations into boxes in original pixels and filtered by
class-aware NMS; annotated images are drawn and written on a writer thread. Shards of the
input list are independent, so the flow maps them over any Prefect task runner; shards on
threads of one process share one network and take turns at it. The outputs are written once,
from the merged shard results.

Outputs (under ``paths.detect``): ``detections.jsonl``, ``coco_results.json``,
``detections.csv``, ``failures.json``, ``metrics.json`` (headline figures), ``summary.json`` and, when
``detect.save_images``, annotated JPEGs in ``images/``.

The outputs are one set: a run writes all of them into a staging folder next to
``paths.detect`` and swaps it in only when every file is written, so a reader never
sees files of two runs, and a failed run (a bad shard, a full disk, a kill) leaves the
previous set as it was. The stage replaces ``paths.detect`` as a whole, so it refuses a
folder holding anything it did not write, and inputs that lie inside it.
"""

from __future__ import annotations

import colorsys
import contextlib
import csv
import errno
import glob
import io
import json
import os
import queue
import re
import secrets
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from cvpipe.io import (ChecksumError, atomic_write_bytes, atomic_write_text, read_json, verify_file,
                       write_json)
from cvpipe.errors import UserError
from cvpipe.params import DetectParams, Params, ParamsError
from tasks.download import DETECTOR_FILES, MANIFEST
from tasks.preprocess import IMAGE_SUFFIXES, read_image

IMAGES_DIR = "images"
DETECTIONS = "detections.jsonl"
COCO_RESULTS = "coco_results.json"
CSV_FILE = "detections.csv"
FAILURES = "failures.json"
METRICS = "metrics.json"
SUMMARY = "summary.json"
OUTPUT_FILES = (DETECTIONS, COCO_RESULTS, CSV_FILE, FAILURES, METRICS, SUMMARY)
#: The figures of ``metrics.json`` (a DVC metrics file: `dvc metrics show` has one column per key);
#: detections per class and seconds per phase are in ``summary.json``.
HEADLINE = ("inputs", "images", "failures", "detections", "images_per_s", "forward_images_per_s",
            "map50", "map50_95", "annotated_images")
DVC_GITIGNORE = ".gitignore"  # DVC lists the outputs it tracks in this folder's .gitignore
STAGING, ASIDE = "staging", "old"  # sibling folders ".<name>.staging-<hex>" and ".<name>.old-<hex>"
#: a temporary file left by cvpipe.io.atomic_path (".<name>.<random>.tmp") when a run was killed
ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")

#: COCO category id of each of the 80 Darknet ``coco.names`` classes, in file order
#: (the ids the official COCO annotation files use; 91 ids with gaps).
COCO80_TO_91 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)


class InputImage(NamedTuple):
    """One input: ``image_id`` (1-based position in the input list), ``path`` as listed
    (written to the outputs), ``file`` (absolute, what a worker opens) and ``out_name``
    (its annotated JPEG's file name, unique within the run)."""

    image_id: int
    path: str
    file: str
    out_name: str


class Detections(NamedTuple):
    """Detections as parallel arrays: ``image`` (index in the batch), ``boxes`` (x, y, w, h in
    original pixels), ``scores`` and ``class_ids``."""

    image: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def select(self, idx: np.ndarray) -> "Detections":
        return Detections(*(a[idx] for a in self))


class Detector(NamedTuple):
    """A loaded network, the names of its YOLO output layers and its class names."""

    net: cv2.dnn.Net
    output_names: list[str]
    classes: list[str]


# --------------------------------------------------------------------------- inputs


def list_inputs(spec: str) -> list[Path]:
    """The images named by ``detect.input``.

    An entry named like an image that is not a readable file (a directory called
    ``x.jpg``, a symbolic link loop, a dangling link) is still an input, so it becomes a
    failure with its reason instead of vanishing without a record.

    Args:
        spec: a folder (its entries with an image suffix, sorted, not recursive), a ``.txt``
            file (one path per line; blank lines and ``#`` comments skipped; relative paths
            are relative to the list file's folder; every listed path is an input, so a
            missing one becomes a failure), or a glob (``**`` recursive; the files it
            matches and the other entries with an image suffix; a plain file path is a glob
            that matches itself).

    Raises:
        FileNotFoundError: nothing matches ``spec``.
    """
    src = Path(spec)
    if src.is_dir():
        paths = sorted(f for f in src.iterdir() if not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
    elif src.suffix.lower() == ".txt" and src.is_file():
        lines = (ln.strip() for ln in src.read_text().splitlines())
        paths = [src.parent / ln for ln in lines if ln and not ln.startswith("#")]
    else:
        paths = [Path(f) for f in sorted(glob.glob(spec, recursive=True))
                 if Path(f).is_file() or Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise FileNotFoundError(f"detect.input {spec!r}: no images found (expected a folder, a .txt list or a glob)")
    return paths


def plan_inputs(paths: list[Path]) -> list[InputImage]:
    """Number the inputs and give each an annotated-image name unique within the run.

    The name is ``<stem>.jpg``; when an earlier input already took it, ``<stem>_<image_id>.jpg``,
    then ``<stem>_<image_id>_2.jpg``... (``x/a_3.jpg``, ``x/a.jpg``, ``y/a.jpg`` give ``a_3.jpg``,
    ``a.jpg``, ``a_3_2.jpg``). Names are compared case-insensitively, as a macOS or Windows
    disk would. Paths are made absolute without failing: a symbolic link loop stays an
    input, and reading it is what fails.
    """
    seen: set[str] = set()
    items = []
    for i, path in enumerate(paths, start=1):
        name, k = f"{path.stem}.jpg", 1
        while name.casefold() in seen:
            name = f"{path.stem}_{i}.jpg" if k == 1 else f"{path.stem}_{i}_{k}.jpg"
            k += 1
        seen.add(name.casefold())
        # os.path.realpath, unlike Path.resolve, returns a looping link unresolved instead of raising
        items.append(InputImage(i, str(path), os.path.realpath(path), name))
    return items


def split_shards(items: list, n: int) -> list[list]:
    """Split ``items`` into at most ``n`` contiguous, non-empty shards of near-equal size."""
    n = max(1, min(n, len(items)))
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------- model


def read_classes(path: Path) -> list[str]:
    """Class names, one per line (Darknet ``coco.names``)."""
    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]


def check_detector(detector_dir: Path, model: str) -> None:
    """Fail early when ``detector_dir`` does not hold the files of ``model``.

    Raises:
        FileNotFoundError: a file is missing, or the manifest names another model.
        ChecksumError: a file differs from the digest in the manifest (truncated or modified).
    """
    hint = "run `cvpipe download` (or `dvc repro download`) with the same detect.model"
    missing = [f for f in (*DETECTOR_FILES, MANIFEST) if not (detector_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"detector files {missing} not found in {detector_dir}: {hint}")
    found = read_json(detector_dir / MANIFEST).get("model")
    if found != model:
        raise FileNotFoundError(f"{detector_dir} holds {found} files but detect.model is {model}: {hint}")
    # OpenCV reads a truncated Darknet weights file without complaint (the missing weights stay
    # uninitialised), so the pinned digests are checked here.
    for name, entry in read_json(detector_dir / MANIFEST).get("files", {}).items():
        if entry.get("sha256"):
            try:
                verify_file(detector_dir / name, entry["sha256"], name=f"{model} {name}")
            except ChecksumError as err:
                raise ChecksumError(f"{err} (truncated or modified): {hint}") from None


def with_layer_threshold(cfg: str, threshold: float) -> str:
    """Set ``thresh`` in every ``[yolo]`` section of a Darknet cfg.

    OpenCV's YOLO layer zeroes every class score at or below its ``thresh`` (0.2 when
    the cfg has none, as the official ones), which would silently floor
    ``detect.conf_threshold`` at 0.2; setting it to the requested threshold makes
    every value honoured.
    """
    sections = re.split(r"(?m)^(?=\[)", cfg)
    out = []
    for sec in sections:
        if re.match(r"\[yolo\]", sec):
            sec = re.sub(r"(?m)^\s*thresh\s*=.*\n?", "", sec)
            sec = sec.replace("[yolo]", f"[yolo]\nthresh={threshold!r}", 1)
        out.append(sec)
    return "".join(out)


def load_detector(detector_dir: Path, conf_threshold: float) -> Detector:
    """Read the Darknet cfg and weights with ``cv2.dnn.readNetFromDarknet`` (CPU backend)."""
    detector_dir = Path(detector_dir)
    cfg = with_layer_threshold((detector_dir / "model.cfg").read_text(), conf_threshold)
    net = cv2.dnn.readNetFromDarknet(np.frombuffer(cfg.encode(), np.uint8),
                                     np.fromfile(detector_dir / "model.weights", np.uint8))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    return Detector(net, list(net.getUnconnectedOutLayersNames()), read_classes(detector_dir / "classes.txt"))


# --------------------------------------------------------------------------- inference


def make_blob(images: list[np.ndarray], size: int) -> np.ndarray:
    """One NCHW float blob of RGB ``images`` resized to ``size`` x ``size`` (no letterbox,
    no crop; values scaled to [0, 1]), so box coordinates map back by the image's own
    width and height."""
    return cv2.dnn.blobFromImages(images, scalefactor=1 / 255.0, size=(size, size), swapRB=False, crop=False)


def forward(det: Detector, blob: np.ndarray) -> list[np.ndarray]:
    """Run the network on a blob; one array per YOLO output layer."""
    det.net.setInput(blob)
    return list(det.net.forward(det.output_names))


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


class Batch(NamedTuple):
    """A prepared batch: ``inputs`` the network's input in the form its backend takes (OpenCV: an
    NCHW float blob in [0, 1]; torch: (N, S, S, 3) uint8), ``sizes`` (N, 2) original (width,
    height), ``frames`` (N, 4) from :func:`fit_image`."""

    inputs: np.ndarray
    sizes: np.ndarray
    frames: np.ndarray


class Predictor:
    """YOLOv3 on a batch as ``preprocess -> inference -> postprocess``, through OpenCV's DNN module.

    ``preprocess`` runs on the reader thread (overlapped with the network), ``inference`` and
    ``postprocess`` on the shard's own thread. Another backend overrides ``inference`` (and,
    where it can do better, ``postprocess``); the loop in :func:`detect_shard` is shared.
    """

    backend = "opencv"

    def __init__(self, classes: list[str], dp: DetectParams, det: Detector | None = None):
        self.classes, self.dp, self.det = classes, dp, det

    def preprocess(self, images: list[np.ndarray]) -> Batch:
        """Resize (``detect.resize``) each image and make the batch's network input."""
        fitted = [fit_image(im, self.dp.input_size, self.dp.resize) for im in images]
        return Batch(self.network_input([f[0] for f in fitted]),
                     np.array([(im.shape[1], im.shape[0]) for im in images]), np.stack([f[1] for f in fitted]))

    def network_input(self, pixels: list[np.ndarray]) -> np.ndarray:
        """The fitted uint8 images as the network takes them: one NCHW float blob in [0, 1] (made on
        the reader thread, so the conversion stays off the network's path)."""
        return cv2.dnn.blobFromImages(pixels, scalefactor=1 / 255.0, swapRB=False, crop=False)

    def inference(self, batch: Batch) -> list[np.ndarray]:
        """The raw YOLO rows of the batch (one array per output layer)."""
        return forward(self.det, batch.inputs)

    def postprocess(self, outputs, batch: Batch) -> list[Detections]:
        """Boxes in original pixels after class-aware NMS, one :class:`Detections` per image."""
        return postprocess(outputs, batch.sizes, len(self.classes), self.dp.conf_threshold,
                           self.dp.nms_threshold, batch.frames)


def cuda_available() -> bool:
    """Whether PyTorch sees a CUDA device. On Linux without a GPU driver (no NVIDIA or ROCm device
    files) the answer is no without importing torch, which costs seconds an OpenCV run never needs."""
    if "torch" not in sys.modules and sys.platform == "linux" and not any(
            os.path.exists(f) for f in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend(backend: str, device: str) -> tuple[str, str]:
    """The backend and device a run uses: ``auto`` is torch when CUDA is there, OpenCV otherwise;
    the torch backend's device follows ``device`` (``auto``: CUDA when available).

    Raises:
        ParamsError: CUDA asked for but not available, or ``device: cuda`` with the OpenCV backend
            (pip's OpenCV has no CUDA; nothing is switched silently).
    """
    cuda = cuda_available() if device != "cpu" else False
    if device == "cuda" and not cuda:
        raise ParamsError("device: cuda, but PyTorch finds no CUDA device: set device to auto or cpu")
    if backend == "auto":
        backend = "torch" if (cuda and device != "cpu") else "opencv"
    if backend == "opencv":
        if device == "cuda":
            raise ParamsError("device: cuda with detect.backend: opencv (OpenCV from pip runs on the CPU only): "
                              "set detect.backend to torch or auto")
        return "opencv", "cpu"
    return "torch", "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"


_PREDICTORS: dict[tuple, Predictor] = {}
_PREDICTORS_LOCK = threading.Lock()
#: One network runs at a time in a process: each uses every core it is given (OpenCV's and
#: torch's thread counts are process-wide), so two forwards at once would only fight for them.
COMPUTE_LOCK = threading.Lock()


def _files_key(detector_dir: Path) -> tuple:
    return tuple((f, st.st_size, st.st_mtime_ns, st.st_ino)
                 for f in ("model.cfg", "model.weights", "classes.txt")
                 for st in [(Path(detector_dir) / f).stat()])


def load_predictor(detector_dir: Path, dp: DetectParams, device: str = "auto") -> Predictor:
    """The predictor of ``detect.backend`` for the files in ``detector_dir``, loaded once per
    process and shared by the shards that run in it (they take turns at the network; see
    :data:`COMPUTE_LOCK`). A changed file (size, time, inode) is loaded afresh."""
    backend, dev = resolve_backend(dp.backend, device)
    key = (str(Path(detector_dir).resolve()), _files_key(detector_dir), backend, dev, dp.conf_threshold)
    with _PREDICTORS_LOCK:
        cached = _PREDICTORS.get(key)
        if cached is None:
            if backend == "torch":
                from tasks.detect_torch import TorchPredictor

                cached = TorchPredictor.load(Path(detector_dir), dp, dev)
            else:
                det = load_detector(detector_dir, dp.conf_threshold)
                cached = Predictor(det.classes, dp, det)
            while len(_PREDICTORS) >= 2:  # a new model replaces the oldest: memory stays bounded
                _PREDICTORS.pop(next(iter(_PREDICTORS)))
            _PREDICTORS[key] = cached
    # the thresholds, resize and size of this run (the network itself is shared)
    return type(cached)(cached.classes, dp, cached.det)


def detection_dicts(dets: Detections, classes: list[str]) -> list[dict]:
    """JSON-able detections: class id and name, score, box {x, y, w, h} in pixels."""
    return [{"class_id": int(c), "class_name": classes[c], "score": round(float(s), 5),
             "box": dict(zip("xywh", (round(float(v), 2) for v in b)))}
            for b, s, c in zip(dets.boxes, dets.scores, dets.class_ids)]


# --------------------------------------------------------------------------- drawing


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


# --------------------------------------------------------------------------- one shard


class ShardResult(NamedTuple):
    """What a shard returns: per-image records, failures, seconds per phase, and its
    wall-clock start and end (epoch seconds).

    ``seconds``: ``preprocess`` (reading, decoding and resizing, on the reader thread),
    ``forward`` (the network, including the turns it waited for another shard's network in the
    same process), ``postprocess`` (decode + NMS), ``draw`` (drawing, encoding and writing
    annotated images, on the writer thread), ``load`` (the model; zero when already loaded in
    this process) and ``input_wait`` (the network idle, waiting for the reader: near zero when
    reading keeps up).
    """

    records: list[dict]
    failures: list[dict]
    seconds: dict[str, float]
    start: float
    end: float


def failure_reason(err: BaseException) -> str:
    """A short reason for a file that could not be read ("empty file", "No such file or directory",
    "is a directory", "symbolic link loop")."""
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).strip() or type(err).__name__


#: batches read ahead of the network (and handed to the writer) at most: memory stays bounded
PREFETCH = 2
_DONE = object()


class _Stopped(Exception):
    """The consumer of a queue has stopped (it failed); the producer ends quietly."""


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _reader(items: list[InputImage], predictor: Predictor, batch_size: int, max_pixels: int,
            out: queue.Queue, stop: threading.Event, busy: list[float]) -> None:
    """Read, decode and preprocess batches ahead of the network; put ``(good items, images,
    batch or None, failures)`` per batch, then ``_DONE``, or the exception that stopped it."""
    try:
        for b in range(0, len(items), batch_size):
            t0 = time.perf_counter()
            good, images, failures = [], [], []
            for item in items[b:b + batch_size]:
                try:
                    images.append(read_image(Path(item.file), max_pixels=max_pixels))
                    good.append(item)
                except (ValueError, OSError, cv2.error) as err:
                    failures.append({"image_id": item.image_id, "path": item.path, "reason": failure_reason(err)})
            batch = predictor.preprocess(images) if images else None
            busy[0] += time.perf_counter() - t0
            _put(out, (good, images, batch, failures), stop)
        _put(out, _DONE, stop)
    except _Stopped:
        pass
    except BaseException as err:  # handed to the shard's thread, which raises it
        with contextlib.suppress(_Stopped):
            _put(out, err, stop)


class _Writer:
    """Draws, encodes and writes annotated JPEGs on its own thread. The first error stops the
    writing (later images are dropped) and is raised by :meth:`check` / :meth:`close`."""

    def __init__(self, images_dir: Path, classes: list[str], quality: int):
        self.images_dir, self.classes, self.quality = Path(images_dir), classes, quality
        self.queue: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self.error: BaseException | None = None
        self.busy = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="detect-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not _DONE:
            if self.error is not None:
                continue
            t0 = time.perf_counter()
            try:
                for name, image, dets in job:
                    jpeg = encode_jpeg(draw_detections(image, dets, self.classes), self.quality)
                    atomic_write_bytes(self.images_dir / name, jpeg)
            except BaseException as err:
                self.error = err
                self.stop.set()
            self.busy += time.perf_counter() - t0

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, job: list) -> None:
        self.check()
        with contextlib.suppress(_Stopped):
            _put(self.queue, job, self.stop)
        self.check()

    def close(self) -> None:
        self.queue.put(_DONE)  # the writer keeps consuming, so this never blocks for long
        self.thread.join()
        self.check()


def set_threads(threads: int | None) -> None:
    """Give the network ``threads`` cores (process-wide, for OpenCV and torch); None leaves them."""
    if threads:
        cv2.setNumThreads(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def detect_shard(items: list[InputImage], detector_dir: Path, dp: DetectParams,
                 images_dir: Path | None = None, shard: int = 0, of: int = 1, *,
                 device: str = "auto", threads: int | None = None) -> ShardResult:
    """Detect objects in one shard of inputs, batch by batch.

    Reading and preprocessing run on a reader thread at most :data:`PREFETCH` batches ahead,
    and annotated images are drawn and written on a writer thread, so the network, which
    runs on this thread, never waits for the disk when they keep up. Shards running on threads
    of one process share one loaded network and take turns at it (:data:`COMPUTE_LOCK`).

    Every input ends in exactly one of ``records`` (read and run, possibly with no
    detection) or ``failures`` (with a reason); a bad file never stops the shard.

    Args:
        items: the shard's inputs.
        detector_dir: folder with model.cfg, model.weights and classes.txt.
        dp: the ``detect`` parameters (backend, resize, input_size, batch_size, thresholds,
            jpeg_quality, max_pixels: a larger image is a failure, refused from its header
            before decoding).
        images_dir: where annotated JPEGs go; None to draw nothing.
        shard, of: position of this shard, for the progress bar.
        device: the run's ``device`` (auto | cpu | cuda), for the torch backend.
        threads: cores the network may use (process-wide); None leaves the library's default
            (every core), right when shards of one process take turns.

    Raises:
        ParamsError: the backend or device cannot run here (see :func:`resolve_backend`).
    """
    start = time.time()
    t0 = time.perf_counter()
    set_threads(threads)
    predictor = load_predictor(detector_dir, dp, device)
    seconds = {"preprocess": 0.0, "forward": 0.0, "postprocess": 0.0, "draw": 0.0,
               "load": time.perf_counter() - t0, "input_wait": 0.0}
    records: list[dict] = []
    failures: list[dict] = []
    ready: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop, read_busy = threading.Event(), [0.0]
    reader = threading.Thread(target=_reader, name="detect-reader", daemon=True,
                              args=(items, predictor, dp.batch_size, dp.max_pixels, ready, stop, read_busy))
    writer = _Writer(images_dir, predictor.classes, dp.jpeg_quality) if images_dir is not None else None
    reader.start()
    try:
        with tqdm(total=len(items), desc=f"detect {shard + 1}/{of}", unit="img") as bar:
            while True:
                t0 = time.perf_counter()
                got = ready.get()
                seconds["input_wait"] += time.perf_counter() - t0
                if got is _DONE:
                    break
                if isinstance(got, BaseException):
                    raise got
                good, images, batch, bad = got
                failures.extend(bad)
                if batch is not None:
                    t1 = time.perf_counter()
                    with COMPUTE_LOCK:
                        outputs = predictor.inference(batch)
                    t2 = time.perf_counter()
                    per_image = predictor.postprocess(outputs, batch)
                    seconds["forward"] += t2 - t1
                    seconds["postprocess"] += time.perf_counter() - t2
                    for item, image, dets in zip(good, images, per_image):
                        rec = {"image_id": item.image_id, "path": item.path,
                               "width": int(image.shape[1]), "height": int(image.shape[0]),
                               "detections": detection_dicts(dets, predictor.classes)}
                        if writer is not None:
                            rec["annotated"] = f"{IMAGES_DIR}/{item.out_name}"
                        records.append(rec)
                    if writer is not None:
                        writer.submit([(item.out_name, image, dets)
                                       for item, image, dets in zip(good, images, per_image)])
                bar.update(len(good) + len(bad))
        if writer is not None:
            writer.close()
            seconds["draw"] = writer.busy
            writer = None
    finally:
        stop.set()
        reader.join()
        if writer is not None:  # failed before the end: the writer's own error, if any, is secondary
            writer.stop.set()
            writer.queue.put(_DONE)
            writer.thread.join()
    seconds["preprocess"] = read_busy[0]
    return ShardResult(records, failures, seconds, start, time.time())


# --------------------------------------------------------------------------- results


def coco_results(records: list[dict]) -> list[dict]:
    """Detections in the COCO results format: ``image_id`` is the record's, ``category_id``
    the official COCO id of the Darknet class (:data:`COCO80_TO_91`)."""
    return [{"image_id": r["image_id"], "category_id": COCO80_TO_91[d["class_id"]],
             "bbox": [d["box"][k] for k in "xywh"], "score": d["score"]}
            for r in records for d in r["detections"]]


def detections_csv(records: list[dict]) -> str:
    """One CSV row per detection (images without detections have no row)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "path", "width", "height", "class_id", "class_name", "score", "x", "y", "w", "h"])
    for r in records:
        for d in r["detections"]:
            writer.writerow([r["image_id"], r["path"], r["width"], r["height"], d["class_id"], d["class_name"],
                             d["score"], *(d["box"][k] for k in "xywh")])
    return buf.getvalue()


def coco_map(results: list[dict], records: list[dict], annotations: Path) -> dict:
    """mAP@0.5 and mAP@[.5:.95] with pycocotools' COCOeval against a COCO annotation file.

    Images are matched by file name (an annotation image's ``file_name`` against the
    name of the record's ``path``); only matched images are evaluated. Category ids
    must be the official COCO ones (as :func:`coco_results` writes). pycocotools
    reports -1 when there is no ground-truth box at all.

    Returns:
        {"map50", "map50_95", "annotated_images"}.

    Raises:
        ValueError: no processed image appears in the annotation file.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
    by_name = {Path(im["file_name"]).name: im["id"] for im in gt.dataset.get("images", [])}
    gt_id = {r["image_id"]: by_name[Path(r["path"]).name] for r in records if Path(r["path"]).name in by_name}
    if not gt_id:
        raise ValueError(f"detect.annotations {annotations}: none of the {len(records)} processed images "
                         "is listed in it (matched by file name)")
    dts = [{**d, "image_id": gt_id[d["image_id"]]} for d in results if d["image_id"] in gt_id]
    out = {"map50": 0.0, "map50_95": 0.0, "annotated_images": len(gt_id)}
    if dts:
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(dts), "bbox")
            ev.params.imgIds = sorted(set(gt_id.values()))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out.update(map50=float(ev.stats[1]), map50_95=float(ev.stats[0]))
    return out


def merge_shards(results: list[ShardResult]) -> tuple[list[dict], list[dict]]:
    """All records and all failures, each ordered by ``image_id``."""
    records = sorted((r for s in results for r in s.records), key=lambda r: r["image_id"])
    failures = sorted((f for s in results for f in s.failures), key=lambda f: f["image_id"])
    return records, failures


def summarize(results: list[ShardResult], records: list[dict], failures: list[dict]) -> dict:
    """The stage's metrics: counts, detections per class and throughput.

    ``images_per_s`` is end to end (inputs / wall time from the first shard's start, model
    loading included, to the last shard's end); ``forward_images_per_s`` is the images
    read / seconds spent in ``net.forward`` summed over shards.
    """
    per_class = Counter(d["class_name"] for r in records for d in r["detections"])
    wall = max(s.end for s in results) - min(s.start for s in results)
    seconds = {k: round(sum(s.seconds[k] for s in results), 4) for k in results[0].seconds}
    inputs = len(records) + len(failures)
    return {
        "inputs": inputs,
        "images": len(records),
        "failures": len(failures),
        "detections": sum(per_class.values()),
        "per_class": dict(sorted(per_class.items())),
        "images_per_s": round(inputs / wall, 3) if wall > 0 else 0.0,
        "forward_images_per_s": round(len(records) / seconds["forward"], 3) if seconds["forward"] > 0 else 0.0,
        "seconds": {"wall": round(wall, 4), **seconds},
    }


def write_outputs(out_dir: Path, records: list[dict], failures: list[dict], results: list[dict],
                  summary: dict) -> None:
    """Write every output file of the stage into ``out_dir`` (the staging folder), each atomically."""
    atomic_write_text(out_dir / DETECTIONS, "".join(json.dumps(r) + "\n" for r in records))
    write_json(out_dir / COCO_RESULTS, results)
    atomic_write_text(out_dir / CSV_FILE, detections_csv(records))
    write_json(out_dir / FAILURES, failures)
    write_json(out_dir / SUMMARY, summary)
    write_json(out_dir / METRICS, headline_metrics(summary))


def headline_metrics(summary: dict) -> dict:
    """The figures of ``summary`` that ``metrics.json`` keeps (:data:`HEADLINE`), in that order."""
    return {k: summary[k] for k in HEADLINE if k in summary}


# --------------------------------------------------------------------------- the output set


class OutputConflict(ParamsError):
    """``paths.detect`` cannot be replaced without loss: it holds entries this stage did not
    write, or inputs lie inside it."""


class DiskFull(OSError, UserError):
    """The disk filled up while the outputs were staged; the previous outputs are intact.

    An ``OSError`` with ``errno.ENOSPC``, so code that recognises a full disk still does; its
    text is the message alone, without the ``[Errno 28]`` prefix.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def _listing(names: list[str], most: int = 5) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _atomic_leftover(name: str) -> str | None:
    """The file name a killed atomic write was for (``.<name>.<random>.tmp``); None for other names."""
    m = ATOMIC_TMP.match(name)
    return m["name"] if m else None


def annotated_names(out_dir: Path) -> set[str]:
    """The annotated-image file names that ``out_dir/detections.jsonl`` refers to; empty when
    the file is missing or unreadable."""
    names = set()
    try:
        with open(out_dir / DETECTIONS, encoding="utf-8") as fh:
            for line in filter(str.strip, fh):
                rec = json.loads(line)
                annotated = rec.get("annotated") if isinstance(rec, dict) else None
                if isinstance(annotated, str) and annotated.startswith(f"{IMAGES_DIR}/"):
                    names.add(annotated.removeprefix(f"{IMAGES_DIR}/"))
    except (OSError, ValueError):  # missing, unreadable or not JSON lines: it vouches for nothing
        return set()
    return names


def foreign_entries(folder: Path, manifest: bool = True) -> list[str]:
    """The entries of an output folder that this stage did not write, relative to it
    (folders end with ``/``).

    Ours are the output files, ``images/`` holding ``.jpg`` files, DVC's ``.gitignore`` and
    the temporary files of a killed atomic write. With ``manifest``, an image must also be
    named in ``detections.jsonl``: a user's photo in ``images/`` is not ours.
    """
    def label(entry: Path, prefix: str = "") -> str:
        return f"{prefix}{entry.name}/" if entry.is_dir() else f"{prefix}{entry.name}"

    foreign = []
    images = folder / IMAGES_DIR
    own_images = images.is_dir() and not images.is_symlink()
    for entry in sorted(folder.iterdir()):
        name = _atomic_leftover(entry.name) or entry.name
        ours = (entry == images and own_images) or (entry.is_file() and name in (*OUTPUT_FILES, DVC_GITIGNORE))
        if not ours:
            foreign.append(label(entry))
    if own_images:
        listed = annotated_names(folder) if manifest else None
        for entry in sorted(images.iterdir()):
            annotated = entry.suffix == ".jpg" and (listed is None or entry.name in listed)
            if not (entry.is_file() and (annotated or _atomic_leftover(entry.name) is not None)):
                foreign.append(label(entry, f"{IMAGES_DIR}/"))
    return foreign


def check_inputs_outside(items: list[InputImage], out_dir: Path) -> None:
    """Refuse inputs inside ``out_dir``: each run replaces that folder, inputs included.

    Raises:
        OutputConflict: naming the output folder and the first inputs inside it.
    """
    roots = {Path(os.path.abspath(out_dir)), Path(os.path.realpath(out_dir))}
    inside = [it.path for it in items
              if any(Path(f).is_relative_to(r) for f in (os.path.abspath(it.path), it.file) for r in roots)]
    if inside:
        raise OutputConflict(
            f"detect.input: {len(inside)} of the {len(items)} inputs lie inside the output folder paths.detect "
            f"{out_dir} ({_listing(inside, 3)}), which each run replaces as a whole; copy them elsewhere or set "
            "paths.detect to another folder")


def check_output_folder(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that the stage cannot replace without losing someone's files.

    Raises:
        OutputConflict: ``out_dir`` is not a folder, or holds entries this stage did not write (named).
    """
    if not os.path.lexists(out_dir):
        return
    if not Path(out_dir).is_dir():
        raise OutputConflict(f"paths.detect {out_dir} is not a folder: set paths.detect to a folder of its own")
    foreign = foreign_entries(Path(out_dir))
    if foreign:
        raise OutputConflict(
            f"paths.detect {out_dir} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} this stage "
            f"did not write ({_listing(foreign)}); each detect run replaces that folder as a whole, so move them "
            "out or set paths.detect to a folder of its own")


def _sibling(out: Path, kind: str) -> Path:
    """A fresh name ``.<name>.<kind>-<hex>`` next to ``out`` (same file system, so renames are atomic)."""
    return out.parent / f".{out.name}.{kind}-{secrets.token_hex(4)}"


def _leftovers(out: Path, kind: str) -> list[Path]:
    """The existing ``.<name>.<kind>-*`` folders next to ``out``."""
    prefix = f".{out.name}.{kind}-"
    if not out.parent.is_dir():
        return []
    return sorted(e for e in out.parent.iterdir() if e.name.startswith(prefix) and e.is_dir() and not e.is_symlink())


def recover_outputs(out_dir: Path, keep: Path | None = None) -> None:
    """Repair what a run killed while staging or publishing left behind.

    When ``out_dir`` is missing but a previous set was put aside (a kill between the two
    renames of :func:`publish_outputs`), that set is restored. Leftover staging and put-aside
    folders are then removed, except ``keep`` and any holding something this stage did not write.
    """
    out = Path(os.path.realpath(out_dir))
    asides = _leftovers(out, ASIDE)
    if asides and not os.path.lexists(out):
        newest = max(asides, key=lambda d: d.stat().st_mtime)
        os.rename(newest, out)
        asides.remove(newest)
    for folder in (*_leftovers(out, STAGING), *asides):
        if (keep is None or folder.name != keep.name) and not foreign_entries(folder, manifest=False):
            shutil.rmtree(folder)


def publish_outputs(staging: Path, out_dir: Path) -> None:
    """Swap the complete set in ``staging`` in as ``out_dir``, then remove the previous set.

    DVC's ``.gitignore`` of the previous set is carried over. A kill between the two renames
    leaves ``out_dir`` missing and the previous set aside, which :func:`recover_outputs` restores.

    Raises:
        OutputConflict: ``out_dir`` gained entries this stage did not write while the run went on.
    """
    check_output_folder(out_dir)
    out = Path(os.path.realpath(out_dir))
    if (out / DVC_GITIGNORE).is_file():
        atomic_write_bytes(staging / DVC_GITIGNORE, (out / DVC_GITIGNORE).read_bytes())
    aside = None
    if os.path.lexists(out):
        aside = _sibling(out, ASIDE)
        os.rename(out, aside)
    try:
        os.rename(staging, out)
    except OSError:
        if aside is not None:
            os.rename(aside, out)
        raise
    if aside is not None:
        # what cannot be removed now (a busy file on a network disk) goes in the next run's recovery
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_outputs(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh staging folder next to ``out_dir`` (:func:`plan` creates it); publish it
    when the block ends normally, remove it when the block fails, so the previous set stays.

    Raises:
        DiskFull: the disk filled up (ENOSPC) while the set was written.
    """
    staging = _sibling(Path(os.path.realpath(out_dir)), STAGING)
    try:
        yield staging
        publish_outputs(staging, out_dir)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFull(errno.ENOSPC, f"disk full while writing detection outputs to {out_dir}; "
                           "the previous outputs are intact", str(out_dir)) from err
        raise
    finally:
        if staging.is_dir():  # not published: this run's partial set goes
            shutil.rmtree(staging)


# --------------------------------------------------------------------------- stage


def plan(p: Params, staging: Path) -> tuple[list[list[InputImage]], Path | None]:
    """Check the detector, list and shard the inputs, check ``paths.detect``, create ``staging``.

    Nothing is written or removed before every check has passed, except the leftovers of a
    killed run (:func:`recover_outputs`).

    Args:
        p: the parameters.
        staging: the staging folder to create (from :func:`staged_outputs`).

    Returns:
        (shards, images_dir): ``images_dir`` is ``staging/images``, None when ``detect.save_images``
        is false.

    Raises:
        OutputConflict: inputs inside ``paths.detect``, or entries there this stage did not write.
        ParamsError: ``detect.backend`` cannot run on ``device`` here.
    """
    check_detector(p.paths.detector, p.detect.model)
    resolve_backend(p.detect.backend, p.device)
    items = plan_inputs(list_inputs(p.detect.input))
    check_inputs_outside(items, p.paths.detect)
    recover_outputs(p.paths.detect, keep=staging)
    check_output_folder(p.paths.detect)
    staging.mkdir(parents=True)
    images_dir = staging / IMAGES_DIR if p.detect.save_images else None
    if images_dir is not None:
        images_dir.mkdir()
    return split_shards(items, p.detect.shards), images_dir


def collect(p: Params, shard_results: list[ShardResult], staging: Path) -> dict:
    """Merge the shards, evaluate against ``detect.annotations`` when given, write the outputs
    into ``staging`` (:func:`staged_outputs` publishes them).

    Returns:
        The summary written to ``summary.json`` (its headline figures go to ``metrics.json``).
    """
    records, failures = merge_shards(shard_results)
    results = coco_results(records)
    summary = summarize(shard_results, records, failures)
    if p.detect.annotations is not None:
        summary.update(coco_map(results, records, p.detect.annotations))
    write_outputs(staging, records, failures, results, summary)
    return summary


plan_task = task(plan, name="detect-plan", cache_policy=NO_CACHE)
detect_shard_task = task(detect_shard, name="detect-shard", cache_policy=NO_CACHE)
collect_task = task(collect, name="detect-collect", cache_policy=NO_CACHE)
