"""Tests for the ``evaluate`` stage, the train / evaluate flows with MLflow, and the accuracy bars on digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cvpipe.io import read_json
from cvpipe.layout import RUN
from cvpipe.params import load_params
from tasks.evaluate import (
    confusion_matrix,
    evaluate,
    per_class_accuracy,
    plot_accuracy,
    plot_confusion,
)
from tasks.train import train
from tests.helpers import TINY_CLASSES, tiny_images, tiny_project, write_params

PNG = b"\x89PNG\r\n\x1a\n"


def test_confusion_matrix_and_per_class_accuracy():
    y = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    cm = confusion_matrix(y, pred, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    pca = per_class_accuracy(cm)
    assert pca[:3].tolist() == [0.5, 2 / 3, 1.0] and np.isnan(pca[3])


def test_plots_are_png(tmp_path):
    from tasks.evaluate import _save_figure

    _save_figure(plot_confusion(np.array([[3, 1], [0, 4]]), ["a", "b"], "t"), tmp_path / "c.png")
    rows = [{"epoch": e, "train_acc": 0.5 + e / 10, "val_acc": 0.4 + e / 10} for e in (1, 2, 3)]
    _save_figure(plot_accuracy({"feature_extractor": rows, "fine_tune": rows}), tmp_path / "a.png")
    for name in ("c.png", "a.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000


def test_evaluate_stage_on_tiny_models(tmp_path):
    p = tiny_project(tmp_path, {"train.epochs": 10, "train.lr": 0.01, "train.fine_tune_epochs": 2})
    for mode in ("feature_extractor", "fine_tune"):
        train(p, mode)
    metrics = evaluate(p)
    out = p.paths.evaluate
    # metrics.json (DVC metrics) holds the headline numbers; per-class accuracy is in per_class.json
    assert read_json(out / "metrics.json") == {m: {k: r[k] for k in ("test_acc", "test_loss", "n_test")}
                                               for m, r in metrics.items()}
    assert read_json(out / "per_class.json") == {m: r["per_class_acc"] for m, r in metrics.items()}
    _, y = tiny_images(10, 3)
    for mode in ("feature_extractor", "fine_tune"):
        m = metrics[mode]
        assert m["n_test"] == len(y) == 40
        assert m["test_acc"] >= 0.75  # chance is 0.25
        conf = read_json(out / "confusion.json")[mode]
        cm = np.array(conf["matrix"])
        assert conf["classes"] == TINY_CLASSES and cm.sum() == 40
        assert np.trace(cm) / 40 == pytest.approx(m["test_acc"])
        assert [r["actual"] for r in conf["predictions"]] == [TINY_CLASSES[i] for i in y]
        assert sum(r["actual"] == r["predicted"] for r in conf["predictions"]) == np.trace(cm)
        assert m["per_class_acc"] == pytest.approx(dict(zip(TINY_CLASSES, np.diag(cm) / cm.sum(1))))
        assert (out / "confusion" / f"{mode}.png").read_bytes().startswith(PNG)
    assert (out / "accuracy.png").read_bytes().startswith(PNG)


def test_evaluate_needs_a_trained_model(tmp_path):
    p = tiny_project(tmp_path)
    with pytest.raises(FileNotFoundError, match="cvpipe train"):
        evaluate(p)


# --------------------------------------------------------------------------- flows + MLflow


def _runs(p):
    from mlflow.tracking import MlflowClient

    from flows.tracking import tracking_uri

    client = MlflowClient(tracking_uri(p))
    exp = client.get_experiment_by_name(p.mlflow.experiment)
    return client, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def check_tracking(p, modes: dict[str, int], metrics: dict[str, dict]) -> None:
    """One MLflow run per mode with per-epoch curves, a loadable model, and the evaluation logged into it.

    The run's metrics are the per-epoch curves (section ``epoch/``, charted first by the UI) and a few
    single values; final and per-class figures are artifacts. The run names its source and commit.
    """
    import subprocess

    import mlflow.pyfunc

    from tests.helpers import ROOT

    client, runs = _runs(p)
    for mode, epochs in modes.items():
        run = runs[f"train-{mode}"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mode"] == mode and run.data.tags["stage"] == "train"
        assert run.data.tags["mlflow.source.name"] == "flows/train.py"
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        commit = run.data.tags["mlflow.source.git.commit"]  # the checkout's HEAD when the run started
        assert len(commit) == 40 and subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"],
                                                    cwd=ROOT).returncode == 0
        assert read_json(p.paths.train / mode / RUN) == {"run_id": run.info.run_id}
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "images_per_s"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, f"epoch/{key}")]
            assert sorted(steps) == list(range(1, epochs + 1)), key
        single = {k for k in run.data.metrics if not k.startswith("epoch/")}
        assert single == {"best_val_acc", "images_per_s", "n_params", "model_size_mb", "latency_ms",
                          "test_acc", "test_loss"}
        assert run.data.metrics["test_acc"] == pytest.approx(metrics[mode]["test_acc"])
        assert run.data.tags["evaluated"] == "true"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
        assert "evaluate/accuracy.png" in artifacts
        assert f"evaluate/confusion/{mode}.png" in {
            a.path for a in client.list_artifacts(run.info.run_id, "evaluate/confusion")}
        assert {"evaluate/metrics.json", "evaluate/per_class.json", "evaluate/confusion.json"} <= artifacts
        assert "metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id)}  # the final figures

        logged = [m for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
                  if m.source_run_id == run.info.run_id]
        assert [m.name for m in logged] == [f"model-{mode}"]
        model = mlflow.pyfunc.load_model(logged[0].model_uri)
        info = mlflow.models.get_model_info(logged[0].model_uri)
        assert info.flavors["python_function"]["loader_module"] == "cvpipe.model_flavor"
        assert info.signature.inputs is None  # the model checks its inputs (images of any kind) itself
        x = np.load(Path(p.paths.processed) / "test.npz")["x"][:5]
        out = model.predict(x)
        assert out["logits"].shape == (5, len(read_json(p.paths.processed / "card.json")["classes"]))
        assert out["probabilities"].sum(1) == pytest.approx(np.ones(5), abs=1e-5)


@pytest.mark.slow  # two train flows under Prefect, side by side as the pipeline runs them
def test_a_modes_latency_is_timed_before_the_other_mode_trains(tmp_path, prefect_server):
    """On a CPU the modes take turns at training (flows.train.training_slot); a mode's inference
    latency is timed (task ``model-costs``) before the other mode may start, not beside its training."""
    import asyncio
    import threading
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.train import train_flow

    tiny_project(tmp_path, {"train.epochs": 2, "train.fine_tune_epochs": 1})
    params_file = str(tmp_path / "params.yaml")
    results, errors = {}, []

    def train(mode):
        try:
            results[mode] = train_flow(params_file, mode=mode)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    started = datetime.now(timezone.utc)  # the session's server holds other tests' runs too
    threads = [threading.Thread(target=train, args=(m,)) for m in ("fine_tune", "feature_extractor")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(results) == {"fine_tune", "feature_extractor"}, errors

    async def task_runs():
        async with get_client() as client:
            runs = [r for r in await client.read_flow_runs()
                    if r.name.startswith("train-") and r.start_time and r.start_time >= started]
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])))
            return {r.id: r.name for r in runs}, tasks

    names, tasks = asyncio.run(task_runs())
    spans: dict[str, dict[str, tuple]] = {}
    for t in tasks:
        kind = t.name.rsplit("-", 1)[0]  # "train-3f2" -> train, "model-costs-0a1" -> model-costs
        if names.get(t.flow_run_id) in ("train-fine_tune", "train-feature_extractor") and kind in ("train", "model-costs"):
            spans.setdefault(names[t.flow_run_id], {})[kind] = (t.start_time, t.end_time)
    assert set(spans) == {"train-fine_tune", "train-feature_extractor"}, spans
    first, second = sorted(spans.values(), key=lambda s: s["train"][0])
    assert first["train"][1] <= first["model-costs"][0] <= first["model-costs"][1] <= second["train"][0], spans


@pytest.mark.slow  # the train and evaluate flows under Prefect
def test_flows_log_one_run_per_mode_and_evaluate_into_it(tmp_path, prefect_server, caplog):
    from flows.evaluate import evaluate_flow
    from flows.train import train_flow

    p = tiny_project(tmp_path, {"train.epochs": 2, "train.fine_tune_epochs": 1})
    params_file = str(tmp_path / "params.yaml")
    fe = train_flow(params_file, mode="feature_extractor")
    ft = train_flow(params_file, mode="fine_tune")
    assert fe["epochs"] == 2 and ft["epochs"] == 1
    with caplog.at_level("WARNING"):
        metrics = evaluate_flow(params_file)
    # registering from the logged model: no "no artifacts at artifact path" warning (runs:/<id>/model)
    assert not [r.getMessage() for r in caplog.records if "artifact" in r.getMessage().lower()]
    assert set(metrics) == {"feature_extractor", "fine_tune"}
    check_tracking(p, {"feature_extractor": 2, "fine_tune": 1}, metrics)
    check_registered(p, metrics)


def check_registered(p, metrics: dict[str, dict]) -> None:
    """The best mode's logged model (``models:/<model_id>``) is registered, with its run."""
    from mlflow.tracking import MlflowClient

    from flows.registry import logged_model_id
    from flows.tracking import tracking_uri

    client, runs = _runs(p)
    best = max(metrics, key=lambda m: metrics[m]["test_acc"])
    [version] = MlflowClient(tracking_uri(p)).search_model_versions(f"name = '{p.mlflow.registered_model}'")
    assert version.source.startswith("models:/m-") and version.run_id == runs[f"train-{best}"].info.run_id
    assert client.get_logged_model(logged_model_id(version)).name == f"model-{best}"


