"""Helpers the test files share (plain functions and constants; the fixtures live in conftest.py).

Test files import from here, never from one another.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _default_params_text() -> str:
    """params.yaml as committed (git HEAD), else the working copy.

    The quickstart (`cvpipe run --profile offline`) and `cvpipe run --set` rewrite the working
    params.yaml: tests start from the project's defaults, never from a user's experiment.
    """
    try:
        r = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout
    except OSError:
        pass
    return (ROOT / "params.yaml").read_text()


#: The project's default params.yaml, for tests (see :func:`_default_params_text`).
DEFAULT_PARAMS = Path(tempfile.mkdtemp(prefix="cvpipe-defaults-")) / "params.yaml"
DEFAULT_PARAMS.write_text(_default_params_text())
atexit.register(shutil.rmtree, DEFAULT_PARAMS.parent, ignore_errors=True)


def shrunk_params(tmp_path: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The repository's params.yaml with every path moved under ``tmp_path``, offline and small.

    Args:
        tmp_path: folder for data, models, outputs and the MLflow store.
        overrides: dotted keys applied last ({"train.epochs": 1}).
    """
    from cvpipe.params import apply_overrides

    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["paths"] = {k: str(tmp_path / v) if isinstance(v, str) else v for k, v in raw["paths"].items()}
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    raw["mlflow"]["artifact_location"] = str(tmp_path / "mlruns" / "artifacts")
    raw["data"]["dataset"] = "digits"
    raw["data"]["imagefolder"] = str(tmp_path / "imagefolder")
    raw["train"].update(backbone="efficientnet_lite0", weights="imagenet", image_size=32, epochs=1)
    raw["detect"].update(model="yolov3-tiny", input=str(tmp_path / "data/samples"))
    raw["download"]["retries"] = 1
    raw["download"]["backoff_s"] = 0.0
    return apply_overrides(raw, overrides or {})


