"""Errors the user can act on end in one ``error: ...`` line (exit code 1 or 2), never a traceback.

Parameter errors go through the real ``cvpipe`` executable: they fail before Prefect starts, in
well under a second. Errors raised inside a stage go through the CLI's wrapper around every
flow (:func:`cvpipe.cli_support.run_flow`), fed the real exception of the real code path.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml

from cvpipe.errors import user_facing
from cvpipe.io import CorruptFile, save_npz
from tests.helpers import ROOT, shrunk_params, write_params

CVPIPE = str(Path(sys.executable).parent / "cvpipe")
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CVPIPE_"))}
ENV["CVPIPE_PRELOAD"] = "off"  # every command in its own process (tests/test_preload.py tests the other way)
ENV["PYTHONPATH"] = str(ROOT)


def _cvpipe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CVPIPE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


def _one_error_line(r: subprocess.CompletedProcess, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


# --------------------------------------------------------------------------- parameters, through the CLI


@pytest.mark.parametrize("args, expected", [
    (["--set", "seed=1000000000000000000000000000000"], r"--set seed: seed: .*less than or equal to 4294967295"),
    (["--set", "download.sample_canvas=[0, 0]"], r"--set download\.sample_canvas: download\.sample_canvas\.0: .*16"),
    (["--set", "train.lr=[1"], r"--set train\.lr: invalid YAML"),
    (["--set", "paths.train=/tmp/elsewhere"], r"paths\.train: /tmp/elsewhere is outside the project"),
    (["--set", "train.learnig_rate=0.1"], r"train\.learnig_rate: unknown key"),
])
def test_bad_overrides_are_one_line(tmp_path, args, expected):
    import re

    write_params(tmp_path)
    line = _one_error_line(_cvpipe(tmp_path, "preprocess", *args), 2)
    assert re.search(expected, line), line
    assert len(line) < 400


@pytest.mark.parametrize("text, expected", [
    ("seed: !!python/object/apply:os.system ['echo pwned']\n", r"invalid YAML in params\.yaml \(line 1, column 7\)"),
    ("seed: [1, 2\n", r"invalid YAML in params\.yaml \(line 2"),
    ("- just\n- a list\n", r"the top level must be a mapping"),
])
def test_bad_params_files_are_one_line(tmp_path, text, expected):
    import re

    (tmp_path / "params.yaml").write_text(text)
    assert re.search(expected, _one_error_line(_cvpipe(tmp_path, "run"), 2))


def test_several_bad_values_stay_on_one_line(tmp_path):
    raw = shrunk_params(tmp_path, {"seed": 10**30, "train.lr": "abc", "train.epochs": 0, "train.batch_size": 0,
                                   "download.sample_canvas": [0, 0]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    line = _one_error_line(_cvpipe(tmp_path, "train"), 2)
    assert line.startswith("error: invalid parameters in params.yaml: ") and line.endswith("and 2 more")


# The CLI process records which heavy modules it imported before exiting on the bad value.
IMPORTS = textwrap.dedent("""
    import sys, time
    t0 = time.perf_counter()
    from cvpipe.cli import app
    try:
        app(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    heavy = sorted(m for m in ("torch", "prefect", "mlflow", "sklearn", "cv2", "dvc") if m in sys.modules)
    print(code, time.perf_counter() - t0, ",".join(heavy) or "-", file=sys.stderr)
""")


@pytest.mark.parametrize("command", ["train", "run", "detect", "sweep"])
def test_bad_override_blames_the_flag_before_any_heavy_import(tmp_path, command):
    write_params(tmp_path)
    args = [command, "--set", "train.lr=abc"] + (["--backbones", "resnet18"] if command == "sweep" else [])
    r = subprocess.run([sys.executable, "-c", IMPORTS, *args], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=120)
    *lines, summary = r.stderr.strip().splitlines()
    code, seconds, heavy = summary.split()
    assert code == "2" and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: invalid parameters in --set train.lr: train.lr: Input should be a valid number")
    assert "params.yaml" not in lines[0]
    assert heavy == "-", f"imported before validating: {heavy}"
    print(f"cvpipe {command} --set train.lr=abc: {float(seconds):.2f} s in process")


def test_bad_value_in_file_blames_the_file_not_the_flag(tmp_path):
    write_params(tmp_path, {"train.epochs": 0})
    line = _one_error_line(_cvpipe(tmp_path, "preprocess", "--set", "train.lr=0.01"), 2)
    assert line.startswith("error: invalid parameters in params.yaml: train.epochs:"), line


# --------------------------------------------------------------------------- errors inside a stage


def _through_cli(err: BaseException, capsys) -> str:
    """What the CLI prints when a stage's flow raises ``err`` (exit code 1 and one line)."""
    from cvpipe.cli_support import run_flow as _run

    def flow(params_file):
        raise err

    with pytest.raises(typer.Exit) as ex:
        _run(flow, Path("params.yaml"))
    assert ex.value.exit_code == 1
    out = capsys.readouterr().err.strip()
    assert len(out.splitlines()) == 1 and out.startswith("error: ") and "Traceback" not in out, out
    return out


def _evil_pickle(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    import torch

    torch.save({"backbone": "resnet18", "state_dict": Payload()}, path)


def test_pickled_model_file_is_one_line_naming_it(tmp_path, capsys):
    from tasks.checkpoints import load_classifier

    model = tmp_path / "model.pt"
    _evil_pickle(model)
    with pytest.raises(CorruptFile) as info:
        load_classifier(model)
    msg = str(info.value)
    assert msg.startswith(f"{model}: not a plain state dict") and "weights_only" not in msg
    out = _through_cli(info.value, capsys)
    assert str(model) in out and "weights_only=False" not in out


def test_pickled_backbone_weights_are_one_line(tmp_path, capsys):
    """The backbone weights are loaded by torch.load(weights_only=True) itself: its error is one line
    too, without torch's advice to load the file unsafely."""

    from tasks.backbones import build_model

    weights = tmp_path / "weights.pth"
    _evil_pickle(weights)
    with pytest.raises(CorruptFile) as info:
        build_model("resnet18", 10, weights)
    assert "weights_only" in str(info.value.__cause__)  # what torch says
    out = _through_cli(info.value, capsys)
    assert "pickled Python objects" in out and "weights_only" not in out and "posix.system" in out
    assert str(weights) in out


def test_model_file_that_is_not_a_model_is_one_line(tmp_path, capsys):
    import torch

    from tasks.checkpoints import load_classifier

    model = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(3)}, model)
    with pytest.raises(CorruptFile, match=r"not a model written by `cvpipe train` \(missing backbone"):
        load_classifier(model)
    torch.save({"backbone": "resnet18", "classes": ["a", "b"], "state_dict": {"fc.weight": torch.zeros(1)},
                "image_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear"}, model)
    with pytest.raises(CorruptFile, match=r"its weights do not fit a resnet18 model") as info:
        load_classifier(model)
    _through_cli(info.value, capsys)


