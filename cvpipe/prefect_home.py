"""Prefect's state for a project: its environment, and the temporary servers a killed command left.

A flow run without ``PREFECT_API_URL`` starts Prefect's temporary API server (``uvicorn``) as a
child process, and stops it at exit. A command killed with SIGKILL cannot stop it: the server
lives on, orphaned. The command line marks each server it starts with the project and its own
pid (environment variables the child inherits), so the next command finds the servers whose
owner is gone and stops them. Linux only (``/proc``); elsewhere nothing is found.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: Set by the command line; inherited by the Prefect server it starts.
PROJECT_VAR = "CVPIPE_PROJECT"
OWNER_VAR = "CVPIPE_OWNER"  # "<pid>:<start time in clock ticks>" (a pid alone may be reused)
#: How a Prefect temporary server is started (prefect.server.api.server.SubprocessASGIServer).
SERVER_APP = "prefect.server.api.server:create_app"

PROC = Path("/proc")


def prefect_home(root: str | Path = ".") -> Path:
    """Where the project keeps Prefect's state (database, settings).

    A DVC experiment run outside the workspace (``dvc exp run --temp`` or ``--queue``) works in a
    copy under ``<project>/.dvc/tmp/exps/``: its runs belong to the project's history and server.
    """
    root = Path(root).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i + 1:i + 4] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i + 1]) / ".prefect"
    return root / ".prefect"


def prepare_env(root: str | Path = ".") -> None:
    """Point Prefect at the project and mark what this process starts as owned by it.

    The user's own ``PREFECT_HOME`` and settings win (``setdefault``); the owner marks always
    describe this process.
    """
    root = Path(root).resolve()
    os.environ.setdefault("PREFECT_HOME", str(prefect_home(root)))
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # The temporary server's telemetry service phones home (unreachable offline) and races the
    # first start-up's database writes ("database is locked"); it has no use here.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A fresh PREFECT_HOME runs all database migrations on first start: 20 s (the default) is not
    # enough on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ[PROJECT_VAR] = str(root)
    os.environ[OWNER_VAR] = owner_mark(os.getpid())
    refresh_prefect()


def refresh_prefect() -> None:
    """Make an already imported Prefect read its settings from the environment again.

    Prefect reads them when it is imported; a child of the preload process (:mod:`cvpipe.preload`)
    has it imported before its command sets ``PREFECT_HOME`` or ``PREFECT_API_URL``.
    """
    context = sys.modules.get("prefect.context")
    if context is not None:
        context.refresh_global_settings_context()


def _start_ticks(pid: int) -> int | None:
    """A process's start time (clock ticks since boot, /proc/<pid>/stat field 22); None when gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def _parent(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def owner_mark(pid: int) -> str:
    """``pid:start`` identifying a live process (see :data:`OWNER_VAR`)."""
    return f"{pid}:{_start_ticks(pid)}"


def _alive(mark: str) -> bool:
    """Whether the process of an owner mark still runs (a zombie, killed but not yet reaped, does not)."""
    pid, _, start = mark.partition(":")
    return pid.isdigit() and str(_start_ticks(int(pid))) == start and not _zombie(int(pid))


@dataclass(frozen=True)
class Orphan:
    """A Prefect temporary server whose owner is gone."""

    pid: int
    owner: str  # the owner mark, or "" for a server started without one


def _environ(pid: int) -> dict[str, str] | None:
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:  # another user's process, or gone
        return None
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def find_orphaned_servers(root: str | Path = ".") -> list[Orphan]:
    """Prefect temporary servers started for the project at ``root`` whose owner is gone.

    A server belongs to the project when its environment names the project (``CVPIPE_PROJECT``),
    or, for servers started without the mark, when its ``PREFECT_HOME`` is the project's
    ``.prefect`` and its parent is gone (re-parented to pid 1).
    """
    root = Path(root).resolve()
    if not PROC.is_dir():
        return []
    home = str(prefect_home(root))
    me = os.getpid()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if SERVER_APP.encode() not in cmdline.split(b"\0"):
            continue
        env = _environ(pid)
        if env is None or env.get("PREFECT__SERVER_EPHEMERAL") != "1":
            continue
        if env.get(PROJECT_VAR):
            if env[PROJECT_VAR] == str(root) and not _alive(env.get(OWNER_VAR, "")):
                found.append(Orphan(pid, env.get(OWNER_VAR, "")))
        elif env.get("PREFECT_HOME") == home and _parent(pid) in (1, None):
            found.append(Orphan(pid, ""))
    return found


def stop(pid: int, timeout_s: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout_s``; True when the process is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _start_ticks(pid) is None or _zombie(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    time.sleep(0.1)
    return _start_ticks(pid) is None or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:].split()[0] == "Z"


def stop_orphaned_servers(root: str | Path = ".") -> list[int]:
    """Stop the project's orphaned Prefect temporary servers; returns the pids stopped."""
    return [o.pid for o in find_orphaned_servers(root) if stop(o.pid)]