def write_params(tmp_path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write :func:`shrunk_params` to ``tmp_path/params.yaml`` and return its path."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(shrunk_params(tmp_path, overrides), sort_keys=False))
    return path


def make_cifar10_archive(path: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0):
    """Write a small archive in the official CIFAR-10 *binary* format; returns (train_x, train_y, test_x, test_y).

    Each record: one label byte, then 1024 R, 1024 G and 1024 B bytes.
    """
    import io
    import tarfile

    rng = np.random.default_rng(seed)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def batch(n):
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        rec = np.concatenate([y[:, None], x.reshape(n, -1)], axis=1)
        return x, y.astype(np.int64), rec.tobytes()

    members, xs, ys = {}, [], []
    for i in range(1, 6):
        x, y, b = batch(per_batch)
        members[f"cifar-10-batches-bin/data_batch_{i}.bin"] = b
        xs.append(x)
        ys.append(y)
    tx, ty, tb = batch(n_test)
    members["cifar-10-batches-bin/test_batch.bin"] = tb
    members["cifar-10-batches-bin/batches.meta.txt"] = ("\n".join(classes) + "\n\n").encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return np.concatenate(xs), np.concatenate(ys), tx, ty


# --------------------------------------------------------------------------- copies of the project


#: The overrides that make the committed params.yaml run offline.
OFFLINE = {"data.dataset": "digits", "train.backbone": "efficientnet_lite0", "detect.model": "yolov3-tiny"}


def run_tool(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``args`` in ``cwd`` with this interpreter's scripts (dvc, cvpipe) first on PATH; output captured."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def preload_processes_under(folder: str) -> list[int]:
    """Pids of cvpipe preload processes (``python -P -m cvpipe.preload serve ROOT``) with ROOT under ``folder``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "cvpipe.preload" in argv and argv[-2:-1] and argv[-2].startswith(folder):
            found.append(int(entry.name))
    return found


def flow_runs(api_url: str) -> list:
    """Every flow run the Prefect server at ``api_url`` knows, read with Prefect's own client."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs()

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def clone_project(dest: Path) -> Path:
    """Copy the tracked files of the project into a fresh git repository (a stand-in for a fresh clone)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    # The project's defaults, not a working params.yaml that a quickstart or `run --set` rewrote.
    shutil.copy2(DEFAULT_PARAMS, dest / "params.yaml")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


# --------------------------------------------------------------------------- tiny training data


TINY_CLASSES = ["hstripes", "vstripes", "left", "top"]


def tiny_images(n_per_class: int, seed: int, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Four easy classes of noisy RGB uint8 images: horizontal / vertical stripes, bright left / top half."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label in range(4):
        base = np.zeros((size, size), dtype=np.float32)
        if label == 0:
            base[::2, :] = 1
        elif label == 1:
            base[:, ::2] = 1
        elif label == 2:
            base[:, : size // 2] = 1
        else:
            base[: size // 2, :] = 1
        for _ in range(n_per_class):
            level = rng.uniform(120, 220)
            img = base * level + rng.uniform(0, 60, (3, size, size))
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(label)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def tiny_project(tmp_path: Path, overrides: dict | None = None):
    """The repository's params shrunk into ``tmp_path`` over a tiny generated dataset; weights provided.

    Defaults: efficientnet_lite0 with its offline ImageNet weights at 32 px, batch 16, fp32 (``train.amp:
    off``: the tests of ``auto`` and bf16 ask for them; ``auto``'s timed probe would cost seconds per project).
    Returns the validated params.
    """
    from cvpipe.params import load_params
    from tasks.download import download_backbone
    from tasks.splits import Dataset, dataset_card, write_dataset

    ov = {"train.batch_size": 16, "train.epochs": 3, "train.hflip": True, "train.vflip": False, "train.amp": "off"}
    ov.update(overrides or {})
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_params(tmp_path, ov)
    p = load_params(path)
    splits = {"train": tiny_images(24, 1), "val": tiny_images(8, 2), "test": tiny_images(10, 3)}
    ds = Dataset(splits, TINY_CLASSES)
    write_dataset(ds, dataset_card(ds, "tiny"), p.paths.processed)
    download_backbone(p.train, p.paths.backbone, p.download)
    return p


# --------------------------------------------------------------------------- detection


def iou(a, b) -> float:
    """IoU of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


#: Darknet's data/coco.names, in file order.
COCO_NAMES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
#: The anchors of Darknet's cfg/yolov3.cfg, as written there.
YOLOV3_ANCHORS = "10,13,  16,30,  33,23,  30,61,  62,45,  59,119,  116,90,  156,198,  373,326"


def yolov3_cfg(classes: int = 80) -> str:
    """The layer structure of Darknet's ``cfg/yolov3.cfg``, as text in the Darknet cfg format.

    Darknet-53 (52 convolutional layers with 23 residual shortcuts, five stride-2 downsamplings)
    and three detection heads at strides 32, 16 and 8; the second and third upsample the previous
    head and concatenate layers 61 and 36 of the backbone. 75 convolutional layers and 3 ``[yolo]``
    layers in all (107 layers), with the official anchors and masks.
    """
    out = ["[net]\n# Testing\n# batch=1\n# subdivisions=1\n# Training\nbatch=64\nsubdivisions=16\n"
           "width=608\nheight=608\nchannels=3\nmomentum=0.9\ndecay=0.0005\nangle=0\nsaturation = 1.5\n"
           "exposure = 1.5\nhue=.1\n\nlearning_rate=0.001\nburn_in=1000\nmax_batches = 500200\n"
           "policy=steps\nsteps=400000,450000\nscales=.1,.1\n"]

    def conv(filters: int, size: int, stride: int = 1, bn: bool = True) -> None:
        out.append("[convolutional]\n" + ("batch_normalize=1\n" if bn else "")
                   + f"filters={filters}\nsize={size}\nstride={stride}\npad=1\n"
                   + f"activation={'leaky' if bn else 'linear'}\n")

    conv(32, 3)
    for channels, blocks in ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)):
        conv(channels, 3, stride=2)  # downsample
        for _ in range(blocks):
            conv(channels // 2, 1)
            conv(channels, 3)
            out.append("[shortcut]\nfrom=-3\nactivation=linear\n")
    for head, (channels, mask, skip) in enumerate(((512, "6,7,8", None), (256, "3,4,5", 61), (128, "0,1,2", 36))):
        if skip is not None:
            out.append("[route]\nlayers = -4\n")
            conv(channels, 1)
            out.append("[upsample]\nstride=2\n")
            out.append(f"[route]\nlayers = -1, {skip}\n")
        for _ in range(3):
            conv(channels, 1)
            conv(channels * 2, 3)
        conv(3 * (5 + classes), 1, bn=False)
        out.append(f"[yolo]\nmask = {mask}\nanchors = {YOLOV3_ANCHORS}\nclasses={classes}\nnum=9\n"
                   "jitter=.3\nignore_thresh = .7\ntruth_thresh = 1\nrandom=1\n")
    return "\n".join(out)


def sqlite_schema(db: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """Every table, index, trigger and view of a SQLite database: (type, name, its SQL's lines), sorted.

    A table's lines are sorted: Alembic's batch migrations rebuild SQLite tables with their
    constraints in no fixed order, so two migrations of the same revision list them differently.
    """
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT type, name, COALESCE(sql, '') FROM sqlite_master").fetchall()
    finally:
        con.close()
    return sorted((kind, name, tuple(sorted(line.strip().rstrip(",").strip() for line in sql.splitlines())))
                  for kind, name, sql in rows)
