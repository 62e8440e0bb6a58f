"""The project's persistent Prefect server (:mod:`cvpipe.prefect_server`), through the real ``cvpipe``.

Each test starts real Prefect server processes (:mod:`cvpipe.prefect_app`) in its own temporary project (their
database in ``<project>/.prefect``) and stops them before it ends, whatever happens: the suite
leaves no server running. Reuse is shown by process ids and URLs, never by timing.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cvpipe.prefect_server import STATE_FILE, TOKEN_VAR, read_state
from tests.helpers import ROOT, flow_runs, write_params

CVPIPE = str(Path(sys.executable).parent / "cvpipe")
# No PREFECT_* or CVPIPE_* from the test session: the project's own .prefect, the persistent server.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CVPIPE_"))}
ENV["PYTHONPATH"] = str(ROOT)
ENV["CVPIPE_PREFECT_STARTUP_TIMEOUT"] = "300"  # a busy 2-core machine; a fresh database migrates first

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="Linux (/proc)")


def _cvpipe(root: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CVPIPE, *args], cwd=root, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def _get(url: str, timeout: float = 5.0):
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture
def project(tmp_path: Path):
    """A temporary project; whatever Prefect server it has is stopped at the end."""
    write_params(tmp_path)
    try:
        yield tmp_path
    finally:
        _cvpipe(tmp_path, "server", "stop", timeout=120)
        state = read_state(tmp_path / ".prefect")
        if state is not None and _alive(state.pid):
            os.killpg(state.pid, signal.SIGKILL)


@pytest.mark.slow
def test_server_start_status_stop_and_its_ui_calls_its_own_port(project):
    # Two commands start it at once: one starts it, the other waits for it and reuses it.
    procs = [subprocess.Popen([CVPIPE, "server", "start"], cwd=project, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    state = read_state(project / ".prefect")
    assert state is not None and _alive(state.pid)
    assert state.url.startswith("http://127.0.0.1:") and state.url.endswith("/api")
    for out, _ in outs:
        assert f"Prefect server: {state.ui_url} (pid {state.pid}" in out
    # Detached (own session, so a terminal's Ctrl-C or the command's exit does not reach it), marked as ours.
    assert os.getsid(state.pid) == state.pid
    assert f"{TOKEN_VAR}={state.token}".encode() in Path(f"/proc/{state.pid}/environ").read_bytes().split(b"\0")
    assert _get(f"{state.url}/health") is True
    # Prefect's server app, wrapped to retry busy-database answers in the server (cvpipe/prefect_app.py)
    cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
    assert b"cvpipe.prefect_app" in cmdline, cmdline
    assert Path(_get(f"{state.url}/admin/settings")["home"]).resolve() == (project / ".prefect").resolve()
    assert (project / ".prefect" / "prefect.db").is_file()
    # a new database starts from the packaged migrated one (cvpipe/prefect_db.py), once
    log = (project / ".prefect" / "cvpipe-server.log").read_text()
    assert log.count("copied from prefect-") == 1, log
    # The UI asks /ui-settings where the API is: this server's port, not Prefect's default 4200.
    assert _get(f"{state.ui_url}/ui-settings")["api_url"] == state.url

    status = _cvpipe(project, "server", "status")
    assert status.returncode == 0 and state.ui_url in status.stdout, status.stdout + status.stderr
    again = _cvpipe(project, "server", "start")
    assert again.returncode == 0 and f"(pid {state.pid};" in again.stdout  # the same server

    stop = _cvpipe(project, "server", "stop")
    assert stop.returncode == 0 and f"stopped (pid {state.pid}" in stop.stdout, stop.stdout + stop.stderr
    assert not _alive(state.pid)
    assert not (project / ".prefect" / STATE_FILE).exists()
    after = _cvpipe(project, "server", "status")
    assert after.returncode == 1 and "not running" in after.stdout


@pytest.mark.slow
def test_cli_processes_reuse_the_server_a_killed_one_is_replaced_and_every_run_is_visible(project):
    from tasks.download import export_digits

    export_digits(project / "data" / "raw")

    first = _cvpipe(project, "preprocess")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    a = read_state(project / ".prefect")
    assert a is not None and _alive(a.pid)
    second = _cvpipe(project, "preprocess")
    assert second.returncode == 0, second.stderr[-2000:]
    assert read_state(project / ".prefect") == a  # the second process reused the first one's server
    assert "replacing" not in second.stderr

    runs = flow_runs(a.url)
    assert [r.name for r in runs] == ["preprocess", "preprocess"]  # stable names, not random words
    assert len({r.id for r in runs}) == 2 and all(r.state.is_completed() for r in runs)

    # The server is killed: the next command says so in one line and starts another on the same database.
    os.kill(a.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(a.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    third = _cvpipe(project, "preprocess")
    assert third.returncode == 0, third.stderr[-2000:]
    notices = [line for line in third.stderr.splitlines() if line.startswith("cvpipe: replacing")]
    assert notices == [f"cvpipe: replacing the project's Prefect server (its process (pid {a.pid}) is gone)"]
    b = read_state(project / ".prefect")
    assert b.pid != a.pid and _alive(b.pid)
    runs = flow_runs(b.url)
    assert [r.name for r in runs] == ["preprocess"] * 3  # the history survived the replacement


@pytest.mark.slow
def test_dvc_repro_stages_use_the_projects_server(tmp_path):
    """Each `dvc repro` stage is a `cvpipe <stage>` process: they connect to the same server, and
    their runs are in its history."""
    from cvpipe.params import write_overrides
    from tasks.download import export_digits
    from tests.helpers import OFFLINE, clone_project

    repo = clone_project(tmp_path)
    write_overrides(repo / "params.yaml", OFFLINE)
    export_digits(repo / "data" / "raw")
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{ENV.get('PATH', '')}"}

    def repro(*args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", *args, "preprocess"], cwd=repo,
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    try:
        repro()
        first = read_state(repo / ".prefect")
        assert first is not None and _alive(first.pid)
        repro("--force")
        assert read_state(repo / ".prefect") == first  # the second stage process reused the server
        assert [run.name for run in flow_runs(first.url)] == ["preprocess", "preprocess"]
    finally:
        _cvpipe(repo, "server", "stop", timeout=120)


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Another program on the recorded port: answers /api/health like Prefect, but is not our server."""

    def do_GET(self):
        body = b"true" if self.path.endswith("/health") else b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_port_taken_by_another_program_is_one_line_never_a_hang(project):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.perf_counter()
        r = _cvpipe(project, "server", "start", "--port", str(port), timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stderr.strip().splitlines() == [
            f"error: port {port} on 127.0.0.1 is in use by another program: choose another one "
            "(cvpipe server start --port N, or CVPIPE_PREFECT_PORT=N)"]
        assert time.perf_counter() - t0 < 60
        assert read_state(project / ".prefect") is None

    # A recorded server whose process is gone, its port now answered by another program.
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        port = impostor.server_address[1]
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (project / ".prefect").mkdir(exist_ok=True)
        (project / ".prefect" / STATE_FILE).write_text(json.dumps({
            "pid": dead.pid, "port": port, "url": f"http://127.0.0.1:{port}/api",
            "home": str(project / ".prefect"), "token": "0" * 16, "started": time.time()}))
        r = _cvpipe(project, "server", "status", timeout=120)
        assert r.returncode == 1
        assert r.stdout.strip().splitlines() == [
            f"Prefect server: not running (port {port} now answers for another program); the next command "
            "that runs a flow, or `cvpipe server start`, starts it",
            "preload process: not running (the next stage command starts it)"]
    finally:
        impostor.shutdown()
        impostor.server_close()


@pytest.mark.slow
def test_a_corrupted_database_is_moved_aside_in_one_line(project):
    home = project / ".prefect"
    home.mkdir()
    (home / "prefect.db").write_bytes(os.urandom(64 * 1024))
    r = _cvpipe(project, "server", "start")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cvpipe: the Prefect database {home / 'prefect.db'} was "
                                                   "unreadable (corrupted): moved it to prefect.db.corrupt-"), r.stderr
    assert len(list(home.glob("prefect.db.corrupt-*"))) == 1
    state = read_state(home)
    assert _alive(state.pid) and _get(f"{state.url}/health") is True