# --------------------------------------------------------------------------- accuracy bars on digits


DIGITS_112 = {
    "train.image_size": 112,
    "train.epochs": 60,            # the head on cached features: seconds
    "train.fine_tune_epochs": 3,
    "train.hflip": False,          # a mirrored digit is another symbol (and 6 flipped both ways is a 9)
    "train.vflip": False,
    # The bars are for fp32 numerics: `amp: auto` picks bf16 autocast on CPUs with bf16 instructions,
    # where fine_tune reached 0.975 (AMD EPYC with avx512_bf16) instead of 0.99.
    "train.amp": "off",
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, prefect_server):
    """download (digits, offline efficientnet_lite0 weights) -> preprocess -> train both modes -> evaluate."""
    from flows.evaluate import evaluate_flow
    from flows.train import train_flow
    from tasks.download import download_backbone, export_digits
    from tasks.preprocess import preprocess

    tmp = tmp_path_factory.mktemp("digits")
    params_file = write_params(tmp, DIGITS_112)
    p = load_params(params_file)
    export_digits(p.paths.raw)
    preprocess(p)
    download_backbone(p.train, p.paths.backbone, p.download)
    train = {m: train_flow(str(params_file), mode=m) for m in ("feature_extractor", "fine_tune")}
    print("digits train metrics:", json.dumps(train, indent=1))
    return p, train, evaluate_flow(str(params_file))


@pytest.mark.slow
def test_digits_feature_extractor_accuracy(digits_run):
    p, train_metrics, metrics = digits_run
    assert metrics["feature_extractor"]["n_test"] == 360
    assert metrics["feature_extractor"]["test_acc"] >= 0.95
    assert train_metrics["feature_extractor"]["feature_images_per_s"] > 0


@pytest.mark.slow
def test_digits_fine_tune_accuracy(digits_run):
    p, train_metrics, metrics = digits_run
    assert metrics["fine_tune"]["test_acc"] >= 0.98
    assert min(metrics["fine_tune"]["per_class_acc"].values()) >= 0.9


@pytest.mark.slow
def test_digits_runs_are_tracked(digits_run):
    p, _, metrics = digits_run
    check_tracking(p, {"feature_extractor": 60, "fine_tune": 3}, metrics)
