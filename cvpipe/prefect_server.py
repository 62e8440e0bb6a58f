"""The project's persistent Prefect server: started once, reused by every later cvpipe process.

Without ``PREFECT_API_URL`` every Prefect process starts a temporary API server of its own
(database migrations, uvicorn) and stops it at exit: seconds to tens of seconds per command,
and no UI to look at afterwards. Instead, the first command that runs a flow (or
``cvpipe server start``) starts Prefect's server app on ``127.0.0.1:N`` as ``prefect server start``
runs it (:mod:`cvpipe.prefect_app`, which retries busy-database answers in the server), detached
(a new session, output to ``<PREFECT_HOME>/cvpipe-server.log``), with its database in
the project's Prefect home, and records its URL and pid in ``<PREFECT_HOME>/cvpipe-server.json``.
Later processes (CLI stages, ``cvpipe run``, ``dvc repro`` stages, ``cvpipe serve`` and the runs
it starts) find it there and set ``PREFECT_API_URL`` to it.

A recorded server is used only when its process is alive and ``/api/health`` answers at its URL
and ``/api/admin/settings`` names this Prefect home (so a port now answered by another program or
another project's server is never taken for ours). Otherwise it is replaced, with one line saying
why. Every wait has a timeout. A user who sets ``PREFECT_API_URL`` keeps full control: nothing is
started or stopped. ``CVPIPE_PREFECT_SERVER=temporary`` restores Prefect's temporary server per
process (what the tests that run the CLI use), on a port the system chose (:func:`pin_temporary_port`).

Why one module: the server's life cycle is one protocol over one state file and one lock: probe
the recorded server, decide whether it is ours and alive, start it under the lock or replace it,
stop it, connect a process to it. Each step reads the state the previous one wrote; kept in
order in one file, the protocol can be checked by reading it top to bottom.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cvpipe import prefect_db
from cvpipe.errors import UserError

STATE_FILE = "cvpipe-server.json"
LOG_FILE = "cvpipe-server.log"
LOCK_FILE = "cvpipe-server.lock"
HOST = "127.0.0.1"

#: ``persistent`` (default) or ``temporary`` (Prefect's per-process server, as before).
MODE_VAR = "CVPIPE_PREFECT_SERVER"
#: A fixed port for the server (default: the port it had last time if free, else any free port).
PORT_VAR = "CVPIPE_PREFECT_PORT"
#: Seconds to wait for a new server to answer (a new database not copied from cvpipe/prefect_db.py's
#: template runs all migrations first).
STARTUP_TIMEOUT_VAR = "CVPIPE_PREFECT_STARTUP_TIMEOUT"
#: Marks the server process (its environment), with the state file's token.
TOKEN_VAR = "CVPIPE_SERVER_TOKEN"
#: Set in a process that connected to the project's server (``PREFECT_API_URL`` is then ours, not the user's).
CONNECTED_VAR = "CVPIPE_SERVER_URL"

DEFAULT_STARTUP_TIMEOUT_S = 180.0
PROBE_TIMEOUT_S = 3.0

CORRUPT_DB_SIGNS = ("file is not a database", "database disk image is malformed", "malformed database schema")
PORT_TAKEN_SIGNS = ("address already in use", "is already in use")


class ServerError(UserError):
    """The project's Prefect server cannot be started or reached (one line for the user)."""


@dataclass(frozen=True)
class ServerState:
    """What ``cvpipe-server.json`` records about the running server."""

    pid: int
    port: int
    url: str  # the API URL, ``http://127.0.0.1:<port>/api``
    home: str  # PREFECT_HOME of the server (its database lives there)
    token: str
    started: float

    @property
    def ui_url(self) -> str:
        """Where the Prefect UI of this server is."""
        return self.url.removesuffix("/api")


