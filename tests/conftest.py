"""Shared test fixtures: one Prefect test server per session, and the real params.yaml shrunk into tmp_path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _default_params_text() -> str:
    """params.yaml as committed (git HEAD), else the working copy.

    The quickstart (`cvpipe run --profile offline`) and `cvpipe run --set` rewrite the working
    params.yaml: tests start from the project's defaults, never from a user's experiment.
    """
    import subprocess

    try:
        r = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout
    except OSError:
        pass
    return DEFAULT_PARAMS.read_text()


#: The project's default params.yaml, for tests (see :func:`_default_params_text`).
DEFAULT_PARAMS = Path(tempfile.mkdtemp(prefix="cvpipe-defaults-")) / "params.yaml"
DEFAULT_PARAMS.write_text(_default_params_text())
# Prefect reads PREFECT_HOME at import: keep its state out of the user's home and the project.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cvpipe-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# CLI processes the tests start use Prefect's temporary server (stopped when they exit), as they
# did before the persistent one; tests/test_prefect_server.py starts and stops persistent ones itself.
os.environ.setdefault("CVPIPE_PREFECT_SERVER", "temporary")


def _persistent_servers_under(folder: str) -> list[int]:
    """Pids of cvpipe's persistent Prefect servers whose PREFECT_HOME lies under ``folder`` (Linux)."""
    from cvpipe.prefect_server import TOKEN_VAR

    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        home = env.get(b"PREFECT_HOME", b"").decode(errors="replace")
        if TOKEN_VAR.encode() in env and home.startswith(folder):
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_prefect_server_left(tmp_path_factory):
    """The suite ends with no persistent Prefect server of a test project running: any left under the
    session's temporary folder (a test that failed before its own `cvpipe server stop`) is stopped here."""
    base = str(tmp_path_factory.getbasetemp().resolve())
    yield
    import signal
    import warnings

    left = _persistent_servers_under(base)
    for pid in left:
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
    if left:
        warnings.warn(f"stopped Prefect servers left running by tests: pids {left}", stacklevel=1)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (its start-up takes tens of seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


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


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    return write_params(tmp_path)


@pytest.fixture
def http_root(tmp_path: Path):
    """Serve a folder on 127.0.0.1 (a real HTTP source for download tests); yields (folder, base_url)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def make_cifar10_archive(path: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0):
    """Write a small archive in the official CIFAR-10 *binary* format; returns (train_x, train_y, test_x, test_y).

    Each record: one label byte, then 1024 R, 1024 G and 1024 B bytes.
    """
    import io
    import tarfile

    import numpy as np

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
