"""One shard of the ``detect`` stage: its inputs read, run through the predictor batch by batch and
annotated, with each phase timed.

Reading and :meth:`~tasks.predictor.Predictor.preprocess` run on a reader thread, the network's
``inference`` and ``postprocess`` on the shard's own thread, and annotated images are drawn and
written on a writer thread; bounded queues between them keep memory bounded. A bad file becomes a
failure with its reason and the shard goes on.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import threading
import time
from pathlib import Path
from typing import NamedTuple

import cv2
from tqdm import tqdm

from cvpipe.io import atomic_write_bytes
from cvpipe.layout import ANNOTATED_DIR
from cvpipe.params import DetectParams
from tasks.annotate import draw_detections, encode_jpeg
from tasks.detect_inputs import InputImage
from tasks.detect_outputs import detection_dicts
from tasks.images import read_image
from tasks.predictor import COMPUTE_LOCK, Predictor, load_predictor, set_threads


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


def detect_shard(items: list[InputImage], detector_dir: Path, dp: DetectParams,
                 images_dir: Path | None = None, shard: int = 0, of: int = 1, *,
                 device: str = "auto", threads: int | None = None) -> ShardResult:
    """Detect objects in one shard of inputs, batch by batch.

    Reading and preprocessing run on a reader thread at most :data:`PREFETCH` batches ahead,
    and annotated images are drawn and written on a writer thread, so the network, which
    runs on this thread, never waits for the disk when they keep up. Shards running on threads
    of one process share one loaded network and take turns at it
    (:data:`tasks.predictor.COMPUTE_LOCK`).

    Every input ends in exactly one of ``records`` (read and run, possibly with no
    detection) or ``failures`` (with a reason); a bad file never stops the shard.

    Args:
        items: the shard's inputs.
        detector_dir: folder with the detector's files (:data:`cvpipe.layout.DETECTOR_FILES`).
        dp: the ``detect`` parameters (backend, resize, input_size, batch_size, thresholds,
            jpeg_quality, max_pixels: a larger image is a failure, refused from its header
            before decoding).
        images_dir: where annotated JPEGs go; None to draw nothing.
        shard, of: position of this shard, for the progress bar.
        device: the run's ``device`` (auto | cpu | cuda), for the torch backend.
        threads: cores the network may use (process-wide); None leaves the library's default
            (every core), right when shards of one process take turns.

    Raises:
        ParamsError: the backend or device cannot run here (see :func:`tasks.predictor.resolve_backend`).
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
                            rec["annotated"] = f"{ANNOTATED_DIR}/{item.out_name}"
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
