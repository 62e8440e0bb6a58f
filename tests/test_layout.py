"""dvc.yaml agrees with the code: each stage's outputs are the ones :mod:`cvpipe.layout` names, and
each stage depends on every ``tasks/`` module its code imports.

What a stage really opens and which parameters it really reads is checked by running the stages
in tests/test_dvc_deps.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from cvpipe import layout
from tests.helpers import ROOT

#: The module dvc.yaml's command runs for each stage (`cvpipe <stage>` -> flows.<stage> -> tasks.<stage>).
ENTRY = {stage: f"tasks.{stage}" for stage in layout.STAGES}


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _paths(entries: list) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _project_imports(module: str) -> set[str]:
    """Project modules (tasks.*, cvpipe.*) imported by ``module``, at top level or inside functions."""
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        path = ROOT / Path(*module.split(".")) / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("tasks", "cvpipe", "flows") and (
                    (ROOT / Path(*name.split("."))).with_suffix(".py").is_file()):
                found.add(name)
    return found


def task_closure(module: str) -> set[str]:
    """Every tasks/ module ``module`` runs, following imports transitively (as files: tasks/x.py)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_project_imports(m) - seen)
    return {str(Path(*m.split(".")).with_suffix(".py")) for m in seen if m.startswith("tasks.")}


def test_every_stage_is_in_dvc_yaml():
    assert list(_stages()) == list(layout.STAGES)


@pytest.mark.parametrize("stage", layout.STAGES)
def test_stage_outputs_are_the_layouts(stage):
    spec = _stages()[stage]
    body = spec.get("do", spec)  # train is a foreach over the modes
    want = layout.stage_outputs(stage)
    for kind in ("outs", "metrics", "plots"):
        assert _paths(body.get(kind)) == want[kind], f"dvc.yaml {stage}.{kind}"


@pytest.mark.parametrize("stage", layout.STAGES)
def test_stage_depends_on_all_the_code_it_runs(stage):
    spec = _stages()[stage]
    body = spec.get("do", spec)
    code_deps = {d for d in _paths(body["deps"]) if d.endswith(".py")}
    assert code_deps == task_closure(ENTRY[stage]), (
        f"dvc.yaml {stage}: code deps {sorted(code_deps)} vs the tasks/ modules it imports "
        f"{sorted(task_closure(ENTRY[stage]))}")


#: tasks/ modules a stage's flow uses only to log the model to MLflow (the exported classifier), which
#: DVC does not track: they are not in the stage's deps.
MLFLOW_ONLY = {"tasks/export.py", "tasks/inputs.py", "tasks/images.py"}


@pytest.mark.parametrize("stage", layout.STAGES)
def test_the_flow_runs_no_other_stage_code(stage):
    """What ``flows.<stage>`` imports from tasks/ beyond the stage's deps only feeds MLflow."""
    spec = _stages()[stage]
    code_deps = {d for d in _paths(spec.get("do", spec)["deps"]) if d.endswith(".py")}
    extra = task_closure(f"flows.{stage}") - code_deps
    assert extra <= MLFLOW_ONLY, f"flows.{stage} runs {sorted(extra - MLFLOW_ONLY)}, not in dvc.yaml's deps"


def test_train_runs_for_each_mode_of_params():
    assert _stages()["train"]["foreach"] == "${train.modes}"
