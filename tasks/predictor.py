"""The predictor of the ``detect`` stage, shaped like Ultralytics' (``engine/predictor.py``), and its
OpenCV backend: the Darknet files checked and loaded, the backend and device chosen, and one
loaded network per process shared by the shards that run in it.

A :class:`Predictor` runs a batch as ``preprocess -> inference -> postprocess``; the shard loop
(:func:`tasks.detect_shard.detect_shard`) times each step. The base class is the OpenCV DNN
backend; the torch backend (:class:`tasks.detect_torch.TorchPredictor`) overrides the steps it
does differently.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from cvpipe.io import ChecksumError, read_json, verify_file
from cvpipe.layout import DETECTOR_CFG, DETECTOR_CLASSES, DETECTOR_FILES, DETECTOR_WEIGHTS, MANIFEST
from cvpipe.params import DetectParams, ParamsError
from tasks.boxes import Detections, fit_image, postprocess


class Detector(NamedTuple):
    """A loaded network, the names of its YOLO output layers and its class names."""

    net: cv2.dnn.Net
    output_names: list[str]
    classes: list[str]


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
    cfg = with_layer_threshold((detector_dir / DETECTOR_CFG).read_text(), conf_threshold)
    net = cv2.dnn.readNetFromDarknet(np.frombuffer(cfg.encode(), np.uint8),
                                     np.fromfile(detector_dir / DETECTOR_WEIGHTS, np.uint8))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    return Detector(net, list(net.getUnconnectedOutLayersNames()), read_classes(detector_dir / DETECTOR_CLASSES))


def make_blob(images: list[np.ndarray], size: int) -> np.ndarray:
    """One NCHW float blob of RGB ``images`` resized to ``size`` x ``size`` (no letterbox,
    no crop; values scaled to [0, 1]), so box coordinates map back by the image's own
    width and height."""
    return cv2.dnn.blobFromImages(images, scalefactor=1 / 255.0, size=(size, size), swapRB=False, crop=False)


def forward(det: Detector, blob: np.ndarray) -> list[np.ndarray]:
    """Run the network on a blob; one array per YOLO output layer."""
    det.net.setInput(blob)
    return list(det.net.forward(det.output_names))


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
    where it can do better, ``postprocess``); the loop in :func:`tasks.detect_shard.detect_shard`
    is shared.
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
                 for f in DETECTOR_FILES
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


def set_threads(threads: int | None) -> None:
    """Give the network ``threads`` cores (process-wide, for OpenCV and torch); None leaves them."""
    if threads:
        cv2.setNumThreads(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
