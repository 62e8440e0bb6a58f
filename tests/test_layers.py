"""The code reads top-down: app (CLI, predict, serving) -> flows (Prefect, MLflow, DVC wiring) ->
tasks (pure work) -> core (params, io, errors, layout, lock).

The contracts live in pyproject.toml ([tool.importlinter]) and are checked with import-linter;
these tests also make sure no module escapes them (a module in no layer is checked by nothing)
and that modules stay short enough to be read as one job.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("cvpipe", "tasks", "flows")
MAX_LINES = 300
#: A longer module says why in its docstring, in a paragraph starting with this.
LONG_REASON = "Why one module:"


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _layer_modules(layer: str) -> list[str]:
    return [m.strip() for part in layer.split(":") for m in part.split("|") if m.strip()]


def test_import_contracts_hold():
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"{len(_contracts())} kept, 0 broken" in r.stdout, r.stdout[-2000:]


def test_every_module_has_a_layer():
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    listed = [m for layer in layers for m in _layer_modules(layer)]
    orphans = []
    for name in _modules():
        if name in PACKAGES:
            continue
        if not any(name == m or name.startswith(m + ".") for m in listed):
            orphans.append(name)
    assert not orphans, f"modules in no layer of pyproject.toml's import contract: {orphans}"


def test_the_core_layer_is_the_one_the_contracts_name():
    """The 'core loads no framework' contract lists exactly the bottom layer's modules."""
    contracts = _contracts()
    bottom = _layer_modules(next(c for c in contracts if c["type"] == "layers")["layers"][-1])
    core = next(c for c in contracts if c["name"].startswith("the core"))
    assert sorted(core["source_modules"]) == sorted(bottom)


def test_modules_are_short_or_say_why():
    long = {}
    for name, path in _modules().items():
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if n > MAX_LINES and LONG_REASON not in doc:
            long[name] = n
    assert not long, (f"modules over {MAX_LINES} lines whose docstring does not say why "
                      f"('{LONG_REASON} ...'): {long}")
