"""Tests of the ``detect`` predictor and its backends: letterbox and stretch resizing mapped back
exactly, the Darknet cfg / weights reader and network in PyTorch against OpenCV (real yolov3-tiny
weights; the full YOLOv3 structure with generated weights), box-for-box parity of the two backends
through ``detect_shard``, the bad-input guarantees on both, backend / device resolution, the
reader and writer threads, and the labelled set."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import tasks.detect_shard
import tasks.predictor
from bench.detect_labelled import ANNOTATIONS, BOXES, export_labelled, labelled_images
from cvpipe.params import ParamsError, load_params
from flows.detect import network_threads
from tasks.boxes import decode, fit_image
from tasks.darknet import Darknet, DarknetError, load_darknet, parse_cfg
from tasks.detect_inputs import list_inputs, plan_inputs
from tasks.detect_metrics import coco_map
from tasks.detect_outputs import coco_results
from tasks.detect_shard import detect_shard
from tasks.predictor import Predictor, resolve_backend, with_layer_threshold
from tests.helpers import DEFAULT_PARAMS, iou


def detect_params(**update):
    dp = load_params(DEFAULT_PARAMS).detect
    return dp.model_copy(update={"model": "yolov3-tiny", **update})


# --------------------------------------------------------------------------- resizing and mapping back


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
@pytest.mark.parametrize("wh", [(400, 200), (150, 300), (416, 416), (1001, 37)])
def test_boxes_map_back_exactly(resize, wh):
    """A rectangle drawn in the image is found in the fitted pixels where the frame says, and a
    row at exactly those network coordinates decodes to the original rectangle."""
    w, h = wh
    img = np.zeros((h, w, 3), np.uint8)
    x, y, bw, bh = w // 4, h // 4, w // 2, h // 2
    img[y:y + bh, x:x + bw] = 255
    size = 416
    fitted, frame = fit_image(img, size, resize)
    assert fitted.shape == (size, size, 3) and fitted.dtype == np.uint8
    kx, ky, ox, oy = frame
    # where the frame puts the rectangle's corners, in network pixels
    x1, y1 = (x * kx + ox) * size, (y * ky + oy) * size
    x2, y2 = ((x + bw) * kx + ox) * size, ((y + bh) * ky + oy) * size
    ys, xs = np.nonzero(fitted[..., 0] > 127)
    assert abs(xs.min() - x1) <= 1.5 and abs(xs.max() + 1 - x2) <= 1.5
    assert abs(ys.min() - y1) <= 1.5 and abs(ys.max() + 1 - y2) <= 1.5
    if resize == "letterbox":  # aspect ratio kept (to a pixel), grey borders
        s = size / max(w, h)
        nw, nh = kx * w * size, ky * h * size  # the resized content, in whole pixels
        assert nw == pytest.approx(round(nw)) and nh == pytest.approx(round(nh))
        assert abs(nw - w * s) <= 0.5 and abs(nh - h * s) <= 0.5 and max(nw, nh) == pytest.approx(size)
        if w != h:
            assert (fitted == 127).all(axis=-1).any()
    row = np.zeros((1, 1, 6), np.float32)
    row[0, 0, :4] = [(x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size]
    row[0, 0, 5] = 0.9
    d = decode([row], np.array([[w, h]]), 0.5, frame[None])
    np.testing.assert_allclose(d.boxes[0], [x, y, bw, bh], atol=1e-3)


def test_stretch_frame_is_the_seed_mapping():
    """decode without frames (the stretched case) and with the stretch frame give the same boxes."""
    rng = np.random.default_rng(0)
    rows = rng.uniform(0, 1, (2, 50, 7)).astype(np.float32)
    sizes = np.array([[640, 480], [300, 900]])
    frames = np.stack([fit_image(np.zeros((h, w, 3), np.uint8), 416, "stretch")[1] for w, h in sizes])
    a, b = decode([rows], sizes, 0.3), decode([rows], sizes, 0.3, frames)
    np.testing.assert_allclose(a.boxes, b.boxes, rtol=1e-12)
    assert a.class_ids.tolist() == b.class_ids.tolist()


# --------------------------------------------------------------------------- Darknet reader and network


TINY_CFG = """[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=1

[convolutional]
filters=18
size=1
stride=1
pad=1
activation=linear

[yolo]
mask = 0,1,2
anchors = 10,14,  23,27,  37,58
classes=1
num=3
"""


def write_weights(path: Path, model: Darknet, major: int, minor: int, seed: int = 0, extra: int = 0,
                  short: int = 0) -> None:
    """Random weights for ``model`` in Darknet's layout and header version ``major.minor``."""
    rng = np.random.default_rng(seed)
    seen = np.array([12345], np.int64 if (major * 10 + minor) >= 2 else np.int32)
    chunks = [np.array([major, minor, 0], np.int32).tobytes(), seen.tobytes()]
    for layer, kind in zip(model.layers, model.kinds):
        if kind != "convolutional":
            continue
        n = layer.conv.out_channels
        if hasattr(layer, "bn"):
            chunks += [rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 2, n)]
        else:
            chunks.append(rng.normal(0, 0.1, n))
        fan_in = layer.conv.weight[0].numel()
        chunks.append(rng.normal(0, 1 / np.sqrt(fan_in), layer.conv.weight.numel()))
    data = b"".join(c if isinstance(c, bytes) else c.astype("<f4").tobytes() for c in chunks)
    data = data[:len(data) - 4 * short] + np.zeros(extra, "<f4").tobytes()
    path.write_bytes(data)