def test_a_users_prefect_api_url_is_left_alone(project):
    env = {**ENV, "PREFECT_API_URL": "http://127.0.0.1:9/api", "CVPIPE_PRELOAD": "off"}
    for cmd, preload_line in (("start", "off (CVPIPE_PRELOAD=off)"),
                              ("status", "not running (the next stage command starts it)"),
                              ("stop", "none running")):
        r = _cvpipe(project, "server", cmd, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines() == [
            "PREFECT_API_URL is set (http://127.0.0.1:9/api, does not answer): cvpipe uses it and starts or "
            "stops no server", f"preload process: {preload_line}"]
    assert not (project / ".prefect" / STATE_FILE).exists()


def test_flow_runs_have_stable_names():
    from flows.detect import detect_flow, detect_shards
    from flows.download import download_flow
    from flows.evaluate import evaluate_flow
    from flows.pipeline import pipeline_flow
    from flows.preprocess import preprocess_flow
    from flows.train import train_flow

    assert train_flow.flow_run_name.format(mode="fine_tune") == "train-fine_tune"
    for fl, name in ((pipeline_flow, "pipeline"), (detect_flow, "detect"), (detect_shards, "detect-shards"),
                     (download_flow, "download"), (preprocess_flow, "preprocess"), (evaluate_flow, "evaluate")):
        assert fl.flow_run_name == name


def test_the_summary_shows_each_stages_headline_figures():
    from flows.pipeline import _summary_markdown, headline

    rows = [
        {"stage": "preprocess", "status": "ran", "seconds": 1.3,
         "result": {"dataset": "digits", "counts": {"train": 1293, "val": 144, "test": 360}, "classes": ["0"]}},
        {"stage": "train@fine_tune", "status": "ran", "seconds": 122.4,
         "result": {"mode": "fine_tune", "best_val_acc": 0.9931, "epochs": 3, "images_per_s": 41.27}},
        {"stage": "detect", "status": "ran", "seconds": 7.1,
         "result": {"inputs": 9, "images": 8, "failures": 1, "detections": 12, "per_class": {"cat": 1},
                    "images_per_s": 3.25}},
        {"stage": "evaluate", "status": "ran", "seconds": 14.3,
         "result": {"feature_extractor": {"test_acc": 0.9638, "test_loss": 0.1, "per_class_acc": {"0": 1.0}},
                    "fine_tune": {"test_acc": 0.9917, "test_loss": 0.03, "per_class_acc": {"0": 1.0}}}},
        {"stage": "download", "status": "skipped", "seconds": 0.0},
    ]
    assert headline(rows[3]) == "test_acc[feature_extractor]=0.9638, test_acc[fine_tune]=0.9917"
    assert headline(rows[2]) == "images=8, detections=12, failures=1, images_per_s=3.25"
    assert headline(rows[1]) == "best_val_acc=0.9931, epochs=3, images_per_s=41.27"
    assert headline(rows[0]) == "dataset=digits, train 1293/val 144/test 360"
    assert headline(rows[4]) == ""
    md = _summary_markdown(rows, 150.0)
    assert "| evaluate | ran | 14.3 | test_acc[feature_extractor]=0.9638, test_acc[fine_tune]=0.9917 |" in md
    assert "| detect | ran | 7.1 | images=8, detections=12, failures=1, images_per_s=3.25 |" in md
    assert "Total wall time: 150.0 s" in md


@pytest.mark.slow  # Prefect's test server
def test_cli_flow_runs_send_heartbeats_only_when_the_user_configured_them(prefect_server, tmp_path, monkeypatch):
    """A `cvpipe` command's flow run (cli_support.run_flow) starts no heartbeat thread, whose join would
    end it up to a second late, unless the user set a heartbeat frequency (environment or profile)."""
    from prefect import flow
    from prefect.flow_engine import FlowRunEngine
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from cvpipe.cli_support import run_flow

    beats: list[str] = []
    monkeypatch.setattr(FlowRunEngine, "_emit_flow_run_heartbeat",
                        lambda self, *a, **k: beats.append(self.flow_run.name))

    @flow(name="heartbeat-probe", flow_run_name="probe-{params_file}")
    def probe(params_file: str) -> str:
        return params_file

    for var in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"):
        monkeypatch.delenv(var, raising=False)
    assert run_flow(probe, Path("plain")) == "plain"
    assert beats == []
    probe(params_file="direct")  # called as Prefect would: Prefect's default heartbeat is on
    assert beats == ["probe-direct"]
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    run_flow(probe, Path("env"))
    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 45}):  # as a Prefect profile sets it
        run_flow(probe, Path("profile"))
    assert beats == ["probe-direct", "probe-env", "probe-profile"]


