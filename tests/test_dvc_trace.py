"""Each stage reads and writes exactly what dvc.yaml declares for it, traced while it runs.

Every stage's pure function runs in this process on the shrunk offline profile (digits, 1 epoch,
32 px, yolov3-tiny on the sample photos) with two recorders:

* the parameters it reads: ``params`` is wrapped so that each dotted key read ("train.amp") is
  recorded, including keys read by shared helpers (the runtime, the weights resolution...);
* the files it opens: a Python audit hook records ``open`` (read or write), ``os.rename`` /
  ``os.replace`` and directory listings under the project folder.

A parameter read but missing from the stage's ``params:`` would let ``dvc repro`` skip a stale
stage; a file read but not declared in ``deps:`` likewise; a file written outside ``outs:`` would
not be versioned. Caches (``paths.cache``, ``paths.features``) are neither: they only save time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from cvpipe import layout
from cvpipe.params import load_params
from tests.helpers import DEFAULT_PARAMS, ROOT, clone_project

pytestmark = pytest.mark.slow

_TRACE: dict[str, set[Path]] | None = None
_TRACE_LOCK = threading.Lock()
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND


def _audit(event: str, args: tuple) -> None:
    if _TRACE is None:
        return
    try:
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, bytes, Path)):
                return
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
            kind, paths = ("write" if writing else "read"), [path]
        elif event == "os.rename":
            kind, paths = "write", [args[1]]
        elif event in ("os.listdir", "os.scandir"):
            kind, paths = "read", [args[0] if args and args[0] is not None else "."]
        else:
            return
        for path in paths:
            if isinstance(path, int):
                continue
            resolved = Path(path.decode() if isinstance(path, bytes) else path).resolve()
            with _TRACE_LOCK:
                _TRACE[kind].add(resolved)
    except Exception:  # an audit hook must never break the code it watches
        pass


_HOOKED = False


def _install_hook() -> None:
    """Add the audit hook once per process, when a trace first starts: a hook cannot be removed,
    so a session that only collects this module (the fast suite) must not pay it on every open()."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True


class _Recorder:
    """Wraps a params object and records every dotted key read through it."""

    def __init__(self, obj, prefix: str, seen: set[str]):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name: str):
        value = getattr(self._obj, name)
        key = f"{self._prefix}{name}"
        if isinstance(value, BaseModel):
            return _Recorder(value, key + ".", self._seen)
        if not callable(value):
            self._seen.add(key)
        return value


class Trace:
    """The files and parameters one stage touched."""

    def __init__(self):
        self.reads: set[Path] = set()
        self.writes: set[Path] = set()
        self.params: set[str] = set()

    def __enter__(self):
        global _TRACE
        _install_hook()
        _TRACE = {"read": self.reads, "write": self.writes}
        return self

    def __exit__(self, *exc):
        global _TRACE
        _TRACE = None


def _render(text: str, values: dict, item: str | None) -> str:
    def sub(m):
        key = m.group(1)
        if key == "item":
            return item
        v = values
        for part in key.split("."):
            v = v[part]
        return str(v)

    return re.sub(r"\$\{([^}]+)\}", sub, text)


def _declared(stage: str, raw_params: dict, item: str | None, root: Path) -> dict[str, list]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    body = spec.get("do", spec)

    def paths(kind):
        entries = [e if isinstance(e, str) else next(iter(e)) for e in body.get(kind) or []]
        return [(root / _render(e, raw_params, item)).resolve() for e in entries if not e.endswith(".py")]

    outs = paths("outs") + paths("metrics") + paths("plots")
    return {"deps": paths("deps"), "outs": outs, "params": body.get("params") or []}


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _check(stage: str, trace: Trace, declared: dict, root: Path, caches: list[Path]) -> None:
    inside = lambda ps: {q for q in ps if root in q.parents}  # noqa: E731  (the project's files only)
    written = set()
    for q in inside(trace.writes):
        if q.is_dir():  # a folder renamed into place (a staged set of outputs): what it holds was written
            written.update(f for f in q.rglob("*") if f.is_file() and f.name != ".gitignore")  # DVC's file
        elif q.exists():  # temporary files renamed away are not outputs
            written.add(q)
    stray = sorted(str(q.relative_to(root)) for q in written if not _under(q, declared["outs"] + caches))
    assert not stray, f"{stage} writes files dvc.yaml does not list as its outputs: {stray}"
    # listing a folder that holds the stage's outputs (to find its own staging folders) reads nothing of others'
    reads = {q for q in inside(trace.reads) if q.exists() and q not in written
             and not (q.is_dir() and any(q in o.parents for o in declared["outs"]))}
    undeclared = sorted(str(q.relative_to(root)) for q in reads
                        if not _under(q, declared["deps"] + declared["outs"] + caches) and q != root)
    assert not undeclared, f"{stage} reads files dvc.yaml does not list as its dependencies: {undeclared}"
    read_params = {k for k in trace.params if not k.startswith("paths.")}
    missing = sorted(k for k in read_params
                     if not any(k == d or k.startswith(d + ".") for d in declared["params"]))
    assert not missing, f"{stage} reads parameters dvc.yaml does not list: {missing}"


