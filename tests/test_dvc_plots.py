"""`dvc plots show` renders offline, and `dvc exp show` has a readable invocation.

DVC's own page loads Vega from a CDN, so the history curves were blank without network; the
project's template (`.dvc/plots/offline.html`, `plots.html_template` in `.dvc/config`) carries
the libraries. The page is checked in headless Chromium that can reach no host.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.browser import Browser, needs_chromium
from tests.helpers import ROOT, clone_project, run_tool

TEMPLATE = ROOT / ".dvc/plots/offline.html"
LIBRARIES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
# The README's invocation: params that vary (every column that is not a params.yaml key is dropped)
# and the test accuracy of each mode (kept, varying or not).
SECTIONS = "seed|device|paths|data|download|preprocess|train|evaluate|detect|mlflow"
EXP_SHOW = ["exp", "show", "--only-changed", "--keep", ".*test_acc$",
            "--drop", rf"^(?!Experiment|params\.yaml:|({SECTIONS})(\.|$)).*"]


def test_plots_template_carries_the_libraries_and_loads_nothing():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc/config")
    assert (ROOT / ".dvc" / cfg["plots"]["html_template"]) == TEMPLATE
    html = TEMPLATE.read_text()
    assert "{plot_divs}" in html and "{scripts}" not in html  # DVC's CDN scripts are not inserted
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", html)
    scripts = re.findall(r"<!-- ([\w-]+) ([\d.]+) \(npm\), build/[\w.-]+, sha256 (\w+) -->\n\s*<script>(.*?)</script>",
                         html, re.S)
    assert {name: version for name, version, _, _ in scripts} == LIBRARIES
    for name, _, digest, js in scripts:
        assert hashlib.sha256(js.encode()).hexdigest() == digest, name
        assert (ROOT / f".dvc/plots/vendor/LICENSE-{name}").is_file()


def _history(epochs: int, offset: float) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5 + e / 20 + offset, "val_loss": 1.2 / e,
             "val_acc": 0.45 + e / 20 + offset, "images_per_s": 100.0} for e in range(1, epochs + 1)]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A clone of the project with the outputs of a run: histories, evaluate figures and metrics."""
    from cvpipe.io import write_json
    from tasks.evaluate import _save_figure, plot_accuracy, plot_confusion

    repo = clone_project(tmp_path_factory.mktemp("plots"))
    histories = {"feature_extractor": _history(5, 0.0), "fine_tune": _history(3, 0.1)}
    for mode, rows in histories.items():
        write_json(repo / f"outputs/train/{mode}/history.json", rows)
    out = repo / "outputs/evaluate"
    _save_figure(plot_accuracy(histories), out / "accuracy.png")
    for mode in histories:
        _save_figure(plot_confusion(np.array([[3, 1], [0, 4]]), ["a", "b"], mode), out / "confusion" / f"{mode}.png")
    return repo, histories


@pytest.mark.slow
@needs_chromium
def test_dvc_plots_show_renders_every_plot_offline(clone, tmp_path):
    repo, histories = clone
    r = run_tool([sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    page = tmp_path / "plots/index.html"
    with Browser((1200, 1600)) as b:
        b.goto(page.as_uri())
        b.wait_for(f"document.querySelectorAll('svg.marks').length >= {len(histories)}", 60, "the history charts")
        lines = b.evaluate("""Array.from(document.querySelectorAll('svg.marks')).map(svg => ({
            title: (svg.querySelector('.role-title-text') || {}).textContent,
            paths: Array.from(svg.querySelectorAll('.mark-line path')).map(p => p.getAttribute('d'))}))""")
        images = b.evaluate("""Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])""")
        b.screenshot(tmp_path / "plots.png")
    by_title = {ln["title"]: ln["paths"] for ln in lines}
    for mode, rows in histories.items():
        paths = by_title[f"outputs/train/{mode}/history.json"]
        # one drawn line through every epoch: "M x,y" then one "L x,y" per further epoch
        assert any(d and d.count("L") == len(rows) - 1 for d in paths), paths
    srcs = {src: width for src, width in images}
    # DVC copies each image to static/, its path flattened: outputs/evaluate/confusion/fine_tune.png ->
    # workspace_outputs_evaluate_confusion_fine_tune.png
    for name in ("evaluate/accuracy.png", "evaluate/confusion/feature_extractor.png", "evaluate/confusion/fine_tune.png"):
        flat = name.replace("/", "_")
        assert any(n.endswith(flat) and w > 100 for n, w in srcs.items()), srcs  # decoded, not a broken image


@pytest.mark.slow
def test_dvc_exp_show_fits_120_columns(clone):
    """The README's `dvc exp show` invocation: the params that vary and the headline metrics, in 120 columns."""
    from cvpipe.io import write_json
    from cvpipe.params import write_overrides

    repo, _ = clone
    train = {"mode": "", "backbone": "efficientnet_lite0", "epochs": 3, "best_epoch": 3, "best_val_loss": 0.1,
             "best_val_acc": 0.97, "train_loss": 0.1, "train_acc": 0.98, "val_loss": 0.1, "val_acc": 0.97,
             "images_per_s": 40.0, "duration_s": 120.0, "device": "cpu", "amp": "off"}
    for mode in ("feature_extractor", "fine_tune"):
        write_json(repo / f"outputs/train/{mode}/metrics.json", {**train, "mode": mode})
    evaluate = {m: {"test_acc": 0.96, "test_loss": 0.12, "n_test": 360} for m in ("feature_extractor", "fine_tune")}
    write_json(repo / "outputs/evaluate/metrics.json", evaluate)
    write_json(repo / "outputs/detect/metrics.json", {
        "inputs": 6, "images": 6, "failures": 0, "detections": 3, "per_class": {"cat": 1, "person": 2},
        "images_per_s": 2.0, "forward_images_per_s": 4.0, "seconds": {"wall": 3.0, "forward": 1.5}})
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"]):
        subprocess.run(cmd, cwd=repo, check=True)
    # the workspace differs from the baseline as an experiment would: one param, the accuracies
    write_overrides(repo / "params.yaml", {"train.lr": 0.0003})
    write_json(repo / "outputs/evaluate/metrics.json", {m: {**v, "test_acc": 0.98} for m, v in evaluate.items()})

    r = subprocess.run([sys.executable, "-m", "dvc", *EXP_SHOW, "--no-pager"], cwd=repo, capture_output=True,
                       text=True, timeout=300, env={**_env(), "COLUMNS": "120"})
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    assert max(len(line) for line in text.splitlines()) <= 120 and "…" not in text, text
    header, workspace, baseline = (line.split() for line in text.splitlines() if line.strip(" ─"))
    assert header == ["Experiment", "feature_extractor.test_acc", "fine_tune.test_acc", "train.lr"], text
    assert workspace == ["workspace", "0.98", "0.98", "0.0003"], text
    assert baseline[1:] == ["0.96", "0.96", "0.001"], text  # the branch's row; committed metrics: no "!"


def _env() -> dict:
    import os

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_evaluate_metrics_file_has_headline_numbers_only():
    """Per-class accuracy is a plain output of evaluate, not a DVC metrics file (one column per class)."""
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    metrics = [next(iter(m)) if isinstance(m, dict) else m for m in stage["metrics"]]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
    assert metrics == ["${paths.evaluate}/metrics.json"] and "${paths.evaluate}/per_class.json" in outs
    json.dumps(stage)  # plain YAML, no tags
