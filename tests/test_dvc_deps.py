"""dvc.yaml's `evaluate` stage depends on every parameter and file the stage's code reads.

A parameter read by the code but missing from the stage's `params:` would leave `dvc repro`
and `cvpipe run` skipping a stage whose output is stale.
"""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from cvpipe.params import load_params
from tests.helpers import DEFAULT_PARAMS, ROOT


class _Recorder:
    """Wraps a params object and records every dotted key read through it ("train.amp")."""

    def __init__(self, obj, prefix: str, seen: set[str]):
        self._obj, self._prefix, self._seen = obj, prefix, seen

    def __getattr__(self, name: str):
        value = getattr(self._obj, name)
        key = f"{self._prefix}{name}"
        if isinstance(value, BaseModel):  # a section: keep recording below it
            return _Recorder(value, key + ".", self._seen)
        if not callable(value):
            self._seen.add(key)
        return value


def _covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def _stage(name: str) -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]


def test_evaluate_declares_the_params_its_runtime_reads(tmp_path, monkeypatch):
    from tasks.evaluate import trained_modes
    from tasks.runtime import make_runtime

    monkeypatch.chdir(ROOT)
    seen: set[str] = set()
    p = _Recorder(load_params(DEFAULT_PARAMS, {"device": "cpu"}), "", seen)
    make_runtime(p)
    trained_modes(p)
    declared = _stage("evaluate")["params"]
    read = {k for k in seen if not k.startswith("paths.")}  # paths are deps/outs, checked below
    assert {"device", "train.amp", "train.channels_last", "train.num_threads", "train.modes"} <= read
    missing = sorted(k for k in read if not _covered(k, declared))
    assert not missing, f"evaluate reads {missing} but dvc.yaml's evaluate stage does not list them"


def test_evaluate_depends_on_the_code_and_files_it_reads():
    deps = [d if isinstance(d, str) else next(iter(d)) for d in _stage("evaluate")["deps"]]
    for code in ("tasks/evaluate.py", "tasks/runtime.py", "tasks/transforms.py", "tasks/engine.py",
                 "tasks/checkpoints.py", "tasks/backbones.py"):
        assert code in deps
    # every trained mode's files, whichever modes train.modes lists: the train folder
    assert "${paths.train}" in deps
