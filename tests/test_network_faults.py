"""A download that the server drops midway is retried; it ends verified, or with a clear error and no partial file."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from cvpipe import layout
from cvpipe.params import load_params
from tasks import download as dl
from tasks.fetch import AssetUnavailable
from tests.helpers import write_params

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Flaky(http.server.BaseHTTPRequestHandler):
    """Sends the full Content-Length header but only half the body for the first ``drops`` requests."""

    drops = 1
    requests = 0

    def do_GET(self):
        cls = type(self)
        cls.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if cls.requests <= cls.drops:
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-body
            return
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    def start(drops: int):
        handler = type("FlakyN", (Flaky,), {"drops": drops, "requests": 0})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return handler, f"http://127.0.0.1:{server.server_address[1]}/cifar-10-binary.tar.gz"

    servers = []
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _params(tmp_path, url, retries):
    return load_params(write_params(tmp_path, {"download.cifar10_url": url, "download.retries": retries,
                                               "download.cifar10_md5": hashlib.md5(PAYLOAD).hexdigest()}))


def test_dropped_download_is_retried_and_verified(tmp_path, flaky):
    handler, url = flaky(drops=2)
    p = _params(tmp_path, url, retries=3)
    path = dl.download_cifar10(p.paths.raw, p.download)
    assert handler.requests == 3
    assert path.read_bytes() == PAYLOAD
    assert sorted(f.name for f in p.paths.raw.iterdir()) == [layout.CIFAR10_ARCHIVE]


def test_download_dropped_every_time_fails_clearly_without_partial_file(tmp_path, flaky):
    handler, url = flaky(drops=10)
    p = _params(tmp_path, url, retries=2)
    with pytest.raises(AssetUnavailable) as e:
        dl.download_cifar10(p.paths.raw, p.download)
    assert handler.requests == 2
    assert url in str(e.value) and "dvc pull" in str(e.value)
    assert list(p.paths.raw.iterdir()) == []
