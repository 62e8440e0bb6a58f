"""MLflow's UI on a store made by the real train and evaluate flows, in headless Chromium.

The URL the CLI prints opens the experiment's training runs (not MLflow 3's GenAI overview), the
Source column names the flow, and a run page charts the per-epoch curves first.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.browser import Browser, needs_chromium
from tests.helpers import tiny_project

pytestmark = [pytest.mark.slow, needs_chromium]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    """Both modes trained (3 and 2 epochs) and evaluated by the flows into a fresh sqlite store."""
    from flows.evaluate import evaluate_flow
    from flows.train import train_flow

    tmp = tmp_path_factory.mktemp("ui")
    p = tiny_project(tmp, {"train.epochs": 3, "train.fine_tune_epochs": 2})
    for mode in ("feature_extractor", "fine_tune"):
        train_flow(str(tmp / "params.yaml"), mode=mode)
    evaluate_flow(str(tmp / "params.yaml"))
    return p


@pytest.fixture(scope="module")
def ui(store, tmp_path_factory):
    """`mlflow ui` on the store, bound to 127.0.0.1, as the CLI tells the user to start it; yields its URL."""
    from flows.tracking import tracking_uri

    port = _free_port()
    log = tmp_path_factory.mktemp("ui-log") / "mlflow-ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                                 tracking_uri(store), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def _runs(p) -> dict:
    from mlflow.tracking import MlflowClient

    from flows.tracking import tracking_uri

    client = MlflowClient(tracking_uri(p))
    exp = client.get_experiment_by_name(p.mlflow.experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_printed_url_opens_the_training_runs_with_their_source(store, ui, tmp_path):
    from flows.tracking import ui_runs_url

    url = ui_runs_url(store, ui)
    assert url.endswith("/runs?workflowType=machine_learning")
    with Browser((2400, 1000)) as b:
        b.goto(url)
        b.wait_for("document.body.innerText.includes('train-feature_extractor') && "
                   "document.body.innerText.includes('train-fine_tune')", what="both training runs")
        b.wait_for("document.body.innerText.includes('train.py')", what="the Source column")
        # The Models column is filled by later requests than the runs themselves.
        b.wait_for("document.body.innerText.includes('cvpipe-classifier')", what="the Models column")
        b.screenshot(tmp_path / "runs.png")
        text = b.text()
    # the runs table in the UI's model-training mode, not the GenAI overview (Usage / Quality / Tool calls)
    assert "Model training" in text and "Usage" not in text and "Tool calls" not in text
    table = text.split("Run Name", 1)[1]
    for column in ("Created", "Duration", "Source", "Models"):
        assert column in table.split("train-", 1)[0], table[:500]
    assert table.count("train.py") == 2  # Source: the flow file of each run
    # Models: the registered version for the run evaluate registered, the logged model (named by mode)
    # for the other one.
    assert table.count("cvpipe-classifier") == 1, table[:800]
    assert ("model-feature_extractor" in table) != ("model-fine_tune" in table), table[:800]


def test_run_page_charts_the_epoch_curves_first(store, ui, tmp_path):
    run = _runs(store)["train-fine_tune"]
    url = (f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics"
           "?workflowType=machine_learning")
    with Browser((1800, 1200)) as b:
        b.goto(url)
        b.wait_for("document.body.innerText.includes('(epoch/val_loss)') && "
                   "document.querySelectorAll('.js-plotly-plot').length >= 5", what="the epoch charts drawn")
        b.screenshot(tmp_path / "run-metrics.png")
        text = b.text()
    lines = [ln.strip() for ln in text.split("Auto-refresh", 1)[1].splitlines() if ln.strip()]
    # first section: the per-epoch curves (Step axis); the single values come after, in "Model metrics"
    assert lines[:2] == ["epoch", "(5)"], lines[:20]
    singles = lines.index("Model metrics")
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "images_per_s"):
        assert lines.index(f"train-fine_tune (epoch/{key})") < singles, lines[:80]
    assert lines[:singles].count("Step") == 5, lines[:singles]
    assert "best_val_acc" in lines[singles:]
    for hidden in ("final_", "test_acc_class"):
        assert not [ln for ln in lines if ln.startswith(hidden)], lines
