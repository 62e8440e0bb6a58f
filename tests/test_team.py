"""Working as a team, with real servers started as separate processes on 127.0.0.1.

- a DVC remote over the S3 API (``moto_server``): push with the run-cache, a fresh ``git clone``
  pulls and reproduces nothing, a dropped connection fails clearly and a retry succeeds;
- a shared MLflow tracking server (``mlflow server --serve-artifacts``): two projects log at once,
  the better model becomes the champion, everything survives a restart;
- detection on a Dask cluster (``dask scheduler`` + two ``dask worker``): the same detections as on
  threads, and none lost when a worker is killed mid-batch;
- ``cvpipe serve`` on the project's Prefect server runs a triggered deployment run to completion.

Every process a test starts is stopped by a finalizer (its whole process group).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, write_params

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux")]

BIN = Path(sys.executable).parent
CVPIPE = str(BIN / "cvpipe")
DVC = [sys.executable, "-m", "dvc"]
# Credentials come from the environment, never from a file in git.
S3_ENV = {"AWS_ACCESS_KEY_ID": "team-key", "AWS_SECRET_ACCESS_KEY": "team-secret", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "cvpipe-dvc"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT), **S3_ENV)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 1200,
         ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if ok:
        assert r.returncode == 0, f"{args}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


class Processes:
    """Processes started by a test, each in its own session; all stopped (group SIGKILL) at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}-{len(self.started)}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(args, cwd=cwd, env=env or _env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        proc.log_path = Path(log.name)
        log.close()
        self.started.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """``sig`` to the process group, SIGKILL after ``timeout``, then the group's leftovers."""
        for s, wait in ((sig, timeout), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children the leader left behind
        except ProcessLookupError:
            pass
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path: Path):
    (tmp_path / "logs").mkdir()
    p = Processes(tmp_path / "logs")
    try:
        yield p
    finally:
        p.stop_all()
        deadline = time.monotonic() + 30  # a SIGKILLed process takes a moment to leave the table
        while (left := [q.pid for q in p.started if _group_alive(q.pid)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"process groups still running: {left}"


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_http(url: str, timeout: float = 300, proc: subprocess.Popen | None = None) -> None:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}: {proc.log_path.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=5) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


# --------------------------------------------------------------------------- DVC remote over S3


def _moto(procs: Processes, port: int) -> subprocess.Popen:
    """A fresh (empty, in-memory) S3 server on ``port`` with the bucket created through boto3."""
    import boto3

    proc = procs.start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)])
    _wait_http(f"http://127.0.0.1:{port}/moto-api/", 120, proc)
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name=S3_ENV["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket=BUCKET)
    return proc


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


METRICS = ["outputs/evaluate/metrics.json", "outputs/detect/metrics.json",
           "outputs/train/feature_extractor/metrics.json", "outputs/train/fine_tune/metrics.json"]


@pytest.fixture(scope="module")
def shared_remote(tmp_path_factory):
    """Project A runs the shrunk quickstart and pushes to an S3 server (a push cut by killing the server
    first, then a retry); project B is a ``git clone`` of A that pulls. Yields what each step printed."""
    from tests.helpers import clone_project

    tmp = tmp_path_factory.mktemp("team-dvc")
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs")
    facts: dict = {}
    try:
        port = _free_port()
        moto = _moto(procs, port)
        (tmp / "a").mkdir()
        a = clone_project(tmp / "a")
        t0 = time.perf_counter()
        facts["run_a"] = _run([CVPIPE, "run", "--profile", "offline", "--set", "train.image_size=32",
                               "--set", "train.fine_tune_epochs=1"], a).stdout
        facts["seconds_run_a"] = time.perf_counter() - t0
        # The remote, as the README says: bucket URL and endpoint in .dvc/config (in git), credentials
        # from the environment.
        _run(DVC + ["remote", "add", "-d", "team", f"s3://{BUCKET}/dvcstore"], a)
        _run(DVC + ["remote", "modify", "team", "endpointurl", f"http://127.0.0.1:{port}"], a)
        _git(a, "add", "-A")
        _git(a, "commit", "-qm", "quickstart results and the team remote")
        facts["config"] = (a / ".dvc/config").read_text()

        # A push cut off: the server is killed as soon as the first object arrives.
        push = subprocess.Popen(DVC + ["push", "--run-cache"], cwd=a, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + 300
        while b"PUT /" not in moto.log_path.read_bytes() and push.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        facts["killed_mid_push"] = push.poll() is None
        Processes.stop(moto, signal.SIGKILL)
        t0 = time.perf_counter()
        try:
            out, _ = push.communicate(timeout=600)
        finally:
            Processes.stop(push, signal.SIGKILL)
        facts["cut_push"] = (push.returncode, out, time.perf_counter() - t0)

        _moto(procs, port)  # restarted (empty: moto keeps its data in memory)
        t0 = time.perf_counter()
        facts["push"] = _run(DVC + ["push", "--run-cache"], a).stdout
        facts["seconds_push"] = time.perf_counter() - t0
        facts["push_again"] = _run(DVC + ["push"], a).stdout
        facts["push_again_run_cache"] = _run(DVC + ["push", "--run-cache"], a).stdout
        facts["run_cache_entries"] = sum(1 for p in (a / ".dvc/cache/runs").rglob("*") if p.is_file())

        b = tmp / "b"
        subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True)
        t0 = time.perf_counter()
        facts["pull"] = _run(DVC + ["pull", "--run-cache"], b).stdout
        facts["seconds_pull"] = time.perf_counter() - t0
        facts["status_b"] = _run(DVC + ["status"], b).stdout
        facts["run_b"] = _run([CVPIPE, "run"], b).stdout
        facts.update(a=a, b=b, procs=procs)
        yield facts
    finally:
        procs.stop_all()


def test_dvc_remote_on_s3_second_clone_pulls_and_reproduces_nothing(shared_remote):
    """Push with the run-cache to a real S3-compatible server; a fresh clone pulls, `dvc status` is
    clean, `cvpipe run` skips every stage and the metrics are byte for byte A's; a push cut by the
    server dying fails in one clear line, the retry succeeds, and a second push sends nothing."""
    f = shared_remote
    a, b = f["a"], f["b"]
    assert "endpointurl" in f["config"] and "secret" not in f["config"].lower()  # no credentials in git

    code, out, seconds = f["cut_push"]
    assert f["killed_mid_push"], out
    assert code != 0, out
    assert "ERROR" in out and "Traceback" not in out, out
    assert seconds < 300, seconds

    assert "pushed" in f["push"], f["push"]
    assert "Everything is up to date" in f["push_again"], f["push_again"]
    # DVC rewrites its run-cache records (one small file per cached stage run) on every push with
    # --run-cache (treeverse/dvc#10472): nothing else is sent again.
    assert f["run_cache_entries"] > 0
    assert f["push_again_run_cache"].strip() == f"{f['run_cache_entries']} files pushed", f["push_again_run_cache"]

    assert "fetched" in f["pull"] or "added" in f["pull"], f["pull"]
    assert "Data and pipelines are up to date" in f["status_b"], f["status_b"]
    assert f["run_b"].count("skipped") == 6, f["run_b"]
    for name in METRICS:
        assert (b / name).read_bytes() == (a / name).read_bytes(), name
    for name in ("models/detector/model.weights", "data/processed/train.npz",
                 "outputs/train/fine_tune/model.pt", "outputs/detect/detections.jsonl"):
        assert (b / name).read_bytes() == (a / name).read_bytes(), name
    assert _git(b, "status", "--porcelain") == "", "the second clone's run changed tracked files"


def _prefect_env() -> dict[str, str]:
    """The project's own persistent Prefect server (no PREFECT_* or CVPIPE_* from the test session)."""
    env = {k: v for k, v in _env().items() if not k.startswith(("PREFECT_", "CVPIPE_"))}
    env["CVPIPE_PRELOAD"] = "off"
    env["CVPIPE_PREFECT_STARTUP_TIMEOUT"] = "300"
    return env


def test_serve_runs_a_triggered_deployment_run_to_completion(shared_remote, procs):
    """`cvpipe serve` against the project's persistent Prefect server: a run of its deployment,
    created through Prefect's client, is picked up and finishes COMPLETED (every stage skipped: the
    clone's outputs are those pulled from the remote)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cvpipe.prefect_server import read_state

    b = shared_remote["b"]
    env = _prefect_env()
    try:
        _run([CVPIPE, "server", "start"], b, env, timeout=600)
        state = read_state(b / ".prefect")
        serve = procs.start("serve", [CVPIPE, "serve", "--cron", "0 3 1 1 *", "--name", "team"], cwd=b, env=env)

        async def trigger_and_wait() -> str:
            async with get_client() as client:
                deadline = time.monotonic() + 300
                while True:
                    assert serve.poll() is None, serve.log_path.read_text()[-3000:]
                    try:
                        deployment = await client.read_deployment_by_name("pipeline/team")
                        break
                    except Exception:  # noqa: BLE001 (not created yet)
                        assert time.monotonic() < deadline, serve.log_path.read_text()[-3000:]
                        await asyncio.sleep(1)
                run = await client.create_flow_run_from_deployment(deployment.id)
                deadline = time.monotonic() + 600
                while True:
                    fr = await client.read_flow_run(run.id)
                    if fr.state is not None and fr.state.is_final():
                        return fr.state.type.value
                    assert time.monotonic() < deadline, serve.log_path.read_text()[-3000:]
                    await asyncio.sleep(1)

        with temporary_settings(updates={PREFECT_API_URL: state.url}):
            final = asyncio.run(trigger_and_wait())
        assert final == "COMPLETED", serve.log_path.read_text()[-3000:]
        assert "Data and pipelines are up to date" in _run(DVC + ["status"], b).stdout
    finally:
        for proc in procs.started:
            Processes.stop(proc, signal.SIGINT)
        _run([CVPIPE, "server", "stop"], b, env, timeout=120, ok=False)
        state = read_state(b / ".prefect")
        if state is not None and _group_alive(state.pid):
            os.killpg(state.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- shared MLflow server


def _mlflow_server(procs: Processes, store: Path, port: int) -> subprocess.Popen:
    proc = procs.start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                  "--backend-store-uri", f"sqlite:///{store / 'server.db'}", "--serve-artifacts",
                                  "--artifacts-destination", str(store / "server-artifacts"), "--workers", "1"])
    _wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
    return proc


def test_two_projects_share_one_mlflow_server(tmp_path, procs):
    """Two projects train and evaluate at once against one `mlflow server` with proxied artifacts:
    both runs finish with their metrics, each evaluate registers one version, the better model holds
    `champion`, and all of it (artifacts included: `cvpipe predict`) is there after a restart. With
    the server gone, a stage fails in one line before any work."""
    from mlflow.tracking import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    store = tmp_path / "server"
    store.mkdir()
    server = _mlflow_server(procs, store, port)
    projects = {}
    for name, lr in (("a", 0.001), ("b", 1e-7)):  # b barely moves from its random head
        root = tmp_path / name
        root.mkdir()
        write_params(root, {"mlflow.tracking_uri": uri, "train.modes": ["feature_extractor"], "train.lr": lr,
                            "train.hflip": False, "train.vflip": False})
        projects[name] = root
    chain = " && ".join(f"{CVPIPE} {c}" for c in ("download", "preprocess", "train --mode feature_extractor",
                                                     "evaluate"))
    t0 = time.perf_counter()
    runs = {n: procs.start(f"pipeline-{n}", ["sh", "-c", chain], cwd=root) for n, root in projects.items()}
    for n, proc in runs.items():
        assert proc.wait(1500) == 0, proc.log_path.read_text()[-4000:]
    print(f"two pipelines at once: {time.perf_counter() - t0:.1f} s")
    acc = {n: json.loads((root / "outputs/evaluate/metrics.json").read_text())["feature_extractor"]["test_acc"]
           for n, root in projects.items()}
    assert acc["a"] > acc["b"], acc

    def check(client: MlflowClient) -> None:
        exp = client.get_experiment_by_name("cvpipe")
        assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
        for stage, n in (("download", 2), ("preprocess", 2), ("train", 2)):
            found = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'")
            assert len(found) == n and all(r.info.status == "FINISHED" for r in found), (stage, found)
        trains = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
        assert sorted(r.data.metrics["test_acc"] for r in trains) == sorted(acc.values())
        assert all("best_val_acc" in r.data.metrics for r in trains), trains
        versions = client.search_model_versions("name = 'cvpipe-classifier'")
        assert len(versions) == 2, versions
        champion = client.get_model_version_by_alias("cvpipe-classifier", "champion")
        assert float(champion.tags["test_acc"]) == max(acc.values()), (
            acc, champion.version, [(v.version, v.tags.get("test_acc")) for v in versions])

    check(MlflowClient(uri))
    Processes.stop(server)
    _mlflow_server(procs, store, port)
    check(MlflowClient(uri))
    # The champion's files come through the server (proxied artifacts), not from a's folder.
    pred = _run([CVPIPE, "predict", str(projects["b"] / "data/samples/digit_7.png"), "-k", "1"], projects["b"])
    assert pred.stdout.strip().splitlines()[-2].endswith("digit_7.png"), pred.stdout

    Processes.stop(procs.started[-1])
    model = projects["a"] / "outputs/train/feature_extractor/model.pt"
    before = model.stat().st_mtime_ns
    t0 = time.perf_counter()
    r = _run([CVPIPE, "train", "--mode", "feature_extractor"], projects["a"], ok=False, timeout=120)
    assert r.returncode == 1 and time.perf_counter() - t0 < 60, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: MLflow tracking server {uri} is not reachable (Connection refused); start it or fix "
        "mlflow.tracking_uri"], r.stderr
    assert model.stat().st_mtime_ns == before


# --------------------------------------------------------------------------- Dask cluster


def _photos(folder: Path, n: int) -> list[Path]:
    """``n`` real photos (scikit-image's, shifted and flipped so that each is different)."""
    import cv2
    import numpy as np
    from skimage import data

    folder.mkdir(parents=True)
    base = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = []
    for i in range(n):
        img = np.roll(base[i % 4], 7 * i, axis=1)
        if i // 4 % 2:
            img = img[:, ::-1]
        path = folder / f"photo_{i:03d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR))
        out.append(path)
    return out


def _records(root: Path) -> list[dict]:
    """detections.jsonl without what depends on where it ran (nothing but the annotated-image link)."""
    lines = (root / "outputs/detect/detections.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "annotated"} for line in lines]


def test_dask_scheduler_and_workers_detect_as_threads_and_lose_no_image(tmp_path, procs):
    """`cvpipe detect` on a `dask scheduler` with two `dask worker` processes gives the thread runner's
    detections; with one worker killed (SIGKILL, its whole process) while it runs a shard, the shard
    runs again on the other and no image is lost."""
    from distributed import Client

    from cvpipe.params import load_params
    from tasks.download import download_detector
    from tests.helpers import DEFAULT_PARAMS

    detector = tmp_path / "detector"
    download_detector("yolov3-tiny", detector / "models", load_params(DEFAULT_PARAMS).download,
                      cache_dir=detector / "cache")
    photos = _photos(tmp_path / "photos", 48)
    common = {"paths.detector": str(detector / "models"), "paths.allow_outside": True,
              "detect.input": str(tmp_path / "photos"), "detect.shards": 4, "detect.batch_size": 2,
              "detect.save_images": False, "detect.conf_threshold": 0.3}
    threads = tmp_path / "threads"
    threads.mkdir()
    write_params(threads, common)
    t0 = time.perf_counter()
    _run([CVPIPE, "detect"], threads)
    print(f"threads: {time.perf_counter() - t0:.1f} s")
    expected = _records(threads)
    assert len(expected) == len(photos) and sum(len(r["detections"]) for r in expected) > 0

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs.start("scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard"])
    workers = [procs.start(f"worker{i}", [str(BIN / "dask"), "worker", address, "--host", "127.0.0.1",
                                          "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                                          "--name", f"w{i}"]) for i in range(2)]
    deadline = time.monotonic() + 300
    client = None
    while client is None:
        try:
            client = Client(address, timeout=10)
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(1)
    try:
        client.wait_for_workers(2, timeout=300)
        for i, kill in enumerate((False, True)):
            root = tmp_path / f"dask{i}"
            root.mkdir()
            write_params(root, {**common, "detect.task_runner": "dask", "detect.dask_address": address})
            t0 = time.perf_counter()
            run = procs.start(f"detect{i}", [CVPIPE, "detect"], cwd=root)
            if kill:
                victim = _worker_running_a_shard(client, run, deadline=time.monotonic() + 600)
                Processes.stop(next(w for w in workers if w.pid == _leader_of(victim)), signal.SIGKILL)
            assert run.wait(900) == 0, run.log_path.read_text()[-4000:]
            print(f"dask (kill={kill}): {time.perf_counter() - t0:.1f} s")
            assert _records(root) == expected
            assert json.loads((root / "outputs/detect/failures.json").read_text()) == []
        assert len(client.scheduler_info()["workers"]) == 1  # the killed one is gone
    finally:
        client.close()


def _leader_of(pid: int) -> int:
    """The process group of ``pid`` (a ``dask worker`` leads its group; the worker may be its child)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[2])


def _worker_running_a_shard(client, run: subprocess.Popen, deadline: float) -> int:
    """The pid of a worker that is running a detect-shard task, once one is (polled)."""
    while time.monotonic() < deadline:
        assert run.poll() is None, "detect finished before a worker could be killed: " + run.log_path.read_text()[-2000:]
        busy = [addr for addr, keys in client.processing().items() if keys]
        if busy:
            time.sleep(1.0)  # well into its shard, and still in it
            still = [addr for addr in busy if client.processing().get(addr)]
            if still:
                return client.run(os.getpid, workers=[still[0]])[still[0]]
        time.sleep(0.1)
    raise AssertionError("no worker ever ran a shard")
