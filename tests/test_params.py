"""params.yaml is loaded into typed models that reject typos, wrong types and bad values, naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cvpipe.params import (
    Params,
    ParamsError,
    apply_overrides,
    load_params,
    write_overrides,
)
from tests.helpers import DEFAULT_PARAMS, ROOT


def test_repository_params_load_and_are_the_seed_experiment():
    p = load_params(DEFAULT_PARAMS)
    assert isinstance(p, Params)
    assert p.data.dataset == "cifar10"
    assert (p.train.backbone, p.train.weights, p.train.image_size) == ("resnet18", "imagenet", 224)
    assert (p.train.batch_size, p.train.lr, p.train.epochs) == (50, 1e-3, 5)
    assert p.train.hflip and p.train.vflip
    assert p.train.mean == (0.485, 0.456, 0.406) and p.train.std == (0.229, 0.224, 0.225)
    assert (p.detect.model, p.detect.input_size) == ("yolov3", 416)


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        ({"train.lr": -0.1}, "train.lr", "greater than 0"),
        ({"train.epochs": -3}, "train.epochs", "greater than or equal to 1"),
        ({"train.batch_size": "fifty"}, "train.batch_size", "integer"),
        ({"data.dataset": "mnist"}, "data.dataset", "cifar10"),
        ({"preprocess.val_fraction": 1.5}, "preprocess.val_fraction", "less than 1"),
        ({"detect.input_size": 400}, "detect.input_size", "multiple of 32"),
    ],
)
def test_bad_values_fail_naming_the_key(tmp_path, overrides, key, words):
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(raw, overrides)))
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert re.search(rf"^\s*{re.escape(key)}:.*{words}", str(e.value), re.M), str(e.value)


def test_typo_key_in_file_is_rejected(tmp_path):
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["train"]["learning_rate"] = 0.01
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"train\.learning_rate: unknown key"):
        load_params(path)


def test_typo_key_in_override_is_rejected():
    with pytest.raises(ParamsError, match=r"train\.learnig_rate: unknown key"):
        load_params(DEFAULT_PARAMS, {"train.learnig_rate": 0.1})


def test_url_weights_need_a_sha256():
    with pytest.raises(ParamsError, match="weights_sha256"):
        load_params(DEFAULT_PARAMS, {"train.weights": "https://example.org/w.pth"})


def test_write_overrides_keeps_comments_and_refuses_bad_values(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(DEFAULT_PARAMS.read_text())
    write_overrides(path, {"train.epochs": 2, "data.dataset": "digits"})
    text = path.read_text()
    assert "# Every tunable and every path" in text
    p = load_params(path)
    assert (p.train.epochs, p.data.dataset) == (2, "digits")
    before = path.read_text()
    with pytest.raises(ParamsError):
        write_overrides(path, {"train.epochs": 0})
    assert path.read_text() == before


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ParamsError, match=r"invalid YAML in .*line 1.*python/object") as err:
        load_params(path)
    assert "\n" not in str(err.value)


def test_dvc_yaml_refers_only_to_existing_params():
    """Every ${key} and every `params:` entry of dvc.yaml exists in params.yaml."""
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    dvc_text = (ROOT / "dvc.yaml").read_text()
    dvc = yaml.safe_load(dvc_text)

    def exists(dotted: str) -> bool:
        node = raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    code = "\n".join(line.split("#", 1)[0] for line in dvc_text.splitlines())
    refs = set(re.findall(r"\$\{([^}]+)\}", code)) - {"item"}
    assert refs, "dvc.yaml should take its paths from params.yaml"
    missing = [r for r in refs if not r.startswith("item.") and not exists(r)]
    assert not missing, f"dvc.yaml uses keys missing from params.yaml: {missing}"

    listed = []
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        listed += [k for k in body.get("params", []) if isinstance(k, str)]
    assert listed
    missing = [k for k in listed if not exists(k)]
    assert not missing, f"dvc.yaml params missing from params.yaml: {missing}"
    assert set(dvc["stages"]) >= {"download", "preprocess"}


# --------------------------------------------------------------------------- hostile params files

# Loads a params file in a fresh process under a 2 GB address-space limit; reports how long the
# load took, how much memory it allocated and what it raised.
LOAD = """
import json, resource, sys, time, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from cvpipe.params import load_params
tracemalloc.start()
t0 = time.perf_counter()
try:
    load_params(sys.argv[1])
    error = None
