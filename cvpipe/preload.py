"""A warm process per project that runs cvpipe commands in forks of itself.

A stage's own work often takes a second or two; importing what it needs (torch, Prefect, MLflow,
DVC, scikit-learn) takes about four. So the first stage command in a project runs on its own and,
as it ends, starts a *preload process* (``python -P -m cvpipe.preload serve``, detached, log in
``.cvpipe/preload.log``); the preload process imports those libraries once, then waits on a Unix
socket (``.cvpipe/preload.sock``, mode 0600, same user only). Each later ``cvpipe <stage>`` (typed
by hand or run by ``dvc repro``; one that arrives while it loads waits for it) is a thin client: it sends its arguments, working folder,
environment, umask and its own stdin/stdout/stderr (file descriptors, over the socket) and the
preload process forks. The fork runs the ordinary command line in a fresh child process with the
client's terminal, so progress bars, errors and exit codes are exactly those of a cold run; the
client relays Ctrl-C (and SIGTERM, SIGHUP) to it and exits with its exit code. A client that dies
takes its child with it.

What a child never reuses from the preload process:

- **The project's own code.** ``cvpipe``, ``flows`` and ``tasks`` are imported by the preload
  process only to load their libraries, then dropped from ``sys.modules``: each child imports them
  again from disk, so an edited stage runs as edited.
- **Settings.** The child takes the client's environment, folder, umask and ``sys.path``, re-reads
  Prefect's settings from that environment, and reseeds NumPy's global generator.
- **Libraries that changed.** A request whose interpreter, library folders (their modification
  times: installing or removing a package changes them), thread or device settings
  (``OMP_*``, ``CUDA_*``, ...) or this module differ from the preload process's is refused as
  stale: the preload process exits and the client starts a new one.

The preload process exits after ``CVPIPE_PRELOAD_IDLE_S`` seconds without work (default 900);
``cvpipe server stop`` stops it, ``cvpipe server status`` shows it. ``CVPIPE_PRELOAD=off`` runs
every command in its own process, as before; so do commands in a folder whose socket path would
exceed the system's limit. If the preload process cannot start, the command runs on its own with
one line saying so.

Why one module: the client and the preload process speak one protocol (request with descriptors,
fork, exit status back) over one socket; the stale check, the fork and the relay are read as one
sequence.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from cvpipe.prefect_server import pid_alive

MODE_VAR = "CVPIPE_PRELOAD"
IDLE_VAR = "CVPIPE_PRELOAD_IDLE_S"
STARTUP_VAR = "CVPIPE_PRELOAD_STARTUP_TIMEOUT"
DEFAULT_IDLE_S = 900.0
DEFAULT_STARTUP_S = 120.0
DIR = ".cvpipe"
SOCKET = "preload.sock"
LOG = "preload.log"
SPAWN_LOCK = "preload.lock"
PID_FILE = "preload.pid"
#: AF_UNIX paths longer than this are refused by the kernel (108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 104

#: The commands that run in the preload process: those that import the heavy libraries.
PRELOADED_COMMANDS = frozenset({"download", "preprocess", "train", "evaluate", "detect", "run", "sweep",
                                "compare", "predict"})
#: Environment variables read by libraries when they load (thread pools, devices, allocators):
#: a request must match the preload process on all of them.
LOAD_TIME_ENV = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "CUDA_", "NVIDIA_", "PYTORCH_", "TORCH_", "OPENCV_",
                 "LD_", "PYTHON", "MALLOC_", "CVPIPE_PRELOAD")
#: The project's packages: imported by the preload process only to load their libraries.
PROJECT_PACKAGES = ("cvpipe", "flows", "tasks")
#: What the preload process imports: the project's entry points (their libraries come along) and the
#: libraries the stages import inside functions.
WARM_MODULES = ("cvpipe.cli", "cvpipe.cli_support", "cvpipe.predict", "cvpipe.compare", "flows.pipeline",
                "flows.sweep", "flows.train", "flows.evaluate", "flows.detect", "flows.download",
                "flows.preprocess", "flows.registry", "flows.tracking", "tasks.train", "tasks.evaluate",
                "tasks.detect", "tasks.preprocess", "tasks.download", "torch", "torchvision", "cv2",
                "sklearn.model_selection", "sklearn.metrics", "mlflow", "mlflow.pyfunc", "mlflow.tracking",
                "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
                "dvc.repo", "dvc.lock", "prefect", "prefect.flows", "prefect.client.orchestration",
                "prefect.artifacts", "prefect.task_runners", "matplotlib.pyplot", "PIL.Image", "tqdm")

_HEADER = struct.Struct("!Q")
#: What a client relays to its child.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Set in a child once its command has ended: the client leaving after that is no reason to stop it.
_FINISHED = threading.Event()


# --------------------------------------------------------------------------- where and whether


def enabled() -> bool:
    value = os.environ.get(MODE_VAR, "on").strip().lower()
    return value not in ("off", "0", "false", "no")


def project_root(cwd: str | Path | None = None) -> Path:
    """The project a command in ``cwd`` belongs to (a ``dvc exp run --temp`` copy belongs to its project)."""
    from cvpipe.prefect_home import prefect_home

    return prefect_home(cwd or Path.cwd()).parent


def socket_path(root: Path) -> Path:
    return root / DIR / SOCKET


def log_path(root: Path) -> Path:
    return root / DIR / LOG


def wanted(argv: list[str]) -> bool:
    """Whether ``cvpipe argv`` should run in the preload process (a stage command, not ``--help``)."""
    if not enabled() or not argv or argv[0] not in PRELOADED_COMMANDS:
        return False
    return not any(a in ("--help", "-h") for a in argv[1:])


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


# --------------------------------------------------------------------------- stale check


def fingerprint(executable: str, path: list[str], env: dict[str, str]) -> dict[str, str]:
    """What a child inherits from the preload process and cannot change: interpreter, library folders
    (and their modification times), load-time environment, this module. One entry per item."""
    parts = {"interpreter": executable, "this module": str(os.stat(__file__).st_mtime_ns)}
    for i, entry in enumerate(path):
        try:
            mtime = str(os.stat(entry or ".").st_mtime_ns)
        except OSError:
            mtime = "-"
        parts[f"sys.path[{i}]"] = f"{entry} {mtime}"
    parts.update({f"${k}": v for k, v in env.items() if k.startswith(LOAD_TIME_ENV)})
    return parts


def differences(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """The names (never the values) of the items that differ."""
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


# --------------------------------------------------------------------------- client


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    payload = json.dumps(message).encode()
    header = _HEADER.pack(len(payload))
    if fds:
        socket.send_fds(sock, [header], fds)
    else:
        sock.sendall(header)
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _recv(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    if max_fds:
        head, fds, _, _ = socket.recv_fds(sock, _HEADER.size, max_fds)
        if len(head) < _HEADER.size:
            rest = _recv_exact(sock, _HEADER.size - len(head)) if head else None
            if rest is None:
                return None, fds
            head += rest
    else:
        fds = []
        head = _recv_exact(sock, _HEADER.size)
        if head is None:
            return None, fds
    (n,) = _HEADER.unpack(head)
    body = _recv_exact(sock, n)
    return (json.loads(body) if body is not None else None), fds


def _connect(path: Path, timeout: float = 5.0) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        return None
    s.settimeout(None)
    return s


def _request(root: Path, op: str) -> dict | None:
    """A control request (``status``, ``stop``) to the project's preload process; None when none answers."""
    path = socket_path(root)
    s = _connect(path)
    if s is None:
        return None
    with s:
        _send(s, {"op": op})
        s.settimeout(30)
        try:
            reply, _ = _recv(s)
        except OSError:
            return None
        return reply


