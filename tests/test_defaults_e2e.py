"""The seed's defaults end to end: `cvpipe run` with the default params.yaml, every asset served in
its real format from an HTTP server on 127.0.0.1.

Served: a small archive in the official CIFAR-10 binary format, a torchvision ResNet-18 state dict
(weights from a URL with sha256), the full YOLOv3 network (the layer structure of Darknet's
``cfg/yolov3.cfg``, with generated weights of exactly the size that structure needs) and an 80-line
``coco.names``. Only the URLs and checksums, the input set of ``detect`` and the size of the data
differ from the defaults; the run goes through Prefect (the CLI's stage table), DVC (``dvc status``
clean afterwards) and MLflow (one run per training mode).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import (
    COCO_NAMES,
    DEFAULT_PARAMS,
    YOLOV3_ANCHORS,
    clone_project,
    make_cifar10_archive,
    yolov3_cfg,
)

pytestmark = pytest.mark.slow

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: Size in bytes of the official yolov3.weights: a 20-byte header and 62,001,757 float32 values.
YOLOV3_WEIGHTS_BYTES = 248_007_048
#: The generated network's first head (13 x 13 cells, the largest anchors) is sure of this class
#: everywhere; the other two heads see nothing. Decoding must find exactly this class.
PLANTED_CLASS = 15  # "cat"

# --------------------------------------------------------------------------- the full YOLOv3 network


def darknet_sections(cfg: str) -> list[tuple[str, dict[str, str]]]:
    """``[(section type, {key: value})]`` of a Darknet cfg, ``[net]`` included."""
    sections: list[tuple[str, dict[str, str]]] = []
    for line in cfg.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            sections.append((line.strip("[]"), {}))
        elif "=" in line:
            key, value = line.split("=", 1)
            sections[-1][1][key.strip()] = value.strip()
    return sections


def write_darknet_weights(cfg: str, path: Path, planted_class: int, seed: int = 0) -> None:
    """A Darknet weights file for ``cfg``: header (major, minor, revision as int32, images seen as
    int64, version 0.2), then per convolutional layer in order: with batch norm, biases, scales,
    rolling means and rolling variances, else biases; then the kernel, all float32.

    Kernels are small random values, batch norm is the identity (scale 1, mean 0, variance 1).
    The output convolutions have zero kernels and biases that make the first head report
    ``planted_class`` with objectness x class probability of about 0.99 in every cell, and the
    other heads nothing.
    """
    rng = np.random.default_rng(seed)
    layers = darknet_sections(cfg)[1:]
    channels: list[int] = []
    c_in, heads_seen = 3, 0
    with open(path, "wb") as fh:
        fh.write(np.array([0, 2, 0], np.int32).tobytes() + np.array([0], np.int64).tobytes())
        for i, (kind, kv) in enumerate(layers):
            if kind == "convolutional":
                filters, size = int(kv["filters"]), int(kv["size"])
                n_kernel = filters * c_in * size * size
                if kv.get("batch_normalize") == "1":
                    fh.write(np.zeros(filters, np.float32).tobytes())  # biases
                    fh.write(np.ones(filters, np.float32).tobytes())  # scales
                    fh.write(np.zeros(filters, np.float32).tobytes())  # rolling means
                    fh.write(np.ones(filters, np.float32).tobytes())  # rolling variances
                    std = 0.5 * np.sqrt(2.0 / (c_in * size * size))
                    fh.write((rng.standard_normal(n_kernel, np.float32) * std).astype(np.float32).tobytes())
                else:  # an output convolution, read by the [yolo] layer that follows it
                    bias = np.zeros((3, filters // 3), np.float32)
                    bias[:, 4] = 6.0 if heads_seen == 0 else -10.0  # objectness
                    bias[:, 5:] = -6.0
                    bias[:, 5 + planted_class] = 6.0
                    heads_seen += 1
                    fh.write(bias.tobytes())
                    fh.write(np.zeros(n_kernel, np.float32).tobytes())
                c_in = filters
            elif kind == "route":
                refs = [int(x) for x in kv["layers"].split(",")]
                c_in = sum(channels[r if r >= 0 else i + r] for r in refs)
            channels.append(c_in)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def serve_yolov3(root: Path) -> dict[str, Path]:
    """Write yolov3.cfg, yolov3.weights and coco.names into ``root``; {params key: file}."""
    files = {"cfg": root / "yolov3.cfg", "weights": root / "yolov3.weights", "names": root / "coco.names"}
    cfg = yolov3_cfg()
    files["cfg"].write_text(cfg)
    write_darknet_weights(cfg, files["weights"], PLANTED_CLASS)
    files["names"].write_text("\n".join(COCO_NAMES) + "\n")
    return files


def test_generated_yolov3_is_the_full_network_and_opencv_runs_it(tmp_path):
    """The served detector has YOLOv3's structure and weight count; OpenCV reads it and the
    project's decoding finds the planted class at 416 px."""
    from tasks.boxes import postprocess
    from tasks.predictor import forward, load_detector, make_blob

    det_dir = tmp_path / "detector"
    det_dir.mkdir()
    files = serve_yolov3(det_dir)
    for name, ours in (("cfg", "model.cfg"), ("weights", "model.weights"), ("names", "classes.txt")):
        files[name].rename(det_dir / ours)
    sections = darknet_sections((det_dir / "model.cfg").read_text())
    kinds = [k for k, _ in sections[1:]]
    assert len(kinds) == 107 and kinds.count("convolutional") == 75 and kinds.count("shortcut") == 23
    assert kinds.count("route") == 4 and kinds.count("upsample") == 2
    yolo = [kv for k, kv in sections if k == "yolo"]
    assert [kv["mask"] for kv in yolo] == ["6,7,8", "3,4,5", "0,1,2"]
    assert all(kv["anchors"] == YOLOV3_ANCHORS and kv["classes"] == "80" for kv in yolo)
    assert [kv["layers"] for k, kv in sections[1:] if k == "route"] == ["-4", "-1, 61", "-4", "-1, 36"]
    assert [i for i, k in enumerate(kinds) if k == "yolo"] == [82, 94, 106]
    assert (det_dir / "model.weights").stat().st_size == YOLOV3_WEIGHTS_BYTES
    assert len((det_dir / "classes.txt").read_text().splitlines()) == 80

    det = load_detector(det_dir, conf_threshold=0.6)
    assert det.output_names == ["yolo_82", "yolo_94", "yolo_106"] and det.classes[PLANTED_CLASS] == "cat"
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    outs = forward(det, make_blob([image], 416))
    assert [o.shape for o in outs] == [(507, 85), (2028, 85), (8112, 85)]
    assert all(np.isfinite(o).all() for o in outs)
    (dets,) = postprocess(outs, np.array([[400, 300]]), len(det.classes), 0.6, 0.5)
    assert len(dets.scores) > 0 and set(dets.class_ids.tolist()) == {PLANTED_CLASS}
    assert (dets.boxes[:, :2] >= 0).all() and (dets.boxes[:, 0] + dets.boxes[:, 2] <= 400 + 1e-6).all()