#: The shrunk offline profile, with the project's own relative paths (a clone, as a user has it).
SHRINK = {"data.dataset": "digits", "train.backbone": "efficientnet_lite0", "train.weights": "imagenet",
          "train.epochs": 1, "train.image_size": 32, "detect.model": "yolov3-tiny", "download.retries": 1,
          "download.backoff_s": 0.0}


@pytest.fixture(scope="module")
def project(tmp_path_factory, detector_dir):
    """A clone of the project (git + DVC) with shrunk parameters, the current folder while it is used."""
    from cvpipe.params import apply_overrides

    root = clone_project(tmp_path_factory.mktemp("traced")).resolve()
    raw = apply_overrides(yaml.safe_load(DEFAULT_PARAMS.read_text()), SHRINK)
    raw["detect"]["input"] = raw["paths"]["samples"]
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(detector_dir, root / raw["paths"]["detector"])  # the real yolov3-tiny files, fetched once
    cwd = Path.cwd()
    os.chdir(root)
    try:
        yield root, params
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def traces(project):
    """Every stage run once in DAG order, each under its own trace."""
    import flows.train  # noqa: F401  (Prefect reads its settings files at import: not the stage's reads)

    _, params = project
    out = {}
    for stage, item in ORDER:
        trace = Trace()
        recorded = _Recorder(load_params(params), "", trace.params)
        with trace:
            _run_stage(stage, recorded, item)
        out[(stage, item)] = trace
    return out


def _run_stage(stage: str, p, item: str | None) -> None:
    if stage == "download":
        from tasks.download import download

        download(p)
    elif stage == "preprocess":
        from tasks.preprocess import preprocess

        preprocess(p)
    elif stage == "train":
        from flows.train import (
            write_run_id,  # imported (Prefect's settings read) before the trace began
        )
        from tasks.train import train

        train(p, item)
        write_run_id(p, item, "traced")  # the flow's part of the stage: the MLflow run that logged the model
    elif stage == "evaluate":
        from tasks.evaluate import evaluate

        evaluate(p)
    elif stage == "detect":
        from tasks.detect import collect, plan
        from tasks.detect_shard import detect_shard
        from tasks.detect_staging import staged_outputs

        with staged_outputs(p.paths.detect) as staging:
            shards, images_dir = plan(p, staging)
            results = [detect_shard(s, detector_dir=p.paths.detector.resolve(), dp=p.detect, images_dir=images_dir,
                                    shard=i, of=len(shards), device=p.device, threads=None)
                       for i, s in enumerate(shards)]
            collect(p, results, staging)


ORDER = [("download", None), ("preprocess", None), *(("train", m) for m in layout.MODES), ("evaluate", None),
         ("detect", None)]


def test_stages_touch_only_what_dvc_yaml_declares(project, traces):
    root, params = project
    raw = yaml.safe_load(params.read_text())
    p = load_params(params)
    caches = [p.paths.cache.resolve(), p.paths.features.resolve()]
    for (stage, item), trace in traces.items():
        assert trace.writes, f"{stage} wrote nothing: the trace does not work"
        _check(f"{stage}{'@' + item if item else ''}", trace, _declared(stage, raw, item, root), root, caches)


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_a_parameter_a_stage_reads_makes_it_stale(project, traces):
    """After the traced run is recorded in dvc.lock, changing ``train.amp`` (read by evaluate through
    the runtime, and by train) makes exactly the stages that read it stale."""
    from cvpipe.params import write_overrides

    root, params = project
    _dvc(root, "commit", "--force")
    assert json.loads(_dvc(root, "status", "--json").stdout) == {}
    amp = yaml.safe_load(params.read_text())["train"]["amp"]
    write_overrides(params, {"train.amp": "off" if amp != "off" else "bf16"})
    stale = set(json.loads(_dvc(root, "status", "--json").stdout))
    assert stale == {"train@feature_extractor", "train@fine_tune", "evaluate"}, stale
    read_by = {f"{s}@{i}" if i else s for (s, i), t in traces.items() if "train.amp" in t.params}
    assert read_by == stale, "the stages that read train.amp are the stale ones"


def test_the_tracer_sees_an_undeclared_read_and_write(tmp_path):
    """The check above can fail: a stage that read or wrote a file outside its declaration is caught."""
    root = tmp_path.resolve()
    (root / "in").mkdir()
    (root / "in" / "a.txt").write_text("x")
    with Trace() as trace:
        (root / "in" / "a.txt").read_text()
        (root / "out.txt").write_text("y")
    declared = {"deps": [], "outs": [root / "out.txt"], "params": []}
    with pytest.raises(AssertionError, match="reads files"):
        _check("demo", trace, declared, root, [])
    declared = {"deps": [root / "in"], "outs": [], "params": []}
    with pytest.raises(AssertionError, match="writes files"):
        _check("demo", trace, declared, root, [])
    trace.params.add("train.amp")
    with pytest.raises(AssertionError, match=r"parameters .*train\.amp"):
        _check("demo", trace, {"deps": [root / "in"], "outs": [root / "out.txt"], "params": ["evaluate"]}, root, [])