except BaseException as err:
    error = f"{type(err).__name__}: {err}"
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_mb": tracemalloc.get_traced_memory()[1] / 2**20, "error": error}))
"""


def _load_in_child(path: Path) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        r = subprocess.run([sys.executable, "-c", LOAD, str(path)], env=env, capture_output=True, text=True,
                           timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("loading the params file did not return within 60 s")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _billion_laughs(levels: int = 9, width: int = 10) -> str:
    lines = ["lol0: &lol0 " + "[" + ", ".join(['"lol-lol-lol-lol-lol-lol-lol-lol"'] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_fails_fast_with_one_line_and_little_memory(tmp_path):
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    text = _billion_laughs() + yaml.safe_dump(raw).replace("seed: 42", "seed: *lol9")
    assert len(text) < 5_000  # that would expand to 10^9 strings
    path = tmp_path / "params.yaml"
    path.write_text(text)
    res = _load_in_child(path)
    print(f"billion laughs: {res['seconds'] * 1000:.1f} ms, peak {res['peak_mb']:.1f} MB")
    assert res["error"] is not None and res["error"].startswith("ParamsError: invalid YAML in ")
    assert "aliases" in res["error"] and "\n" not in res["error"] and len(res["error"]) < 300
    assert res["seconds"] < 0.5 and res["peak_mb"] < 50


@pytest.mark.parametrize("tag", ["!!python/object:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system", "!custom"])
def test_custom_tags_are_one_line(tmp_path, tag):
    path = tmp_path / "params.yaml"
    path.write_text(f"seed: {tag} ['echo pwned']\n")
    with pytest.raises(ParamsError, match=r"^invalid YAML in .*params\.yaml \(line 1, column 7\): ") as err:
        load_params(path)
    assert "\n" not in str(err.value)


def test_huge_value_in_a_bad_key_gives_a_short_message(tmp_path):
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["train"]["lr"] = "x" * 1_000_000
    raw["detect"]["input_size"] = list(range(20_000))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert path.stat().st_size > 1_000_000
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert len(msg) < 1024, len(msg)
    assert re.search(r"^\s*train\.lr: .*\(got 'x{10,}\.\.\.", msg, re.M), msg
    assert re.search(r"^\s*detect\.input_size: ", msg, re.M), msg


@pytest.mark.parametrize("key", ["train", "raw", "compare"])
def test_paths_outside_the_project_are_refused_naming_the_key(tmp_path, monkeypatch, key):
    from tests.helpers import write_params

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    params = write_params(project)
    load_params(params)  # everything inside: fine
    outside = tmp_path / "elsewhere"
    with pytest.raises(ParamsError, match=rf"paths\.{key}: {re.escape(str(outside))} is outside the project"):
        load_params(params, {f"paths.{key}": str(outside)})
    with pytest.raises(ParamsError, match=rf"paths\.{key}: .* is outside the project"):
        load_params(params, {f"paths.{key}": "../elsewhere"})
    assert load_params(params, {f"paths.{key}": str(outside), "paths.allow_outside": True})


@pytest.mark.parametrize("overrides, key", [
    ({"seed": 10**30}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"train.lr": float("nan")}, "train.lr"),
    ({"train.lr": float("inf")}, "train.lr"),
    ({"train.epochs": 10**9}, "train.epochs"),
    ({"train.freeze_stages": 65}, "train.freeze_stages"),
    ({"download.sample_canvas": [0, 0]}, "download.sample_canvas.0"),
    ({"download.sample_canvas": [800, 10**6]}, "download.sample_canvas.1"),
])
def test_out_of_range_values_are_refused(overrides, key):
    with pytest.raises(ParamsError, match=rf"(?m)^\s*{re.escape(key)}: ") as err:
        load_params(DEFAULT_PARAMS, overrides)
    assert len(str(err.value)) < 400
    assert load_params(DEFAULT_PARAMS, {"seed": 2**32 - 1}).seed == 2**32 - 1


def test_write_overrides_changes_only_the_lines_it_sets(tmp_path):
    """The quickstart writes the offline profile into params.yaml: every other line stays as it was
    (long URLs are not folded, `null` stays `null`)."""
    import difflib

    path = tmp_path / "params.yaml"
    original = DEFAULT_PARAMS.read_text()
    path.write_text(original)
    profile = yaml.safe_load((ROOT / "profiles" / "offline.yaml").read_text())
    write_overrides(path, {**profile, "detect.annotations": None})
    changed = [ln for ln in difflib.unified_diff(original.splitlines(), path.read_text().splitlines(), lineterm="")
               if ln.startswith("-") and not ln.startswith("---")]
    defaults = yaml.safe_load(original)
    differ = [k for k, v in profile.items() if apply_overrides(defaults, {k: v}) != defaults]
    assert len(changed) == len(differ) > 5, changed
    assert load_params(path).train.fine_tune_epochs == profile["train.fine_tune_epochs"]
