"""The whole-DAG flow: schedules, DVC agreement and the quickstart."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # Prefect's test server
def test_serve_creates_a_deployment_with_its_cron_schedule(prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline_deployment

    deployment = pipeline_deployment("nightly-test", "15 3 * * 1-5", "params.yaml", "Europe/Paris")
    deployment_id = deployment.apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    d = asyncio.run(read())
    assert d.name == "nightly-test"
    assert d.parameters == {"params_file": "params.yaml", "force": False}
    assert len(d.schedules) == 1
    sched = d.schedules[0].schedule
    assert sched.cron == "15 3 * * 1-5" and sched.timezone == "Europe/Paris"


@pytest.mark.slow  # Prefect's test server
def test_no_stage_starts_before_the_commits_of_the_stages_it_reads(prefect_server, tmp_path, monkeypatch):
    """The pipeline flow commits each stage to dvc.lock in the background; DVC's commit replaces the
    stage's outputs in the workspace, so each stage starts only after its upstream stages' commits
    (flows.pipeline.upstream_stages), while the others go on beside them."""
    import threading
    import time

    from flows import pipeline
    from flows.dvc_sync import DvcSync
    from tests.helpers import write_params

    params = write_params(tmp_path, {"train.modes": ["feature_extractor", "fine_tune"]})
    monkeypatch.chdir(tmp_path)
    lock = threading.Lock()
    committed: list[str] = []
    seen: dict[str, set[str]] = {}

    def commit(self, stage, relink=True):
        time.sleep(0.3)  # a commit slower than the stages that follow it
        with lock:
            committed.append(stage)

    def stage_flow(stage):
        def body(params_file, **kwargs):
            with lock:
                seen[stage] = set(committed)
            return {"stage": stage}
        return body, {}

    monkeypatch.setattr(DvcSync, "commit", commit)
    monkeypatch.setattr(DvcSync, "relinks", lambda self: True)  # a user's cache.type hardlink, say
    monkeypatch.setattr(DvcSync, "stale", lambda self, stage: {stage: ["changed"]})
    monkeypatch.setattr(pipeline, "stage_flow", stage_flow)
    rows = pipeline.pipeline_flow(params_file=str(params))
    ups = pipeline.upstream_stages(["feature_extractor", "fine_tune"])
    assert [r["stage"] for r in rows] == list(ups) and {r["status"] for r in rows} == {"ran"}
    for stage, after in ups.items():
        assert set(after) <= seen[stage], (stage, seen[stage])
    assert sorted(committed) == sorted(ups)  # and every commit done before the flow returned


@pytest.mark.slow  # Prefect's test server
def test_without_relinking_no_stage_waits_for_a_commit(prefect_server, tmp_path, monkeypatch):
    """With DVC's default cache (no relink, the workspace files are left alone) evaluate starts while
    the training stages' commits are still running."""
    import threading

    from flows import pipeline
    from flows.dvc_sync import DvcSync
    from tests.helpers import write_params

    params = write_params(tmp_path, {"train.modes": ["feature_extractor", "fine_tune"]})
    monkeypatch.chdir(tmp_path)
    evaluate_started = threading.Event()
    committed: list[str] = []
    seen: dict[str, list[str]] = {}

    def commit(self, stage, relink=True):
        assert relink is False
        if stage.startswith("train@"):
            evaluate_started.wait(60)  # cannot return before evaluate runs: no one may wait for it
        committed.append(stage)

    def stage_flow(stage):
        def body(params_file, **kwargs):
            seen[stage] = list(committed)
            if stage == "evaluate":
                evaluate_started.set()
            return {"stage": stage}
        return body, {}

    monkeypatch.setattr(DvcSync, "commit", commit)
    monkeypatch.setattr(DvcSync, "relinks", lambda self: False)
    monkeypatch.setattr(DvcSync, "stale", lambda self, stage: {stage: ["changed"]})
    monkeypatch.setattr(pipeline, "stage_flow", stage_flow)
    pipeline.pipeline_flow(params_file=str(params))
    assert not any(s.startswith("train@") for s in seen["evaluate"])
    assert sorted(committed) == sorted(pipeline.upstream_stages(["feature_extractor", "fine_tune"]))


def test_bad_cron_is_rejected():
    from flows.pipeline import pipeline_deployment

    with pytest.raises(ValueError):
        pipeline_deployment("x", "not a cron", "params.yaml")


@pytest.mark.slow
def test_cvpipe_run_agrees_with_dvc_and_feeds_compare_registry_predict(tmp_path):
    """`cvpipe run` on a fresh copy (shrunk quickstart), then `dvc status` is clean, a second run skips
    everything, `cvpipe compare` lists both modes and `cvpipe predict` answers from the champion."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import clone_project

    (tmp_path / "clone").mkdir()
    repo = clone_project(tmp_path / "clone")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cvpipe = [str(Path(sys.executable).parent / "cvpipe")]

    def run(*args):
        r = subprocess.run([*args], cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    out = run(*cvpipe, "run", "--profile", "offline", "--set", "train.image_size=32", "--set", "train.fine_tune_epochs=1")
    for stage in ("download", "preprocess", "train@feature_extractor", "train@fine_tune", "detect", "evaluate"):
        assert f"  {stage} " in out and "ran" in out.split(f"  {stage} ")[1].splitlines()[0], out
    assert "mlflow ui --backend-store-uri" in out

    status = run(sys.executable, "-m", "dvc", "status")
    assert "up to date" in status, status
    again = run(*cvpipe, "run")
    assert again.count("skipped") == 6, again

    metrics = json.loads((repo / "outputs/evaluate/metrics.json").read_text())
    assert set(metrics) >= {"feature_extractor", "fine_tune"}

    # On a CPU the two modes train one after the other (flows.train.training_slot): the per-epoch
    # points MLflow recorded for one mode all come before the other's.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    spans = {}
    for r in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        if r.data.tags.get("mode") and r.info.run_name.startswith("train-"):
            stamps = [m.timestamp for m in client.get_metric_history(r.info.run_id, "epoch/train_loss")]
            spans[r.data.tags["mode"]] = (min(stamps), max(stamps))
    assert set(spans) == {"feature_extractor", "fine_tune"}, spans
    first, second = sorted(spans.values())
    assert first[1] <= second[0], spans
    assert metrics["feature_extractor"]["test_acc"] > 0.5  # 10 classes: chance is 0.1

    table = run(*cvpipe, "compare")
    assert "feature_extractor" in table and "fine_tune" in table and "efficientnet_lite0" in table
    assert (repo / "outputs/compare/runs.png").stat().st_size > 0

    # The README's example: the digit the download stage wrote, with the model that answers named first.
    pred = run(*cvpipe, "predict", str(repo / "data/samples/digit_7.png"), "--top-k", "2")
    lines = pred.strip().splitlines()
    assert lines[0].startswith("model: models:/cvpipe-classifier@champion = version 1 (") and len(lines) == 4
    assert "trained on digits" in lines[0] and "10 classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in lines[0]
    assert lines[1].endswith("digit_7.png")
    probs = [float(line.split("%")[0]) for line in lines[2:]]
    assert probs[0] >= probs[1] and all(0 <= x <= 100 for x in probs)
