"""The preload process (:mod:`cvpipe.preload`): stage commands run in forks of one warm process.

The slow tests run the real ``cvpipe`` in a copy of the project with the persistent Prefect
server and the preload process on, and stop both before they end. Which process ran a command is
read from the preload log and the Prefect server's history, never inferred from timing.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvpipe import preload
from cvpipe.prefect_server import pid_alive
from tests.helpers import clone_project, flow_runs, preload_processes_under, write_params

CVPIPE = str(Path(sys.executable).parent / "cvpipe")
# The user's shell: no PREFECT_* or CVPIPE_* from the test session, so the persistent server and the
# preload process are both on.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CVPIPE_"))}
ENV["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{ENV.get('PATH', '')}"
ENV["CVPIPE_PREFECT_STARTUP_TIMEOUT"] = "300"

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="Linux (/proc)")


# --------------------------------------------------------------------------- fast: the pieces


def test_only_stage_commands_go_to_the_preload_process(monkeypatch):
    monkeypatch.delenv(preload.MODE_VAR, raising=False)
    assert preload.wanted(["preprocess"]) and preload.wanted(["train", "--mode", "fine_tune"])
    assert not preload.wanted(["preprocess", "--help"]) and not preload.wanted([])
    assert not preload.wanted(["server", "stop"]) and not preload.wanted(["serve-model"])
    monkeypatch.setenv(preload.MODE_VAR, "off")
    assert not preload.wanted(["preprocess"])


def test_fingerprint_follows_load_time_settings_and_libraries(tmp_path):
    lib = tmp_path / "site-packages"
    lib.mkdir()
    base = {"HOME": "/root", "OMP_NUM_THREADS": "2"}
    fp = preload.fingerprint(sys.executable, [str(lib)], base)

    def changed(executable=sys.executable, env=base):
        return preload.differences(fp, preload.fingerprint(executable, [str(lib)], env))

    assert changed(env={**base, "HOME": "/elsewhere"}) == []
    assert changed(env={**base, "OMP_NUM_THREADS": "1"}) == ["$OMP_NUM_THREADS"]
    assert changed(env={**base, "CUDA_VISIBLE_DEVICES": ""}) == ["$CUDA_VISIBLE_DEVICES"]
    assert changed(executable="/usr/bin/python3") == ["interpreter"]
    (lib / "newpackage").mkdir()  # a package installed: the folder's modification time moves
    os.utime(lib, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert changed() == ["sys.path[0]"]


def test_a_socket_path_over_the_limit_means_no_preload(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    monkeypatch.delenv(preload.MODE_VAR, raising=False)
    assert preload.run(["preprocess"]) is None
    assert not (deep / preload.DIR).exists()  # nothing started


def test_the_preload_process_keeps_libraries_but_not_the_project_code():
    """What `_warm` leaves loaded: the heavy libraries, and none of cvpipe/flows/tasks but this module."""
    code = (
        "import sys\n"
        "from cvpipe import preload\n"
        "preload._warm()\n"
        "ours = sorted(m for m in sys.modules if m.partition('.')[0] in preload.PROJECT_PACKAGES)\n"
        "libs = [m for m in ('torch', 'prefect', 'mlflow', 'dvc.repo', 'sklearn.model_selection', 'cv2')\n"
        "        if m in sys.modules]\n"
        "print(ours, libs)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == (
        "['cvpipe.preload'] ['torch', 'prefect', 'mlflow', 'dvc.repo', 'sklearn.model_selection', 'cv2']")


# --------------------------------------------------------------------------- slow: the real thing


def _cvpipe(root: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CVPIPE, *args], cwd=root, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def _served(root: Path) -> list[tuple[int, str]]:
    """(child pid, command) of every command the preload log says it ran."""
    log = (root / ".cvpipe" / "preload.log").read_text()
    return [(int(m[1]), m[2]) for m in re.finditer(r"preload: pid (\d+) runs (.+?) for client", log)]


def _wait_ready(root: Path, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = preload.status(root)
        if info is not None:
            return info
        time.sleep(0.2)
    raise AssertionError(f"no preload process answered in {timeout} s: {(root / '.cvpipe' / 'preload.log').read_text()[-2000:]}")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path):
    """A copy of the project on the shrunk offline params, digits in place (no download)."""
    from tasks.download import export_digits

    root = clone_project(tmp_path / "proj")
    write_params(root)
    export_digits(root / "data" / "raw")
    try:
        yield root
    finally:
        _cvpipe(root, "server", "stop", timeout=120)
        for pid in preload_processes_under(str(root)):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_stage_commands_run_in_forks_of_one_preload_process(project):
    r = _cvpipe(project, "preprocess")
    assert r.returncode == 0, r.stderr[-3000:]
    first = _wait_ready(project)  # started by the first command, which ran on its own
    assert _served(project) == []

    digests = []
    for _ in range(2):
        r = _cvpipe(project, "preprocess")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "preprocess: digits" in r.stdout  # the child wrote to this process's own stdout
        digests.append(_digest(project / "data" / "processed"))
    served = _served(project)
    assert [c for _, c in served] == ["preprocess", "preprocess"] and len({p for p, _ in served}) == 2
    assert preload.status(project)["pid"] == first["pid"]  # the same warm process forked both

    # The same outputs as a command in its own process.
    r = _cvpipe(project, "preprocess", env={**ENV, "CVPIPE_PRELOAD": "off"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digest(project / "data" / "processed") == digests[0] == digests[1]
    assert len(_served(project)) == 2

    # A user error: the same one line and exit code as without the preload process.
    r = _cvpipe(project, "preprocess", "--set", "train.lr=abc")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: invalid parameters in --set train.lr")
    assert len(_served(project)) == 3

    # dvc repro's stage command goes through it too.
    r = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "--force", "preprocess"],
                       cwd=project, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [c for _, c in _served(project)][3:] == ["preprocess"]

    # Every run is in the project's Prefect server: the first, 2 preloaded, 1 own process, dvc's.
    from cvpipe.prefect_server import read_state

    names = [r.name for r in flow_runs(read_state(project / ".prefect").url)]
    assert names.count("preprocess") == 5

    r = _cvpipe(project, "server", "stop")
    assert f"preload process stopped (pid {first['pid']})" in r.stdout
    assert preload_processes_under(str(project)) == [] and not (project / ".cvpipe" / "preload.sock").exists()


@pytest.mark.slow
def test_signals_reach_the_child_and_a_killed_client_takes_it_along(project):
    from cvpipe.params import load_params
    from tasks.download import download_backbone

    p = load_params(project / "params.yaml")
    download_backbone(p.train, p.paths.backbone, p.download)  # what train needs from `download`
    assert _cvpipe(project, "preprocess").returncode == 0
    _wait_ready(project)

    def start_training(n: int):
        err_file = project / f"train-{n}.err"
        # As a command typed at a terminal: Ctrl-C not ignored, whatever this test process inherited
        # (a script's background job starts with SIGINT ignored).
        with open(err_file, "w") as err:
            proc = subprocess.Popen([CVPIPE, "train", "--mode", "fine_tune", "--set", "train.fine_tune_epochs=30"],
                                    cwd=project, env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (
                len(trainings) > n and "fine_tune 1/30" in err_file.read_text(errors="replace")):
            mine = [p for p, c in _served(project) if c.startswith("train")]
            if len(mine) == n + 1 and len(trainings) == n:
                trainings.append(mine[-1])
            time.sleep(0.1)
        assert len(trainings) == n + 1, "the preload process did not run the training"
        assert "fine_tune 1/30" in err_file.read_text(errors="replace"), "the training did not start"
        assert proc.poll() is None, "the training ended before the signal"
        return proc, err_file

    trainings: list[int] = []
    proc, err_file = start_training(0)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=120)
    err = err_file.read_text(errors="replace")
    assert proc.returncode == 130, err[-2000:]
    assert "aborted by an interrupt signal" in err
    assert not pid_alive(trainings[0])

    proc, _ = start_training(1)
    proc.kill()  # kill -9: nothing is forwarded; the child notices its client is gone
    proc.wait()
    deadline = time.monotonic() + 30
    while pid_alive(trainings[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(trainings[1])
    r = _cvpipe(project, "preprocess")  # the project lock is free again
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_a_stale_preload_process_is_replaced_and_an_idle_one_exits(project):
    env = {**ENV, "CVPIPE_PRELOAD_IDLE_S": "5"}
    assert _cvpipe(project, "preprocess", env=env).returncode == 0
    old = _wait_ready(project)["pid"]
    # A setting libraries read when they load (threads): the preload process cannot take it.
    stale_env = {**env, "OMP_NUM_THREADS": "1"}
    r = _cvpipe(project, "preprocess", env=stale_env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("differ from this process's ($OMP_NUM_THREADS): exiting"
            in (project / ".cvpipe" / "preload.log").read_text())
    new = _wait_ready(project)["pid"]
    assert new != old and not pid_alive(old)
    assert _cvpipe(project, "preprocess", env=stale_env).returncode == 0
    assert _served(project)[-1][1] == "preprocess" and preload.status(project)["pid"] == new
    deadline = time.monotonic() + 60
    while pid_alive(new) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pid_alive(new)
    assert "idle for 5 s, exiting" in (project / ".cvpipe" / "preload.log").read_text()