def opencv_rows(cfg: str, weights: Path, blob: np.ndarray) -> list[np.ndarray]:
    """OpenCV's raw YOLO rows (layer threshold 0: no class score is zeroed)."""
    net = cv2.dnn.readNetFromDarknet(np.frombuffer(with_layer_threshold(cfg, 0.0).encode(), np.uint8),
                                     np.fromfile(weights, np.uint8))
    net.setInput(blob)
    return [o.reshape(len(blob), -1, o.shape[-1]) for o in net.forward(net.getUnconnectedOutLayersNames())]


@pytest.mark.parametrize("version", [(0, 1), (0, 2)])
def test_weights_header_seen_width_follows_the_version(tmp_path, version):
    """Version 0.1 stores ``seen`` as 32 bits, 0.2 and later as 64: both load the same weights, and
    the network agrees with OpenCV reading the same file."""
    model = Darknet(TINY_CFG)
    write_weights(tmp_path / "w", model, *version)
    header = model.load_darknet_weights(tmp_path / "w")
    assert (header["major"], header["minor"], header["seen"]) == (*version, 12345)
    blob = np.random.default_rng(1).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        ours = [r.numpy() for r in model.eval()(torch.from_numpy(blob))]
    theirs = opencv_rows(TINY_CFG, tmp_path / "w", blob)
    assert [o.shape for o in ours] == [t.shape for t in theirs] == [(2, 32 * 32 * 3, 6)]
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-5)


def test_size2_stride1_maxpool_pads_right_and_bottom():
    """yolov3-tiny's last pool keeps the size: each output is the max of the 2x2 window starting
    at it, the window cut at the right and bottom edges."""
    sections = parse_cfg(TINY_CFG)
    assert [s["type"] for s in sections] == ["net", "convolutional", "maxpool", "convolutional", "yolo"]
    pool = Darknet(TINY_CFG).layers[1]
    x = torch.arange(16.0).reshape(1, 1, 4, 4) * torch.tensor([1.0, -1.0, 1.0, -1.0])[None, None, :, None]
    want = np.zeros((4, 4))
    xs = x[0, 0].numpy()
    for i in range(4):
        for j in range(4):
            want[i, j] = xs[i:i + 2, j:j + 2].max()
    np.testing.assert_array_equal(pool(x)[0, 0].numpy(), want)


def test_weights_of_the_wrong_size_are_refused(tmp_path):
    model = Darknet(TINY_CFG)
    write_weights(tmp_path / "short", model, 0, 2, short=3)
    with pytest.raises(DarknetError, match="truncated"):
        model.load_darknet_weights(tmp_path / "short")
    write_weights(tmp_path / "long", model, 0, 2, extra=5)
    with pytest.raises(DarknetError, match="5 weights left over"):
        model.load_darknet_weights(tmp_path / "long")
    with pytest.raises(DarknetError, match=r"\[gru\] is not supported"):
        Darknet(TINY_CFG + "\n[gru]\noutput=4\n")