def prefect_home() -> Path:
    """The Prefect home in use (``PREFECT_HOME``, set by :func:`cvpipe.prefect_home.prepare_env`)."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").resolve()


def state_path(home: Path | None = None) -> Path:
    return (home or prefect_home()) / STATE_FILE


def log_path(home: Path | None = None) -> Path:
    return (home or prefect_home()) / LOG_FILE


def read_state(home: Path | None = None) -> ServerState | None:
    """The recorded server, or None when none is recorded (or the record is unreadable)."""
    try:
        data = json.loads(state_path(home).read_text())
        return ServerState(**{k: data[k] for k in ServerState.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_state(state: ServerState) -> None:
    path = state_path(Path(state.home))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, path)


def _clear_state(home: Path) -> None:
    state_path(home).unlink(missing_ok=True)


# --------------------------------------------------------------------------- probes


def _get_json(url: str, timeout: float = PROBE_TIMEOUT_S):
    """GET ``url`` and decode JSON; None when nothing answers, or not with JSON, within ``timeout``."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    # Never through a proxy: the server is on 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return json.loads(resp.read(1 << 20).decode("utf-8", "replace"))
    except (OSError, ValueError, urllib.error.URLError):
        return None


def healthy(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a Prefect API at ``url`` answers ``/health``."""
    return _get_json(f"{url}/health", timeout) is True


def serves_home(url: str, home: Path, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Prefect API at ``url`` keeps its state in ``home`` (``/admin/settings``)."""
    settings = _get_json(f"{url}/admin/settings", timeout)
    if not isinstance(settings, dict) or not settings.get("home"):
        return False
    return Path(str(settings["home"])).expanduser().resolve() == home.resolve()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not; neither does pid 0 or below)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is gone for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[0] != "Z"
    except OSError:
        return True


