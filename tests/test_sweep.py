"""`cvpipe sweep` is a Prefect flow with one task per backbone, each backbone's runs in MLflow.

The sweep trains two real backbones (EfficientNet-Lite0 and ResNet-18, both from random weights so
nothing is fetched) for one epoch on the digits at 32 px, under Prefect's test server.
"""

from __future__ import annotations

import csv
import io

import pytest

from cvpipe.params import load_params
from tests.helpers import write_params

pytestmark = pytest.mark.slow

BACKBONES = ["efficientnet_lite0", "resnet18"]


def test_sweep_flow_trains_each_backbone_as_a_task_and_logs_the_comparison(tmp_path, prefect_server):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.sweep import sweep_flow
    from flows.tracking import tracking_uri

    params = write_params(tmp_path, {"train.weights": "none", "train.epochs": 1, "train.image_size": 32})
    p = load_params(params)
    state = sweep_flow(BACKBONES, params_file=str(params), return_state=True)
    assert state.is_completed(), state
    out = state.result()

    # Each backbone trained both modes into its own folder; the main pipeline's folders are untouched.
    assert [r["backbone"] for r in out["results"]] == BACKBONES
    for r in out["results"]:
        assert set(r["test_acc"]) == set(p.train.modes)
        assert all(0.0 <= a <= 1.0 for a in r["test_acc"].values())
        for mode in p.train.modes:
            assert (p.paths.sweep / r["backbone"] / "train" / mode / "model.pt").is_file()
    assert not any((p.paths.train / m).exists() for m in p.train.modes)

    # The comparison table holds what the tasks returned.
    rows = list(csv.DictReader(io.StringIO((p.paths.sweep / "sweep.csv").read_text())))
    assert [r["backbone"] for r in rows] == BACKBONES
    for row, r in zip(rows, out["results"]):
        for mode, acc in r["test_acc"].items():
            assert float(row[f"test_acc_{mode}"]) == pytest.approx(acc, abs=5e-5)

    # MLflow: one train run per backbone and mode, tagged with the sweep and its backbone; the sweep run
    # records every test accuracy and the table.
    client = MlflowClient(tracking_uri(p))
    exp = client.get_experiment_by_name(p.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{out['sweep_id']}'")
    train_runs = [r for r in runs if r.data.tags.get("stage") == "train"]
    assert sorted((r.data.tags["backbone"], r.data.tags["mode"]) for r in train_runs) == sorted(
        (b, m) for b in BACKBONES for m in p.train.modes)
    for r in train_runs:
        assert r.data.params["train.backbone"] == r.data.tags["backbone"]
        assert "test_acc" in r.data.metrics  # evaluate logged into the run that trained the model
    sweep_run = client.get_run(out["run_id"])
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["stage"] == "sweep"
    for r in out["results"]:
        for mode, acc in r["test_acc"].items():
            assert sweep_run.data.metrics[f"test_acc_{r['backbone']}_{mode}"] == pytest.approx(acc)
    assert [a.path for a in client.list_artifacts(out["run_id"])] == ["sweep.csv"]

    # Prefect: the flow run has one task per backbone, each completed, named after its backbone.
    with get_client(sync_client=True) as c:
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    names = sorted(t.name for t in tasks if t.name.startswith("backbone@"))
    assert names == [f"backbone@{b}" for b in sorted(BACKBONES)]
    assert all(t.state.is_completed() for t in tasks if t.name.startswith("backbone@"))


def test_sweep_refuses_an_unknown_backbone_before_training(tmp_path, prefect_server):
    from cvpipe.params import ParamsError
    from flows.sweep import sweep_flow

    params = write_params(tmp_path, {"train.weights": "none"})
    with pytest.raises(ParamsError, match="backbone"):
        sweep_flow(["resnet18", "resnet19"], params_file=str(params))
    assert not (load_params(params).paths.sweep).exists()
