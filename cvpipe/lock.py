"""One cvpipe command at a time per project: an advisory lock on ``<project>/.cvpipe/lock``.

Every command that runs stages or writes params.yaml holds the lock for its whole run, so a
second ``cvpipe run --set ...`` cannot rewrite params.yaml under a running one. The lock is
``flock(2)`` on an open file: the kernel drops it when its owner exits, however it exits
(kill -9 included), so a stale lock is never left behind. The file itself records who holds
it (pid, command line, start time) for the message shown to the next command.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cvpipe.errors import UserError

LOCK_DIR = ".cvpipe"
LOCK_FILE = "lock"

# Locks held by this process, by resolved project root: a command that takes the lock again
# (a flow started by a command that already holds it) only counts up.
_HELD: dict[Path, "ProjectLock"] = {}
_HELD_GUARD = threading.Lock()


@dataclass(frozen=True)
class Holder:
    """Who holds a project lock, as recorded in the lock file."""

    pid: int | None
    command: str
    started: float | None

    def describe(self) -> str:
        """``pid N, `cvpipe run ...`, since HH:MM:SS`` (the date too when it is not today)."""
        pid = f"pid {self.pid}" if self.pid is not None else "pid unknown"
        if self.started is None:
            return f"{pid}, `{self.command}`"
        t = time.localtime(self.started)
        fmt = "%H:%M:%S" if time.strftime("%Y%m%d", t) == time.strftime("%Y%m%d") else "%Y-%m-%d %H:%M:%S"
        return f"{pid}, `{self.command}`, since {time.strftime(fmt, t)}"


class ProjectBusy(UserError):
    """Another cvpipe command holds this project's lock."""

    def __init__(self, holder: Holder):
        self.holder = holder
        super().__init__(f"another cvpipe command is running in this project: {holder.describe()} "
                         "(wait for it or stop it)")


def lock_path(root: str | Path = ".") -> Path:
    """The lock file of the project at ``root``."""
    return Path(root).resolve() / LOCK_DIR / LOCK_FILE


def command_line(argv: list[str] | None = None, limit: int = 200) -> str:
    """This process's command line as the user typed it (``cvpipe run --set ...``), cut to ``limit``."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name in ("cvpipe", "__main__.py", "cli.py"):
        argv[0] = "cvpipe"
    text = shlex.join(argv) if argv else "?"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_holder(fd: int) -> Holder:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    pid, started = data.get("pid"), data.get("started")
    return Holder(pid if isinstance(pid, int) else None, str(data.get("command") or "?")[:200],
                  float(started) if isinstance(started, (int, float)) else None)


class ProjectLock:
    """The lock of one project; use as a context manager or with :meth:`acquire` / :meth:`release`.

    Args:
        root: the project folder (where the stages, DVC and ``.prefect`` live).
        command: what to record as the holder's command (default: this process's command line).
    """

    def __init__(self, root: str | Path = ".", command: str | None = None):
        self.root = Path(root).resolve()
        self.path = lock_path(self.root)
        self.command = command
        self._fd: int | None = None
        self._depth = 0

    def acquire(self, wait: bool = False, poll_s: float = 1.0,
                on_wait: Callable[[Holder], None] | None = None) -> "ProjectLock":
        """Take the lock, or raise :class:`ProjectBusy` naming its holder.

        Args:
            wait: wait for the holder to finish instead of raising.
            poll_s: seconds between attempts while waiting.
            on_wait: called once with the holder when waiting starts.

        Returns:
            The lock that is now held (the one already held by this process, if any).
        """
        with _HELD_GUARD:
            held = _HELD.get(self.root)
            if held is not None:
                held._depth += 1
                return held
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Not inherited by programs this process starts (the Prefect server): an orphaned
            # child must never keep the project locked.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            told = False
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        holder = self._holder_of(fd)
                        if not wait:
                            raise ProjectBusy(holder) from None
                        if on_wait is not None and not told:
                            on_wait(holder)
                            told = True
                        time.sleep(poll_s)
                record = {"pid": os.getpid(), "command": self.command or command_line(), "started": time.time()}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._depth = fd, 1
            _HELD[self.root] = self
            return self

    @staticmethod
    def _holder_of(fd: int) -> Holder:
        # The holder writes its record right after taking the lock: give it a moment.
        for _ in range(20):
            holder = _read_holder(fd)
            if holder.pid is not None:
                return holder
            time.sleep(0.05)
        return holder

    def release(self) -> None:
        """Release the lock (once every nested :meth:`acquire` of this process has been released)."""
        with _HELD_GUARD:
            held = _HELD.get(self.root)
            if held is None:
                return
            held._depth -= 1
            if held._depth > 0:
                return
            del _HELD[self.root]
            fd, held._fd = held._fd, None
            if fd is not None:
                os.ftruncate(fd, 0)
                os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> "ProjectLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(root: str | Path = ".") -> Holder | None:
    """Who holds the project's lock now, or None when it is free."""
    path = lock_path(root)
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return ProjectLock._holder_of(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