def _is_ours(state: ServerState) -> bool:
    """The recorded process still runs and is the server we started (its environment holds our token)."""
    if not pid_alive(state.pid):
        return False
    try:
        env = Path(f"/proc/{state.pid}/environ").read_bytes().split(b"\0")
    except OSError:  # no /proc (not Linux): the HTTP checks decide
        return True
    return f"{TOKEN_VAR}={state.token}".encode() in env


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _configured_port() -> int | None:
    raw = os.environ.get(PORT_VAR, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ServerError(f"error: {PORT_VAR}={raw[:20]!r} is not a port number (1-65535)")
    return int(raw)


def _startup_timeout() -> float:
    try:
        return float(os.environ.get(STARTUP_TIMEOUT_VAR, DEFAULT_STARTUP_TIMEOUT_S))
    except ValueError:
        return DEFAULT_STARTUP_TIMEOUT_S


# --------------------------------------------------------------------------- lifecycle


@contextlib.contextmanager
def _server_lock(home: Path, timeout_s: float) -> Iterator[None]:
    """Only one process checks and starts the server at a time (``flock``, not inherited by the server)."""
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerError(f"error: another process has been starting the Prefect server of {home} "
                                      f"for over {timeout_s:.0f} s (see {log_path(home)})") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def check(state: ServerState | None, home: Path) -> str | None:
    """Why the recorded server cannot be used, or None when it can (alive, ours, answering)."""
    if state is None:
        return "no server recorded"
    if not _is_ours(state):
        if healthy(state.url):
            return f"port {state.port} now answers for another program"
        return f"its process (pid {state.pid}) is gone"
    if not healthy(state.url):
        return f"it does not answer at {state.url}"
    if not serves_home(state.url, home):
        return f"{state.url} is not this project's server"
    return None


def status(home: Path | None = None) -> tuple[ServerState | None, str | None]:
    """The recorded server and why it cannot be used (None when it is up)."""
    home = home or prefect_home()
    state = read_state(home)
    return state, check(state, home)


def _tail(path: Path, since: int, n: int = 8000) -> str:
    """The last ``n`` bytes of ``path`` written after offset ``since`` (this start-up's output only)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _server_env(home: Path, port: int, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", CONNECTED_VAR, "CVPIPE_OWNER", "CVPIPE_PROJECT")}
    url = f"http://{HOST}:{port}/api"
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        # The UI asks /ui-settings where the API is: without this it would call :4200 whatever the port.
        "PREFECT_UI_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        TOKEN_VAR: token,
    })
    return env


def _prefect_command(port: int) -> list[str]:
    """What ``prefect server start --host HOST --port N`` runs, with busy-database answers retried in the
    server (:mod:`cvpipe.prefect_app`); analytics are off through the environment (:func:`_server_env`)."""
    return [sys.executable, "-m", "cvpipe.prefect_app", "--host", HOST, "--port", str(port)]


def _kill_group(pid: int, timeout_s: float = 10.0) -> bool:
    """SIGTERM the server's process group, SIGKILL after ``timeout_s``; True when the server is gone."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.1)
    return not pid_alive(pid)


def _start(home: Path, port: int | None, say: Callable[[str], None]) -> ServerState:
    """Start the server (:func:`_prefect_command`) detached and wait (with a timeout) until it answers as ours."""
    configured = port is not None
    if port is None:
        previous = read_state(home)
        port = previous.port if previous and _port_free(previous.port) else _free_port()
    elif not _port_free(port):
        raise ServerError(f"error: port {port} on {HOST} is in use by another program: choose another one "
                          f"(cvpipe server start --port N, or {PORT_VAR}=N)")
    token = os.urandom(8).hex()
    log = log_path(home)
    url = f"http://{HOST}:{port}/api"
    env = _server_env(home, port, token)
    seeded = prefect_db.seed(_database(home), env)
    if seeded:  # the copy is migrated and holds the block types: this start need not check either
        env = prefect_db.first_start_env(env)
    with open(log, "ab") as out:
        since = out.tell()
        out.write(f"\n--- cvpipe: starting Prefect server on {url} at {time.ctime()}\n".encode())
        if seeded:
            out.write(f"--- cvpipe: new database {_database(home)} copied from {seeded}\n".encode())
        out.flush()
        proc = subprocess.Popen(_prefect_command(port), env=env, cwd=home,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    state = ServerState(pid=proc.pid, port=port, url=url, home=str(home), token=token, started=time.time())
    timeout = _startup_timeout()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = _tail(log, since).lower()
            if any(s in tail for s in CORRUPT_DB_SIGNS):
                raise _CorruptDatabase()
            if any(s in tail for s in PORT_TAKEN_SIGNS):
                if configured:
                    raise ServerError(f"error: port {port} on {HOST} is in use by another program: choose another "
                                      f"one (cvpipe server start --port N, or {PORT_VAR}=N)")
                raise _PortRace()
            raise ServerError(f"error: the Prefect server exited at start-up (code {code}); see {log}")
        if healthy(url, timeout=1.0) and serves_home(url, home):
            _write_state(state)
            return state
        time.sleep(0.05)  # a cheap local request: answer as soon as the server does
    _kill_group(proc.pid)
    raise ServerError(f"error: the Prefect server did not answer at {url} within {timeout:.0f} s "
                      f"({STARTUP_TIMEOUT_VAR} to wait longer); see {log}")


class _CorruptDatabase(Exception):
    pass


class _PortRace(Exception):
    pass


def _database(home: Path) -> Path:
    return home / "prefect.db"


def start(home: Path | None = None, port: int | None = None, say: Callable[[str], None] = print) -> ServerState:
    """The project's server, started if needed; a recorded one that is dead or not ours is replaced.

    Args:
        home: the Prefect home (default: ``PREFECT_HOME``).
        port: the port for a new server (default: ``CVPIPE_PREFECT_PORT``, else the last one if free, else any).
        say: where one-line notices go (a replaced server, a database moved aside).

    Raises:
        ServerError: one line for the user (port in use, start-up failed or timed out).
    """
    home = home or prefect_home()
    port = port if port is not None else _configured_port()
    timeout = _startup_timeout()
    with _server_lock(home, timeout + 30):
        state = read_state(home)
        why = check(state, home)
        if why is None:
            if port is not None and state.port != port:
                raise ServerError(f"error: the project's Prefect server already runs on port {state.port} "
                                  f"(pid {state.pid}); stop it first (cvpipe server stop) to use port {port}")
            return state
        if state is not None:
            say(f"cvpipe: replacing the project's Prefect server ({why})")
            if _is_ours(state):  # alive but not answering: a hung server
                _kill_group(state.pid)
            _clear_state(home)
        for attempt in range(3):
            try:
                return _start(home, port, say)
            except _PortRace:  # a free port was taken between our check and the server's bind
                continue
            except _CorruptDatabase:
                db = _database(home)
                aside = db.with_name(f"prefect.db.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
                if attempt or not db.exists():
                    raise ServerError(f"error: the Prefect database {db} is unreadable; see {log_path(home)}") from None
                for suffix in ("", "-wal", "-shm"):
                    src = Path(str(db) + suffix)
                    if src.exists():
                        os.replace(src, Path(str(aside) + suffix))
                say(f"cvpipe: the Prefect database {db} was unreadable (corrupted): moved it to {aside.name} "
                    "and started with a new one")
        raise ServerError(f"error: could not find a free port on {HOST} for the Prefect server")


def stop(home: Path | None = None) -> ServerState | None:
    """Stop the project's recorded server; returns it, or None when none ran."""
    home = home or prefect_home()
    with _server_lock(home, _startup_timeout() + 30):
        state = read_state(home)
        if state is None:
            return None
        running = _is_ours(state)
        if running and not _kill_group(state.pid):
            raise ServerError(f"error: could not stop the Prefect server (pid {state.pid})")
        _clear_state(home)
        return state if running else None


def pin_temporary_port() -> int:
    """Give Prefect's temporary server of this process a port the system chose; returns it.

    Left to itself, Prefect's temporary server draws a port from 8000-8999 at random, checks that
    it is free and starts uvicorn there, then takes whatever answers ``/api/health`` on that port
    for its own. Two commands that start at once can draw the same port (1 in 1,000): the second
    server cannot bind it, and the second command records its runs in the first one's server (in
    the first project's database), then fails when that command ends and stops it. Instead the
    system picks the port (bind to port 0): one that is free at that moment, drawn from its
    ephemeral range (about 28,000 ports, outside Prefect's). Prefect's own test harness does the
    same: a server registered under the default key is the one every client of this process
    starts and uses.
    """
    from prefect.server.api.server import SubprocessASGIServer

    current = SubprocessASGIServer._instances.get(None)
    if current is not None and (current.running or current.port is not None):
        return current.port
    server = SubprocessASGIServer(port=_free_port())
    SubprocessASGIServer._instances[None] = server
    return server.port


def mode() -> str:
    """``persistent`` or ``temporary`` (:data:`MODE_VAR`)."""
    value = os.environ.get(MODE_VAR, "persistent").strip().lower() or "persistent"
    if value not in ("persistent", "temporary"):
        raise ServerError(f"error: {MODE_VAR} must be persistent or temporary, not {value[:20]!r}")
    return value


def user_api_url() -> str | None:
    """The user's own ``PREFECT_API_URL`` (one this module did not set), or None."""
    url = os.environ.get("PREFECT_API_URL")
    if url and url != os.environ.get(CONNECTED_VAR):
        return url
    return None


def connect(say: Callable[[str], None] = print, refresh: bool = True) -> str | None:
    """Point this process (and the processes it starts) at the project's server, starting it if needed.

    Prefect reads its settings at import: run this first, or (in a child of the preload process,
    where Prefect is loaded already) it makes Prefect read them again. Nothing is done
    when the user set ``PREFECT_API_URL`` or chose ``CVPIPE_PREFECT_SERVER=temporary``.

    Returns:
        The API URL in use, or None for Prefect's temporary server.
    """
    if user_api_url():
        return user_api_url()
    if mode() == "temporary":
        pin_temporary_port()
        return None
    state = start(say=say)
    os.environ["PREFECT_API_URL"] = state.url
    os.environ[CONNECTED_VAR] = state.url
    if refresh:  # False when another thread may be importing Prefect right now: the caller refreshes
        from cvpipe.prefect_home import refresh_prefect

        refresh_prefect()
    return state.url