_COLLISION = r"""
import http.server, json, os, random, sys, threading

# Another command's temporary server on port F: it answers /api/health (as Prefect's does) and logs
# every request it gets.
seen = []
class Foreign(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        seen.append(self.path)
        ok = self.path.endswith("/health")
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"true" if ok else b"{}")
    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer
    def log_message(self, *a):
        pass
foreign = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Foreign)
threading.Thread(target=foreign.serve_forever, daemon=True).start()
F = foreign.server_address[1]

# The collision: Prefect's draw gives F, found free a moment before the other server bound it.
from prefect.server.api.server import SubprocessASGIServer
random.choice = lambda seq: F
SubprocessASGIServer.is_port_available = staticmethod(lambda port: True)

from cvpipe.prefect_server import connect
assert connect(say=print) is None  # CVPIPE_PREFECT_SERVER=temporary

from prefect import flow

@flow(name="probe")
def probe():
    return 7

try:
    outcome = probe()
except Exception as err:
    outcome = f"{type(err).__name__}: {err}"[:300]
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    names = [r.name for r in c.read_flow_runs()]
print(json.dumps({"outcome": outcome, "foreign_port": F, "port": SubprocessASGIServer().port,
                  "foreign_requests": seen, "runs": names}))
"""


@pytest.mark.slow
def test_a_temporary_server_never_takes_another_commands_server_for_its_own(tmp_path):
    """CVPIPE_PREFECT_SERVER=temporary: when Prefect's draw of a port meets another command's server
    (two commands started at once), this command still starts, uses and records into its own."""
    env = {**ENV, "CVPIPE_PREFECT_SERVER": "temporary", "PREFECT_HOME": str(tmp_path / ".prefect")}
    r = subprocess.run([sys.executable, "-c", _COLLISION], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["outcome"] == 7, got
    assert got["foreign_requests"] == [], got  # the other command's server never heard of this one
    assert got["port"] != got["foreign_port"] and not 8000 <= got["port"] < 9000, got
    assert len(got["runs"]) == 1, got  # its run is in its own server's database