def test_real_yolov3_tiny_rows_match_opencv(detector_dir):
    """The real yolov3-tiny weights at 416 px on two photos: every decoded row (box, objectness,
    class scores) within 1e-3 of OpenCV's."""
    import skimage.data

    cfg = (detector_dir / "model.cfg").read_text()
    images = [skimage.data.astronaut(), skimage.data.coffee()]
    blob = cv2.dnn.blobFromImages(images, 1 / 255.0, (416, 416), swapRB=False, crop=False)
    theirs = opencv_rows(cfg, detector_dir / "model.weights", blob)
    model = load_darknet(cfg, detector_dir / "model.weights")
    with torch.inference_mode():
        ours = [r.numpy() for r in model(torch.from_numpy(blob))]
    assert [o.shape for o in ours] == [t.shape for t in theirs] == [(2, 507, 85), (2, 2028, 85)]
    for o, t in zip(ours, theirs):
        assert np.abs(o - t).max() < 1e-3


@pytest.mark.slow
def test_full_yolov3_structure_matches_opencv(tmp_path):
    """The full YOLOv3 layer structure (Darknet-53, shortcuts, routes to layers 61 and 36,
    upsampling, three heads) with generated weights: the same rows as OpenCV at 128 px."""
    from tests.helpers import yolov3_cfg

    cfg = yolov3_cfg(classes=3)
    model = Darknet(cfg)
    assert sum(k == "convolutional" for k in model.kinds) == 75 and model.kinds.count("yolo") == 3
    write_weights(tmp_path / "yolov3.weights", model, 0, 2, seed=3)
    model.load_darknet_weights(tmp_path / "yolov3.weights")
    blob = np.random.default_rng(2).uniform(0, 1, (2, 3, 128, 128)).astype(np.float32)
    with torch.inference_mode():
        ours = [r.numpy() for r in model.eval()(torch.from_numpy(blob))]
    theirs = opencv_rows(cfg, tmp_path / "yolov3.weights", blob)
    assert [o.shape[1] for o in ours] == [t.shape[1] for t in theirs] == [4 * 4 * 3, 8 * 8 * 3, 16 * 16 * 3]
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(o, t, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- backends through detect_shard


def test_backend_and_device_resolution(monkeypatch):
    monkeypatch.setattr(tasks.predictor, "cuda_available", lambda: False)
    assert resolve_backend("auto", "auto") == ("opencv", "cpu")
    assert resolve_backend("torch", "auto") == ("torch", "cpu")
    assert resolve_backend("opencv", "cpu") == ("opencv", "cpu")
    with pytest.raises(ParamsError, match="no CUDA"):
        resolve_backend("torch", "cuda")
    monkeypatch.setattr(tasks.predictor, "cuda_available", lambda: True)
    assert resolve_backend("auto", "auto") == ("torch", "cuda")
    assert resolve_backend("auto", "cpu") == ("opencv", "cpu")
    with pytest.raises(ParamsError, match="runs on the CPU only"):
        resolve_backend("opencv", "cuda")


def test_an_opencv_run_does_not_import_torch(tmp_path):
    """Without a GPU driver, an OpenCV run never imports torch (seconds of start-up)."""
    import subprocess
    import sys

    if tasks.predictor.cuda_available():
        pytest.skip("a CUDA device is present: auto picks torch")
    code = ("import sys; import tasks.detect; from tasks.predictor import resolve_backend; "
            "print(resolve_backend('auto', 'auto'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    assert out[-1] == "False"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """The labelled photos and their scenes as JPEGs (the download stage's geometry)."""
    p = load_params(DEFAULT_PARAMS).download
    return export_labelled(tmp_path_factory.mktemp("labelled"), p.sample_scale, tuple(p.sample_canvas))


@pytest.mark.slow
@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_torch_and_opencv_agree_box_for_box(photos, detector_dir, resize):
    """Real yolov3-tiny, every labelled photo and scene: the same boxes (class, IoU >= 0.95,
    score within 0.01) from both backends."""
    runs = {b: detect_shard(plan_inputs(photos), detector_dir, detect_params(backend=b, resize=resize,
                                                                              conf_threshold=0.25), device="cpu")
            for b in ("opencv", "torch")}
    total = 0
    for a, b in zip(runs["opencv"].records, runs["torch"].records):
        assert a["path"] == b["path"]
        da, db = a["detections"], b["detections"]
        assert len(da) == len(db), (a["path"], da, db)
        for x in da:
            match = max(db, key=lambda y: iou([x["box"][k] for k in "xywh"], [y["box"][k] for k in "xywh"])
                        if y["class_id"] == x["class_id"] else -1)
            assert match["class_id"] == x["class_id"]
            assert iou([x["box"][k] for k in "xywh"], [match["box"][k] for k in "xywh"]) >= 0.95
            assert abs(x["score"] - match["score"]) <= 0.01
        total += len(da)
    assert total >= 5  # the comparison is about real boxes, not empty lists


@pytest.mark.slow
def test_bad_inputs_are_failures_on_the_torch_backend(scene, detector_dir, tmp_path):
    """The same records and failures (with reasons) as the OpenCV backend on the scene's good and
    bad files, and annotated images for every record."""
    items = plan_inputs(list_inputs(str(scene["dir"])) + [scene["dir"] / "missing.jpg"])
    runs = {}
    for backend in ("opencv", "torch"):
        (tmp_path / backend).mkdir()
        runs[backend] = detect_shard(items, detector_dir, detect_params(backend=backend), tmp_path / backend,
                                     device="cpu")
    opencv, torch_run = runs["opencv"], runs["torch"]
    assert torch_run.failures == opencv.failures and len(torch_run.failures) >= 5
    assert [r["path"] for r in torch_run.records] == [r["path"] for r in opencv.records]
    assert len(torch_run.records) + len(torch_run.failures) == len(items)
    assert sorted(f.name for f in (tmp_path / "torch").iterdir()) == sorted(Path(r["annotated"]).name
                                                                             for r in torch_run.records)


# --------------------------------------------------------------------------- the shard's threads


def test_a_failing_network_stops_the_reader_and_writer(detector_dir, tmp_path, monkeypatch):
    """An error in the network is raised by detect_shard, and no reader or writer thread is left."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        cv2.imwrite(str(src / f"{i}.png"), np.full((40, 60, 3), i * 20, np.uint8))
    calls = []

    def fails_on_second(det, blob):
        calls.append(len(blob))
        if len(calls) == 2:
            raise RuntimeError("network lost")
        return real(det, blob)

    real = tasks.predictor.forward
    monkeypatch.setattr(tasks.predictor, "forward", fails_on_second)
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="network lost"):
        detect_shard(plan_inputs(sorted(src.iterdir())), detector_dir, detect_params(batch_size=2),
                     tmp_path / "out")
    assert calls == [2, 2]
    assert not [t for t in threading.enumerate() if t.name in ("detect-reader", "detect-writer")]


def test_a_second_backend_overrides_only_inference(detector_dir, tmp_path, monkeypatch):
    """The shared loop calls the predictor's steps: a predictor whose inference reports one fixed
    row gives that box, mapped back through the letterbox frame, on every image."""
    class Fixed(Predictor):
        def inference(self, batch):
            rows = np.zeros((len(batch.inputs), 1, 85), np.float32)
            rows[:, 0, :4] = [0.5, 0.5, 0.25, 0.25]
            rows[:, 0, 5 + 15] = 0.9
            return [rows]

    real = tasks.predictor.load_predictor
    monkeypatch.setattr(tasks.detect_shard, "load_predictor",
                        lambda d, dp, device: Fixed(real(d, dp, device).classes, dp, None))
    cv2.imwrite(str(tmp_path / "wide.png"), np.zeros((208, 832, 3), np.uint8))  # letterbox: 416 x 104 at y 156
    (rec,) = detect_shard(plan_inputs([tmp_path / "wide.png"]), detector_dir, detect_params(resize="letterbox")).records
    (d,) = rec["detections"]
    assert d["class_name"] == "cat" and d["score"] == pytest.approx(0.9)
    # centre (208, 208) in network pixels -> (416, 104); 104 x 104 network pixels -> 208 x 208
    assert d["box"] == {"x": 312.0, "y": 0.0, "w": 208.0, "h": 208.0}


def test_network_threads_split_the_cores_only_between_processes():
    dp = detect_params(task_runner="threads", workers=4)
    assert network_threads(dp) is None
    import os

    assert network_threads(dp.model_copy(update={"task_runner": "dask"})) == max(1, (os.cpu_count() or 1) // 4)
    assert network_threads(dp.model_copy(update={"task_runner": "dask", "dask_address": "tcp://x:1"})) is None


# --------------------------------------------------------------------------- the labelled set


def test_annotation_file_is_the_generated_one():
    """The committed annotation file is what bench/detect_labelled.py generates: every scene box is
    its photo's box mapped by the canvas geometry, and every image is listed with its size."""
    p = load_params(DEFAULT_PARAMS).download
    gt = json.loads(ANNOTATIONS.read_text())
    images = labelled_images(p.sample_scale, tuple(p.sample_canvas))
    assert [im["file_name"] for im in gt["images"]] == list(images)
    for im in gt["images"]:
        pixels, boxes = images[im["file_name"]]
        assert (im["width"], im["height"]) == (pixels.shape[1], pixels.shape[0])
        anns = [a["bbox"] for a in gt["annotations"] if a["image_id"] == im["id"]]
        assert anns == [list(b[1:]) for b in boxes]
    assert len(gt["annotations"]) == 2 * sum(map(len, BOXES.values()))
    # the download stage's samples carry the same names
    assert {f"{n}.jpg" for n in load_params(DEFAULT_PARAMS).download.samples} <= set(images)


@pytest.mark.slow
def test_letterbox_finds_the_labelled_cup_and_motorbike(photos, detector_dir):
    """yolov3-tiny with letterbox at conf 0.25: a cup on the coffee photo and a motorbike on the
    motorcycle photo, each overlapping its hand-drawn box by IoU >= 0.5; mAP@0.5 over the set is
    well above zero."""
    dp = detect_params(resize="letterbox", conf_threshold=0.25)
    result = detect_shard(plan_inputs(photos), detector_dir, dp)
    recs = {Path(r["path"]).name: r for r in result.records}
    for fname, cls in (("coffee.jpg", "cup"), ("motorcycle.jpg", "motorbike")):
        want = next(b[1:] for b in BOXES[fname.removesuffix(".jpg")] if b[0] == cls)
        found = [d for d in recs[fname]["detections"] if d["class_name"] == cls]
        assert found and max(iou([d["box"][k] for k in "xywh"], want) for d in found) >= 0.5, recs[fname]
    m = coco_map(coco_results(result.records), result.records, ANNOTATIONS)
    assert m["annotated_images"] == len(photos) and m["map50"] > 0.3


@pytest.mark.slow
def test_shards_on_threads_sharing_one_network_give_the_one_shard_result(photos, detector_dir):
    """Three shards on threads take turns at the one cached network: the same records as one shard
    (no shard reads another's outputs)."""
    dp = detect_params(conf_threshold=0.25, batch_size=2)
    items = plan_inputs(photos * 2)
    one = detect_shard(items, detector_dir, dp).records
    parts = [items[i::3] for i in range(3)]
    results: list = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, detect_shard(parts[i], detector_dir, dp)))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = sorted((r for res in results for r in res.records), key=lambda r: r["image_id"])
    assert merged == one and sum(len(r["detections"]) for r in one) >= 5


def test_dvc_detect_stage_depends_on_the_backends_and_device():
    """`dvc repro` reruns detect when the run's device or either backend's code changes."""
    import yaml

    stage = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]["detect"]
    assert {"device", "detect"} <= set(stage["params"])
    assert {"tasks/detect.py", "tasks/detect_torch.py", "tasks/darknet.py"} <= set(stage["deps"])
