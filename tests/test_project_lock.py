"""One cvpipe command per project: a second one exits at once naming the first, params.yaml is
not touched, and the lock of a killed owner is free again. And a command killed with SIGKILL
leaves no Prefect temporary server behind after the next command.

The holder is a small Python process that takes the lock through :mod:`cvpipe.lock`; the
refused commands are the real ``cvpipe`` executable, which fails before starting Prefect.
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

import pytest

from cvpipe.lock import ProjectBusy, ProjectLock, holder, lock_path
from cvpipe.prefect_home import SERVER_APP, find_orphaned_servers
from tests.helpers import ROOT, write_params

CVPIPE = str(Path(sys.executable).parent / "cvpipe")
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CVPIPE_"))}
ENV["CVPIPE_PRELOAD"] = "off"  # every command in its own process (tests/test_preload.py tests the other way)
ENV["PYTHONPATH"] = str(ROOT)

HOLD = textwrap.dedent("""
    import sys, time
    from cvpipe.lock import ProjectLock

    ProjectLock(sys.argv[1], command=sys.argv[2]).acquire()
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
""")

BUSY = re.compile(r"^error: another cvpipe command is running in this project: pid (\d+), "
                  r"`cvpipe run --set detect.conf_threshold=0.3`, since \d\d:\d\d:\d\d \(wait for it or stop it\)$")


def _hold(root: Path, seconds: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), "cvpipe run --set detect.conf_threshold=0.3",
                             str(seconds)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_command_exits_with_one_line_and_leaves_params_alone(tmp_path):
    params = write_params(tmp_path)
    before = params.read_bytes()
    proc = _hold(tmp_path)
    try:
        for args in (["run", "--set", "detect.conf_threshold=0.7"], ["preprocess"], ["detect"]):
            t0 = time.perf_counter()
            r = subprocess.run([CVPIPE, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
            elapsed = time.perf_counter() - t0
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and BUSY.match(lines[0]), r.stderr
            assert int(BUSY.match(lines[0]).group(1)) == proc.pid
            assert "Traceback" not in r.stderr and r.stdout == ""
            assert params.read_bytes() == before, args  # the second run did not rewrite params.yaml
            print(f"cvpipe {' '.join(args)}: refused in {elapsed:.2f} s")
        assert holder(tmp_path).pid == proc.pid
        with pytest.raises(ProjectBusy, match=rf"pid {proc.pid}, "):
            ProjectLock(tmp_path).acquire()

        # The owner is killed: the kernel drops its lock, the next command takes it over.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert holder(tmp_path) is None
        with ProjectLock(tmp_path, command="cvpipe preprocess"):
            assert holder(tmp_path).pid == os.getpid()
            assert holder(tmp_path).command == "cvpipe preprocess"
        assert holder(tmp_path) is None
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_lock_is_reentrant_in_one_process_and_waits_when_asked(tmp_path):
    lock = ProjectLock(tmp_path).acquire()
    again = ProjectLock(tmp_path).acquire()  # a flow started by the command that holds it
    again.release()
    assert holder(tmp_path).pid == os.getpid()
    lock.release()
    assert holder(tmp_path) is None
    assert (lock_path(tmp_path).stat().st_mode & 0o777) == 0o666 & ~_umask()

    proc = _hold(tmp_path, seconds=1.5)
    seen = []
    try:
        t0 = time.perf_counter()
        with ProjectLock(tmp_path).acquire(wait=True, poll_s=0.1, on_wait=seen.append):
            waited = time.perf_counter() - t0
            assert holder(tmp_path).pid == os.getpid()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert [h.pid for h in seen] == [proc.pid]
    assert waited > 0.5


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- orphaned Prefect server


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _is_server(pid: int) -> bool:
    try:
        return SERVER_APP.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds servers through /proc (Linux)")
def test_prefect_server_of_a_killed_command_is_stopped_by_the_next_one(tmp_path):
    write_params(tmp_path)
    # Prefect's temporary server per process (the persistent one outlives its command by design).
    env = {**ENV, "CVPIPE_PREFECT_SERVER": "temporary"}
    cli = subprocess.Popen([CVPIPE, "preprocess"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.monotonic() + 300
        while server is None and time.monotonic() < deadline and cli.poll() is None:
            server = next((c for c in _children(cli.pid) if _is_server(c)), None)
            time.sleep(0.2)
        assert server is not None, "the command started no Prefect server"
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=30)
        time.sleep(1.0)
        assert _running(server), "the server died with its parent: nothing to clean up"
        assert [o.pid for o in find_orphaned_servers(tmp_path)] == [server]
        assert find_orphaned_servers(ROOT) == []  # another project's servers are not touched

        # The next command in the project (here one that fails validation at once) stops it.
        r = subprocess.run([CVPIPE, "preprocess", "--set", "train.lr=abc"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines[0] == ("cvpipe: stopped 1 Prefect temporary server(s) left running by a killed cvpipe "
                            f"command (pid {server})"), r.stderr
        assert len(lines) == 2 and lines[1].startswith("error: invalid parameters in --set train.lr")
        assert not _running(server)
        assert find_orphaned_servers(tmp_path) == []
    finally:
        cli.kill()
        cli.wait(timeout=30)
        if server is not None and _running(server):
            os.kill(server, signal.SIGKILL)


def test_a_scheduled_pipeline_run_takes_the_project_lock(tmp_path, monkeypatch):
    """`cvpipe serve` starts each run in a process of Prefect's, outside the CLI: the pipeline flow
    itself takes the lock, so a run due while another command works fails naming it."""
    from flows.pipeline import pipeline_flow

    params = write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    proc = _hold(tmp_path)
    try:
        with pytest.raises(ProjectBusy, match=rf"pid {proc.pid}, `cvpipe run --set detect.conf_threshold=0.3`"):
            pipeline_flow.fn(params_file=str(params))
    finally:
        proc.kill()
        proc.wait()
