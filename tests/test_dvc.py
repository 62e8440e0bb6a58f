"""`dvc repro` on a copy of the project: offline with digits, then a no-op, then only what changed."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cvpipe.io import read_json
from cvpipe.params import write_overrides
from tests.helpers import OFFLINE, clone_project, run_tool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = clone_project(tmp_path_factory.mktemp("clone"))
    write_overrides(d / "params.yaml", OFFLINE)
    return d


def test_repro_download_preprocess_offline_then_noop_then_only_changed(repo):
    dvc = [sys.executable, "-m", "dvc"]
    r = run_tool(dvc + ["repro", "download", "preprocess"], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    card = read_json(repo / "data/processed/card.json")
    assert card["dataset"] == "digits" and card["counts"] == {"train": 1293, "val": 144, "test": 360}
    with np.load(repo / "data/processed/train.npz", allow_pickle=False) as z:
        assert z["x"].shape == (1293, 1, 8, 8) and z["x"].dtype == np.uint8 and z["y"].dtype == np.int64
    assert (repo / "dvc.lock").is_file()
    assert (repo / "models/detector/model.weights").stat().st_size == 35434956

    r = run_tool(dvc + ["repro", "download", "preprocess"], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running stage" not in r.stdout, r.stdout

    write_overrides(repo / "params.yaml", {"preprocess.val_fraction": 0.2})
    st = run_tool(dvc + ["status", "download", "preprocess"], repo)
    assert "preprocess" in st.stdout and "download:" not in st.stdout, st.stdout
    r = run_tool(dvc + ["repro", "download", "preprocess"], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running stage 'preprocess'" in r.stdout and "Running stage 'download'" not in r.stdout, r.stdout
    assert read_json(repo / "data/processed/card.json")["counts"]["val"] == 288

    # A user's photo in the samples folder survives a forced `dvc repro` of download: the outputs
    # are `persist`, so DVC does not delete them first, and the stage removes only what it wrote.
    (repo / "data/samples/holiday.jpg").write_bytes(b"a user's photo")
    r = run_tool(dvc + ["repro", "--force", "--single-item", "download"], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running stage 'download'" in r.stdout, r.stdout
    assert (repo / "data/samples/holiday.jpg").read_bytes() == b"a user's photo"
