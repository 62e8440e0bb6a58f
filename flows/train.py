"""Prefect flow for the ``train`` stage: one MLflow run per mode (``train-<mode>``, tag ``mode``)."""

from __future__ import annotations

import threading
from importlib.metadata import version
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from cvpipe.io import read_json, write_json
from cvpipe.layout import CARD, HISTORY, RUN, TRAIN_METRICS
from cvpipe.params import Params, load_params
from flows.registry import logged_model_name
from flows.tracking import StageRun, stage_run
from tasks.export import exported_model, save_classifier_data
from tasks.train import EPOCH_KEYS, model_costs, train

# Packages the logged model's loader needs besides cvpipe itself (pinned, so MLflow need not infer them).
# cvpipe is not listed: the model is served from the project's environment (`--env-manager local`).
EPOCH_SECTION = "epoch"  # MLflow metric keys of the per-epoch curves: epoch/train_loss, ...
MODEL_REQUIREMENTS = ("torch", "torchvision", "numpy", "opencv-python-headless", "efficientnet-lite-pytorch")

train_task = task(train, name="train", cache_policy=NO_CACHE)
costs_task = task(model_costs, name="model-costs", cache_policy=NO_CACHE)

_TRAINING_SLOTS: dict[str, threading.Semaphore] = {}
_SLOTS_LOCK = threading.Lock()


def training_slot(device: str) -> threading.Semaphore:
    """What training modes run side by side in one process (the pipeline's two train stages) hold while
    they train: one at a time on a CPU, where they would only fight over the same cores; two on a GPU.

    The training and the latency measurement of its model hold it: one mode's MLflow bookkeeping (its
    metrics, artifacts and the logged model: about a second) overlaps the next mode's training instead
    of delaying it, but a latency timed beside the other mode's training would be that of shared cores.
    """
    with _SLOTS_LOCK:
        if device not in _TRAINING_SLOTS:
            import torch

            gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
            _TRAINING_SLOTS[device] = threading.Semaphore(2 if gpu else 1)
        return _TRAINING_SLOTS[device]


def log_model(run: StageRun, p: Params, mode: str) -> None:
    """Log the best model of ``mode`` as a :mod:`cvpipe.model_flavor` pyfunc named ``model-<mode>``, with
    a signature and an input example: data only (card and weights), loaded by the installed package,
    no code in the store."""
    import tempfile

    import mlflow
    import mlflow.pyfunc

    from cvpipe import model_flavor

    clf, example, output = exported_model(p, mode)
    with tempfile.TemporaryDirectory(prefix="cvpipe-model-") as tmp, mlflow.start_run(run_id=run.run_id):
        data = save_classifier_data(clf, Path(tmp) / model_flavor.DATA_DIR)
        mlflow.pyfunc.log_model(
            name=logged_model_name(mode), loader_module=model_flavor.LOADER_MODULE, data_path=str(data),
            signature=model_flavor.signature(example, output), input_example=example,
            pip_requirements=[f"{r}=={version(r).split('+')[0]}" for r in MODEL_REQUIREMENTS])


def write_run_id(p: Params, mode: str, run_id: str) -> None:
    """Record the MLflow run of a mode's model (``run.json``), so ``evaluate`` logs into the same run."""
    write_json(p.paths.train / mode / RUN, {"run_id": run_id})


def weights_label(weights: str) -> str:
    """How the backbone started, for humans comparing runs: random initialisation is said plainly."""
    return {"none": "random init (no pretrained weights)"}.get(weights, weights)


@flow(name="train", flow_run_name="train-{mode}", log_prints=True)
def train_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None,
               mode: str = "feature_extractor") -> dict:
    """Train one mode (``feature_extractor`` or ``fine_tune``); returns its final metrics."""
    p = load_params(params_file, overrides)
    with stage_run(p, "train", run_name=f"train-{mode}", tags={"mode": mode}) as run:
        # The UI charts a run's metrics by section, sections named by a "/" prefix first: the per-epoch
        # curves ("epoch/...") come before the few single values (the headline accuracy and what
        # `cvpipe compare` shows). Every final figure is in the metrics.json artifact.
        with training_slot(p.device):
            metrics = train_task(p, mode, on_epoch=lambda row: run.log_metrics(
                {f"{EPOCH_SECTION}/{k}": row[k] for k in (*EPOCH_KEYS, "images_per_s")}, step=row["epoch"]))
            # Timed before the slot is released: on a CPU the other mode trains as soon as it is.
            costs = costs_task(p, mode, metrics["device"])
        run.log_metrics({"best_val_acc": metrics["best_val_acc"], "images_per_s": metrics["images_per_s"],
                         **costs})
        run.set_tags({"backbone": p.train.backbone, "weights": p.train.weights, "device": metrics["device"],
                      "weights_label": weights_label(p.train.weights),
                      "amp": metrics["amp"],
                      "data_hash": read_json(p.paths.processed / CARD)["data_hash"]})
        out = p.paths.train / mode
        run.log_artifact(out / HISTORY)
        run.log_artifact(out / TRAIN_METRICS)
        log_model(run, p, mode)
        write_run_id(p, mode, run.run_id)
    return metrics