# --------------------------------------------------------------------------- cvpipe run on the defaults


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_cvpipe_run_with_the_seed_defaults(tmp_path, http_root):
    """`cvpipe run` on a fresh copy of the project with the default params, except the sources
    (served on 127.0.0.1), their checksums and ``detect.input`` (four of the sample photos)."""
    import torch
    import torchvision

    root, base = http_root
    # CIFAR-10: 5 x 20 training and 20 test images (the split carves a stratified val set of
    # 10% from train, which needs at least one image per class: 100 training images at least).
    _, _, test_x, test_y = make_cifar10_archive(root / "cifar-10-binary.tar.gz", per_batch=20, n_test=20)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(resnet, root / "resnet18.pth")
    yolo = serve_yolov3(root)
    overrides = {
        "download.cifar10_url": f"{base}/cifar-10-binary.tar.gz",
        "download.cifar10_md5": hashlib.md5((root / "cifar-10-binary.tar.gz").read_bytes()).hexdigest(),
        "train.weights": f"{base}/resnet18.pth",
        "train.weights_sha256": sha256(root / "resnet18.pth"),
        **{f"download.yolov3.{k}.url": f"{base}/{f.name}" for k, f in yolo.items()},
        **{f"download.yolov3.{k}.sha256": sha256(f) for k, f in yolo.items()},
        "detect.input": "data/samples/c*.jpg",  # chelsea and coffee, photo and scene: 4 images
    }

    (tmp_path / "clone").mkdir()
    repo = clone_project(tmp_path / "clone")
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def run(*args: str, timeout: int = 1200) -> str:
        r = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        return r.stdout

    t0 = time.perf_counter()
    out = run(str(bin_dir / "cvpipe"), "run", *(a for k, v in overrides.items() for a in ("--set", f"{k}={v}")))
    print(f"cvpipe run: {time.perf_counter() - t0:.1f} s\n{out}")

    # The defaults, except the keys above.
    ran_with = _flat(yaml.safe_load((repo / "params.yaml").read_text()))
    defaults = _flat(yaml.safe_load(DEFAULT_PARAMS.read_text()))
    assert {k for k in defaults if ran_with[k] != defaults[k]} <= set(overrides)
    assert all(ran_with[k] == v for k, v in overrides.items())
    # The served coco.names is byte for byte the official file: its sha256 is the default pin.
    assert overrides["download.yolov3.names.sha256"] == defaults["download.yolov3.names.sha256"]
    assert (ran_with["data.dataset"], ran_with["train.backbone"], ran_with["train.image_size"],
            ran_with["detect.model"]) == ("cifar10", "resnet18", 224, "yolov3")

    # Every stage ran through the Prefect pipeline flow.
    for stage in ("download", "preprocess", "train@feature_extractor", "train@fine_tune", "detect", "evaluate"):
        line = next((ln for ln in out.splitlines() if ln.startswith(f"  {stage} ")), "")
        assert line.split()[1:2] == ["ran"], out

    # CIFAR-10 binary archive parsed: official test split kept, 10% of train carved out for val.
    card = json.loads((repo / "data/processed/card.json").read_text())
    assert card["dataset"] == "cifar10" and card["classes"] == CIFAR10_CLASSES
    assert card["counts"] == {"train": 90, "val": 10, "test": 20}
    with np.load(repo / "data/processed/test.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["x"], test_x)
        np.testing.assert_array_equal(z["y"], test_y)

    # The ResNet-18 state dict from the URL is the backbone both modes started from.
    assert sha256(repo / "models/backbone/weights.pth") == overrides["train.weights_sha256"]
    fe = torch.load(repo / "outputs/train/feature_extractor/model.pt", map_location="cpu", weights_only=True)
    assert fe["backbone"] == "resnet18" and fe["image_size"] == 224
    for k, v in resnet.items():
        if not k.startswith("fc."):
            assert torch.equal(fe["state_dict"][k], v), k  # frozen backbone: unchanged
    assert fe["state_dict"]["fc.weight"].shape == (10, 512)

    # Both training modes: resnet18 at 224 px for the default 5 epochs, logged to MLflow.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlruns/mlflow.db'}")
    exp = client.get_experiment_by_name("cvpipe")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
    assert sorted(r.data.tags["mode"] for r in runs) == ["feature_extractor", "fine_tune"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.params["train.backbone"] == "resnet18" and r.data.params["train.image_size"] == "224"
        assert r.data.tags["weights"] == overrides["train.weights"]
        assert [m.step for m in client.get_metric_history(r.info.run_id, "epoch/val_acc")] == [1, 2, 3, 4, 5]
        metrics = json.loads((repo / f"outputs/train/{r.data.tags['mode']}/metrics.json").read_text())
        assert metrics["backbone"] == "resnet18" and metrics["epochs"] == 5

    # evaluate: both modes scored on the 20 test images.
    ev = json.loads((repo / "outputs/evaluate/metrics.json").read_text())
    for mode in ("feature_extractor", "fine_tune"):
        assert ev[mode]["n_test"] == 20 and 0.0 <= ev[mode]["test_acc"] <= 1.0

    # The full YOLOv3 from its URLs, imported by OpenCV and decoded: every input processed.
    manifest = json.loads((repo / "models/detector/manifest.json").read_text())
    assert manifest["model"] == "yolov3"
    assert {n: f["source"] for n, f in manifest["files"].items()} == {
        "model.cfg": f"{base}/yolov3.cfg", "model.weights": f"{base}/yolov3.weights",
        "classes.txt": f"{base}/coco.names"}
    dm = json.loads((repo / "outputs/detect/metrics.json").read_text())
    assert (dm["inputs"], dm["images"], dm["failures"]) == (4, 4, 0), dm
    ds = json.loads((repo / "outputs/detect/summary.json").read_text())
    assert dm["detections"] > 0 and set(ds["per_class"]) == {"cat"}, ds
    assert json.loads((repo / "outputs/detect/failures.json").read_text()) == []
    records = [json.loads(ln) for ln in (repo / "outputs/detect/detections.jsonl").read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == [
        "chelsea.jpg", "chelsea_scene.jpg", "coffee.jpg", "coffee_scene.jpg"]
    assert all(r["detections"] for r in records)

    # DVC agrees: nothing is stale after the run.
    status = run(sys.executable, "-m", "dvc", "status")
    assert "up to date" in status, status