def test_cuda_without_cuda_is_one_line(monkeypatch, capsys):
    import torch

    from tasks.runtime import DeviceUnavailable, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="no CUDA device") as info:
        resolve_device("cuda")
    assert _through_cli(info.value, capsys).startswith("error: device: cuda was requested")


def test_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    """A real ENOSPC (from /dev/full) while an output is written: the previous file is intact, no
    temporary file is left, and the CLI prints one line naming the output."""
    out = tmp_path / "data/processed/train.npz"
    save_npz(out, x=np.zeros(3))
    before = out.read_bytes()

    def savez_on_a_full_disk(path, **arrays):
        with open("/dev/full", "wb") as fh:
            fh.write(b"x" * 65536)
            fh.flush()

    monkeypatch.setattr(np, "savez", savez_on_a_full_disk)
    with pytest.raises(OSError) as info:
        save_npz(out, x=np.ones(3))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == ["train.npz"]
    line = _through_cli(info.value, capsys)
    assert line == f"error: disk full while writing {out}: free space and run again"

    # Wherever else it comes from, ENOSPC is the same one line (here wrapped by another error).
    try:
        with open("/dev/full", "wb") as fh:
            fh.write(b"x")
            fh.flush()
    except OSError as err:
        enospc = err
    try:
        raise RuntimeError("file write failed") from enospc
    except RuntimeError as wrapped:
        assert _through_cli(wrapped, capsys) == "error: disk full while writing output files: free space and run again"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tiny tmpfs (needs root)")
def test_preprocess_on_a_really_full_disk_is_one_line(tmp_path, capsys):
    from cvpipe.params import load_params
    from tasks import download as dl
    from tasks import preprocess as pp

    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        p = load_params(write_params(tmp_path, {"paths.processed": str(full / "processed")}))
        dl.export_digits(p.paths.raw)
        with pytest.raises(OSError) as info:
            pp.preprocess(p)
        assert info.value.errno == errno.ENOSPC
        line = _through_cli(info.value, capsys)
        assert line.startswith(f"error: disk full while writing {full / 'processed'}/") and \
            line.endswith(".npz: free space and run again"), line
        assert not [f for f in (full / "processed").iterdir() if ".tmp" in f.name]
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_real_bugs_still_show_a_traceback():
    assert user_facing(KeyError("x")) is None
    assert user_facing(ValueError("x")) is None
    assert user_facing(OSError(errno.EACCES, "Permission denied", "f")) is None



def test_unreachable_tracking_server_is_one_line_before_any_work(tmp_path):
    """A tracking server that does not answer fails in seconds, before Prefect or any stage starts."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_params(tmp_path)
    t0 = time.perf_counter()
    r = _cvpipe(tmp_path, "preprocess", "--set", f"mlflow.tracking_uri=http://127.0.0.1:{port}")
    elapsed = time.perf_counter() - t0
    line = _one_error_line(r, 1)
    assert f"MLflow tracking server http://127.0.0.1:{port} is not reachable" in line, line
    assert elapsed < 10, elapsed
    assert not (tmp_path / "data").exists()  # nothing ran


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_compare_limit_below_one_is_one_line_before_any_work(tmp_path, limit):
    """`cvpipe compare --limit 0` printed MLflow's traceback about max_results."""
    write_params(tmp_path)
    line = _one_error_line(_cvpipe(tmp_path, "compare", "--limit", limit), 2)
    assert line == f"error: --limit must be at least 1 (the newest N runs), got {limit}", line
    assert not (tmp_path / "mlruns").exists()  # the tracking store was not even opened