def status(root: Path) -> dict | None:
    """``{"pid", "started", "served"}`` of the running preload process, or None."""
    return _request(root, "status")


def stop(root: Path, timeout_s: float = 30.0) -> dict | None:
    """Stop the project's preload process (commands it runs finish first); returns its status, or None."""
    reply = _request(root, "stop")
    if reply is None:
        return None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(reply.get("pid", 0)):
        time.sleep(0.05)
    return reply


@contextlib.contextmanager
def _spawn_lock(root: Path):
    (root / DIR).mkdir(mode=0o700, exist_ok=True)
    with open(root / DIR / SPAWN_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _starting_pid(root: Path) -> int | None:
    """The pid of a preload process started for ``root`` that is still alive (ready or loading), or None."""
    try:
        pid = int((root / DIR / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"cvpipe.preload" in cmdline and pid_alive(pid) else None


def start(root: Path, wait: bool = True, say=lambda line: print(line, file=sys.stderr),
          env: dict[str, str] | None = None) -> bool:
    """Start the project's preload process unless one runs or is loading.

    With ``wait``, wait until it is ready and return True (False if it failed: the caller runs on its
    own). Without, return at once: True when one was ready already.
    """
    path = socket_path(root)
    with _spawn_lock(root):
        s = _connect(path)
        if s is not None:
            s.close()
            return True
        pid = _starting_pid(root)
        if pid is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by a killed preload process
            with open(log_path(root), "ab") as out:
                out.write(f"\n--- cvpipe: starting the preload process at {time.ctime()}\n".encode())
                out.flush()
                proc = subprocess.Popen([sys.executable, "-P", "-m", "cvpipe.preload", "serve", str(root)],
                                        cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            (root / DIR / PID_FILE).write_text(f"{proc.pid}\n")
            pid = proc.pid
    if not wait:
        return False
    deadline = time.monotonic() + _float_env(STARTUP_VAR, DEFAULT_STARTUP_S)
    while time.monotonic() < deadline:
        s = _connect(path)
        if s is not None:
            s.close()
            return True
        if not pid_alive(pid):
            say(f"cvpipe: the preload process exited at start-up (see {log_path(root)}); "
                "running this command on its own")
            return False
        time.sleep(0.05)
    say(f"cvpipe: the preload process was not ready in time (see {log_path(root)}); running this command on its own")
    return False


def _start_quietly(root: Path, env: dict[str, str]) -> None:
    with contextlib.suppress(OSError):
        start(root, wait=False, env=env)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run(argv: list[str]) -> int | None:
    """Run ``cvpipe argv`` in the project's preload process (starting it if needed): its exit code,
    or None when the command should run in this process instead."""
    try:
        return _run(argv)
    except OSError as err:  # no .cvpipe folder can be made here, ...: run as a plain process
        print(f"cvpipe: not using the preload process ({err})", file=sys.stderr)
        return None


def _run(argv: list[str]) -> int | None:
    root = project_root()
    path = socket_path(root)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        return None
    # Signals this process ignores (``nohup``, a background job of a script) stay ignored in the child.
    ignored = [int(sig) for sig in FORWARDED if signal.getsignal(sig) == signal.SIG_IGN]
    request = {"op": "run", "argv": [sys.argv[0], *argv], "cwd": os.getcwd(), "env": dict(os.environ),
               "umask": _umask(), "executable": sys.executable, "path": sys.path, "client": os.getpid(),
               "ignored_signals": ignored}
    for _ in range(2):  # a stale preload process exits; the second round starts a new one
        s = _connect(path)
        if s is None:
            # None ready: one that is loading is waited for (it is as quick as loading here); else one
            # is started for the next command, and this one runs on its own (a typo fails at once).
            if _starting_pid(root) is None:
                # Started when this command ends, so that loading does not compete with its work.
                # With the environment this command started with: the command line and the libraries
                # add to it (PREFECT_HOME, CUDA_MODULE_LOADING, ...), a fresh command would not have those.
                atexit.register(_start_quietly, root, request["env"])
                return None
            if not start(root, wait=True, env=request["env"]):
                return None
            s = _connect(path)
            if s is None:
                return None
        with s:
            try:
                _send(s, request, [0, 1, 2])
                reply, _ = _recv(s)
            except OSError:
                reply = None
            if reply is not None and reply.get("started"):
                return _relay(s, [sig for sig in FORWARDED if int(sig) not in ignored])
        # Stale (it predates a change of libraries or settings, and exits) or gone: start another.
    return None


def _relay(s: socket.socket, signals: list[signal.Signals]) -> int:
    """Forward this client's ``signals`` to the child until it reports its exit code."""
    def forward(signum, _frame):
        with contextlib.suppress(OSError):
            _send(s, {"signal": signum})

    for sig in signals:
        signal.signal(sig, forward)
    while True:
        try:
            reply, _ = _recv(s)
        except InterruptedError:
            continue
        except OSError:
            reply = None
        if reply is None:
            print("cvpipe: the preload process ended before the command did; its outcome is unknown "
                  "(see .cvpipe/preload.log)", file=sys.stderr)
            return 1
        if "rc" in reply:
            return int(reply["rc"])


# --------------------------------------------------------------------------- preload process


def _warm() -> None:
    """Import the libraries; then drop the project's own modules so that each child imports them anew.

    The garbage collector is paused meanwhile (what CPython's documentation of ``gc.freeze``
    advises for a process that forks): instead of hundreds of passes over a heap growing to 1.2
    million tracked objects, one collection at the end (0.7 s) leaves 790,000. The imports took
    5.9 to 7.0 s instead of 7.7 to 7.9 s, collection included (3 runs each, alternated).
    """
    import gc
    import importlib

    gc.disable()
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # an optional library missing: the child will say so if it needs it
            print(f"preload: import {name} failed: {err!r}", flush=True)
    try:
        # The first model a process logs makes MLflow map every installed distribution to its modules
        # (its requirements check: 0.53 s measured); mapped here, every child has it. The preload
        # process is replaced when the installed packages change (the fingerprint's library mtimes).
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()
    except Exception as err:  # a warm-up only: a child maps them itself
        print(f"preload: MLflow's package map failed: {err!r}", flush=True)
    for name in [m for m in sys.modules if m.partition(".")[0] in PROJECT_PACKAGES and m != __name__]:
        del sys.modules[name]
    gc.collect()
    gc.freeze()  # children do not dirty these pages by collecting them
    gc.enable()


class _Server:
    def __init__(self, root: Path, fingerprint: dict[str, str]):
        self.root = root
        self.path = socket_path(root)
        self.fingerprint = fingerprint
        self.idle_s = _float_env(IDLE_VAR, DEFAULT_IDLE_S)
        self.children: dict[int, socket.socket] = {}
        self.served = 0
        self.started = time.time()
        self.last_active = time.monotonic()
        self.stopping = False
        self.listener: socket.socket | None = None

    def listen(self) -> None:
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        tmp = self.path.with_name(f"{SOCKET}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(tmp))
        finally:
            os.umask(old)
        listener.listen(16)
        os.replace(tmp, self.path)  # appears only once the libraries are loaded: a client that connects is served
        self.listener = listener
        self.inode = os.stat(self.path).st_ino

    def owns_socket(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def close(self) -> None:
        if self.listener is not None:
            if self.owns_socket():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            pid_file = self.root / DIR / PID_FILE
            with contextlib.suppress(OSError, ValueError):
                if int(pid_file.read_text().strip()) == os.getpid():
                    pid_file.unlink()
            self.listener.close()
            self.listener = None

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            rc = os.waitstatus_to_exitcode(status)
            rc = 128 - rc if rc < 0 else rc
            if conn is not None:
                with contextlib.suppress(OSError):
                    _send(conn, {"rc": rc})
                conn.close()
            self.last_active = time.monotonic()
            print(f"preload: pid {pid} ended with {rc}", flush=True)

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select
        print(f"preload: pid {os.getpid()} ready on {self.path}", flush=True)
        while True:
            self.reap()
            if self.stopping or not self.owns_socket():
                break
            if not self.children and time.monotonic() - self.last_active > self.idle_s:
                print(f"preload: idle for {self.idle_s:.0f} s, exiting", flush=True)
                break
            try:
                ready, _, _ = select.select([self.listener], [], [], 1.0)
            except InterruptedError:
                continue
            if ready:
                with contextlib.suppress(OSError):
                    self.accept()
        self.close()
        # Commands still running finish on their own; their clients get their exit codes from them.
        for conn in self.children.values():
            conn.close()

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            conn.close()
            return
        conn.settimeout(10)
        request, fds = _recv(conn, max_fds=3)
        conn.settimeout(None)
        if request is None:
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        op = request.get("op")
        if op in ("status", "stop"):
            _send(conn, {"pid": os.getpid(), "started": self.started, "served": self.served,
                         "running": len(self.children)})
            conn.close()
            self.stopping = self.stopping or op == "stop"
            return
        if op != "run" or len(fds) != 3:
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        # The client's sys.path[0] is its script's folder; this process (python -P) has none.
        theirs = fingerprint(request["executable"], request["path"][1:], request["env"])
        changed = differences(self.fingerprint, theirs)
        if changed:
            self.close()  # the next client starts a new preload process instead of asking this one
            _send(conn, {"stale": True})
            conn.close()
            for fd in fds:
                os.close(fd)
            print(f"preload: a request's libraries or settings differ from this process's "
                  f"({', '.join(changed)[:300]}): exiting", flush=True)
            self.stopping = True
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _child(conn, request, fds, self.listener, list(self.children.values()))
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.served += 1
        self.last_active = time.monotonic()
        print(f"preload: pid {pid} runs {' '.join(request['argv'][1:])[:200]} for client {request.get('client')}",
              flush=True)


def _child(conn: socket.socket, request: dict, fds: list[int], listener, others) -> None:
    """Become the client's command: its descriptors, folder, environment, then the ordinary CLI."""
    code = 1
    try:
        listener.close()
        for other in others:
            other.close()
        # The client's dispositions, not the preload process's (which may have been started ignoring
        # SIGINT, by a background job): Ctrl-C is a KeyboardInterrupt unless the client ignores it.
        ignored = set(request.get("ignored_signals", []))
        for sig in FORWARDED:
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, signal.SIG_IGN if int(sig) in ignored else default)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        sys.stderr.reconfigure(line_buffering=True)
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        sys.path[:] = request["path"]
        _refresh_libraries()
        _send(conn, {"started": True, "pid": os.getpid()})
        threading.Thread(target=_watch_client, args=(conn,), daemon=True).start()
        code = _run_cli(sys.argv[1:])
    except BaseException:  # noqa: BLE001 - whatever happens, the client gets an exit code
        import traceback

        traceback.print_exc()
    finally:
        _FINISHED.set()
        finish(code, before_exit=lambda: _send_quietly(conn, {"rc": code}))


def _send_quietly(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        _send(conn, message)


def finish(code: int, before_exit=None) -> None:
    """End this process as a normal exit does, minus tearing down every module.

    Threads are joined and exit handlers run (MLflow and Prefect flush their queues there), output
    is flushed; then ``os._exit``. With torch, MLflow, Prefect and DVC loaded, the module teardown
    that this skips takes over a second at the end of every command and does nothing for it.
    """
    try:
        shutdown = getattr(threading, "_shutdown", None)  # what interpreter exit runs first
        if shutdown is not None and threading.current_thread() is threading.main_thread():
            shutdown()
        atexit._run_exitfuncs()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        if before_exit is not None:
            before_exit()
        os._exit(code)


def exit_code(ex: SystemExit) -> int:
    """The status ``sys.exit(ex.code)`` would give (a message is printed, as Python does)."""
    if ex.code is None:
        return 0
    if isinstance(ex.code, int):
        return ex.code
    print(ex.code, file=sys.stderr)
    return 1


def _refresh_libraries() -> None:
    """What a library read from the environment or seeded when the preload process loaded it."""
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def _watch_client(conn: socket.socket) -> None:
    """Deliver the client's forwarded signals; if the client is gone, end as a killed command would."""
    while True:
        try:
            msg, _ = _recv(conn)
        except OSError:
            msg = None
        if msg is None:
            if not _FINISHED.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
            return
        sig = msg.get("signal")
        if isinstance(sig, int) and sig in FORWARDED:
            os.kill(os.getpid(), sig)


def _run_cli(argv: list[str]) -> int:
    from cvpipe.cli import app

    try:
        app(args=argv, prog_name="cvpipe")
    except SystemExit as ex:
        return exit_code(ex)
    return 0


def serve(root: Path) -> None:
    """The preload process: load the libraries, then fork a child per request until idle or stopped."""
    os.chdir(root)
    from cvpipe.prefect_home import prepare_env

    # Taken before loading anything: a library may add to sys.path as it loads.
    mark = fingerprint(sys.executable, list(sys.path), dict(os.environ))
    prepare_env(root)  # the environment the libraries load under, as the command line sets it
    _warm()
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        print(f"preload: threads started while loading: {threads}", flush=True)
    server = _Server(root, mark)
    server.listen()
    try:
        server.serve_forever()
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "serve":
        print("usage: python -P -m cvpipe.preload serve PROJECT_ROOT", file=sys.stderr)
        sys.exit(2)
    serve(Path(argv[1]).resolve())


if __name__ == "__main__":
    main()
