"""What an MLflow run is tagged with besides its stage: its source (file, git commit), the DVC
experiment running it, extra tags of the caller (a sweep's id), and its owner process; and which
RUNNING runs a killed process left behind.

Each run is tagged with its owner's host, pid and the pid's start time; when the next stage
starts, runs of this host still RUNNING whose process is gone (or whose pid now belongs to another
process) are marked KILLED, so the UI never shows a run "running" forever.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

#: Tags every run opened in this context carries besides its own (a sweep's id): see :func:`extra_tags`.
_EXTRA: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("cvpipe_extra_run_tags", default={})
# DVC sets these while `dvc exp run` executes a stage; recording them lets both tools name the same run.
DVC_ENV_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev", "DVC_ROOT": "dvc.root"}
# Who opened a run: a run still RUNNING whose process is gone on this host was killed.
HOST_TAG, PID_TAG, PID_START_TAG = "cvpipe.host", "cvpipe.pid", "cvpipe.pid_start"


def owner_tags() -> dict[str, str]:
    """Tags naming this process: host, pid and the pid's start time (which tells a reused pid apart)."""
    start = _process_start(os.getpid())
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: start or ""}


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``); None where unknown."""
    stat = _proc_stat(pid)
    return stat[19] if stat is not None and len(stat) > 19 else None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first); None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def owner_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process named by a run's owner tags still runs on this host.

    A zombie, or a pid now held by a process that started at another time, counts as gone.
    """
    try:
        pid = int(tags[PID_TAG])
    except (KeyError, ValueError):
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (not Linux): trust kill(); with /proc, the process just ended
        return not Path("/proc/self/stat").exists()
    if stat[0] == "Z":
        return False
    started = tags.get(PID_START_TAG)
    return not started or len(stat) <= 19 or stat[19] == started


def reap_stale_runs(client, experiment_id: str) -> list[str]:
    """Mark KILLED the runs of this experiment still RUNNING whose owner process on this host is gone.

    Runs of other hosts, of live processes, and runs without owner tags are left alone.

    Returns:
        The ids of the runs marked KILLED.
    """
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], max_results=1000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'")
    killed = []
    for run in runs:
        if run.info.status == "RUNNING" and not owner_alive(run.data.tags):
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    return killed


def source_tags(stage: str, root: Path | None = None) -> dict[str, str]:
    """MLflow's source tags, which fill the UI's Source column and a run's Git commit.

    The source is the stage's flow file; the commit is that of the git checkout holding ``root``
    (the working directory by default) and is left out outside a checkout or without git.
    """
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": f"flows/{stage}.py"}
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or Path.cwd(), capture_output=True, text=True,
                           timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return tags
    if r.returncode == 0 and r.stdout.strip():
        tags["mlflow.source.git.commit"] = r.stdout.strip()
    return tags


def dvc_tags() -> dict[str, str]:
    """The DVC experiment running this stage, from the variables `dvc exp run` sets."""
    return {t: os.environ[e] for e, t in DVC_ENV_TAGS.items() if os.environ.get(e)}


def current_extra_tags() -> dict[str, str]:
    """The tags :func:`extra_tags` set for this context."""
    return dict(_EXTRA.get())


@contextlib.contextmanager
def extra_tags(tags: Mapping[str, Any]) -> Iterator[None]:
    """Add ``tags`` to every MLflow run :func:`stage_run` opens inside this block (this thread)."""
    token = _EXTRA.set({**_EXTRA.get(), **{k: str(v) for k, v in tags.items()}})
    try:
        yield
    finally:
        _EXTRA.reset(token)
