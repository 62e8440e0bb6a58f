"""Security by inspection of the source: nothing is unpickled, archives are extracted with the
``data`` filter, YAML is loaded safely, and the servers the project starts or prints bind 127.0.0.1.

These read every tracked-or-new Python file of the project (not the virtual environment), so a
new call site that breaks a rule fails here, with its file and line.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

SKIP_DIRS = {".venv", ".git", ".dvc", "mlruns", "data", "models", "build", "dist", "__pycache__"}


@functools.cache
def python_files() -> tuple[Path, ...]:
    """The project's own Python files (this one excluded: it spells the patterns it forbids)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [Path(dirpath) / n for n in filenames if n.endswith(".py") and n != Path(__file__).name]
    assert any(f.relative_to(ROOT).parts[0] == "tasks" for f in files)
    return tuple(sorted(files))


def calls(pattern: str) -> list[tuple[str, str]]:
    """(``file:line``, the whole call up to its closing parenthesis) for each match of ``pattern``."""
    out = []
    for f in python_files():
        text = f.read_text()
        for m in re.finditer(pattern, text):
            depth, i = 0, m.end() - 1
            while i < len(text):  # extend to the matching parenthesis (calls may span lines)
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
            out.append((f"{f.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}", text[m.start():i]))
    return out


def test_every_torch_load_is_weights_only():
    found = calls(r"\btorch\.load\(")
    assert found  # the rule is checked against real call sites
    bad = [where for where, call in found if not re.search(r"weights_only\s*=\s*True", call)]
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_tar_extraction_uses_the_data_filter():
    found = calls(r"\.extract(all)?\(")
    bad = [where for where, call in found if not re.search(r"filter\s*=\s*[\"']data[\"']", call)]
    assert not bad, f"tar extraction without filter='data': {bad}"
    assert any("cvpipe/io.py" in where for where, _ in found)


def test_yaml_is_loaded_safely():
    unsafe = [where for where, call in calls(r"\byaml\.(load|load_all|unsafe_load|full_load)\(")
              if "SafeLoader" not in call]
    assert not unsafe, f"yaml loaded without SafeLoader: {unsafe}"


@pytest.mark.parametrize("pattern", [r"\bpickle\.loads?\(", r"\bcloudpickle\.loads?\(", r"\bjoblib\.load\(",
                                     r"\bdill\.loads?\(", r"\bmarshal\.loads?\("])
def test_nothing_is_unpickled(pattern):
    assert not calls(pattern)


def test_numpy_loads_disallow_pickle():
    bad = [where for where, call in calls(r"\bnp\.load\(") if re.search(r"allow_pickle\s*=\s*True", call)]
    assert not bad, f"np.load with allow_pickle=True: {bad}"


def test_servers_bind_localhost():
    """No code binds every interface; the server commands printed by the CLI or shown in the README
    (``mlflow ui``, ``mlflow server``, ``prefect server start``) carry ``--host 127.0.0.1``."""
    wildcard = [f"{f.relative_to(ROOT)}: {m.group()}" for f in python_files()
                for m in re.finditer(r"0\.0\.0\.0|host\s*=\s*[\"'][\"']", f.read_text())]
    assert not wildcard, wildcard
    server = re.compile(r"\b(mlflow (ui|server)|prefect server start)\b")
    cli = [ln for f in sorted((ROOT / "cvpipe").glob("cli*.py")) for ln in f.read_text().splitlines()
           if "echo" in ln and server.search(ln)]
    assert any("mlflow ui" in ln for ln in cli)
    readme = [ln for ln in (ROOT / "README.md").read_text().splitlines()
              if server.search(ln) and not ln.lstrip().startswith(("#", ">"))]
    bad = [ln.strip() for ln in cli + readme if "--host 127.0.0.1" not in ln]
    assert not bad, f"server commands without --host 127.0.0.1: {bad}"
