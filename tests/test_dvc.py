"""`dvc repro` on a copy of the project: offline with digits, then a no-op, then only what changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cvpipe.io import read_json
from cvpipe.params import write_overrides
from tests.conftest import DEFAULT_PARAMS, ROOT

pytestmark = pytest.mark.slow

OFFLINE = {"data.dataset": "digits", "train.backbone": "efficientnet_lite0", "detect.model": "yolov3-tiny"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


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


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = clone_project(tmp_path_factory.mktemp("clone"))
    write_overrides(d / "params.yaml", OFFLINE)
    return d


def test_repro_download_preprocess_offline_then_noop_then_only_changed(repo):
    dvc = [sys.executable, "-m", "dvc"]
    r = _run(dvc + ["repro", "download", "preprocess"], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    card = read_json(repo / "data/processed/card.json")
    assert card["dataset"] == "digits" and card["counts"] == {"train": 1293, "val": 144, "test": 360}
    with np.load(repo / "data/processed/train.npz", allow_pickle=False) as z:
        assert z["x"].shape == (1293, 1, 8, 8) and z["x"].dtype == np.uint8 and z["y"].dtype == np.int64
    assert (repo / "dvc.lock").is_file()
    assert (repo / "models/detector/model.weights").stat().st_size == 35434956

    r = _run(dvc + ["repro", "download", "preprocess"], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running stage" not in r.stdout, r.stdout

    write_overrides(repo / "params.yaml", {"preprocess.val_fraction": 0.2})
    st = _run(dvc + ["status", "download", "preprocess"], repo)
    assert "preprocess" in st.stdout and "download:" not in st.stdout, st.stdout
    r = _run(dvc + ["repro", "download", "preprocess"], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running stage 'preprocess'" in r.stdout and "Running stage 'download'" not in r.stdout, r.stdout
    assert read_json(repo / "data/processed/card.json")["counts"]["val"] == 288

    # A user's photo in the samples folder survives a forced `dvc repro` of download: the outputs
    # are `persist`, so DVC does not delete them first, and the stage removes only what it wrote.
    (repo / "data/samples/holiday.jpg").write_bytes(b"a user's photo")
    r = _run(dvc + ["repro", "--force", "--single-item", "download"], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running stage 'download'" in r.stdout, r.stdout
    assert (repo / "data/samples/holiday.jpg").read_bytes() == b"a user's photo"
