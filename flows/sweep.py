"""Compare backbones as one Prefect flow (`cvpipe sweep`).

    sweep ── backbone@resnet18:  download -> [preprocess] -> train@<mode>... -> evaluate
          └─ backbone@vgg16:     download ->                train@<mode>... -> evaluate

Each backbone is one task that runs the stage flows with that backbone (the data are prepared once
and shared); each of its training modes is an MLflow run ``train-<mode>`` tagged ``sweep=<id>``, and
evaluate registers each backbone's best model. A ``sweep`` MLflow run records the backbones, each
one's test accuracy per mode and the comparison table. Outputs go under ``<paths.sweep>``
(outputs/sweep), so the main pipeline's outputs, and what DVC tracks, are untouched.

The same comparison through DVC, one experiment per backbone: ``dvc exp run --queue -S
train.backbone=<name>`` for each, then ``dvc exp run --run-all`` (README, "Comparing backbones").
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, task

from cvpipe.io import atomic_write_text
from cvpipe.params import Params, load_params
from flows import subflows
from flows.run_tags import extra_tags
from flows.tracking import stage_run

TABLE = "sweep.csv"


def backbone_overrides(base: Params, overrides: dict[str, Any], backbones: list[str]) -> dict[str, dict[str, Any]]:
    """The overrides of each backbone's runs: its own weights, train and evaluate folders under
    ``<paths.sweep>/<backbone>/``; processed data and the feature cache shared by all."""
    root = base.paths.sweep
    shared = {**overrides, "paths.processed": str(root / "processed"), "paths.features": str(root / "features")}
    return {b: {**shared, "train.backbone": b, "paths.backbone": str(root / b / "weights"),
                "paths.train": str(root / b / "train"), "paths.evaluate": str(root / b / "evaluate")}
            for b in backbones}


@task(name="backbone", task_run_name="backbone@{backbone}")
def sweep_backbone(params_file: str, backbone: str, overrides: dict[str, Any], modes: list[str],
                   prepare_data: bool, sweep_id: str) -> dict[str, Any]:
    """Download one backbone's weights, train each mode, evaluate; returns test accuracy per mode."""
    from flows.download import download_flow
    from flows.evaluate import evaluate_flow
    from flows.preprocess import preprocess_flow
    from flows.train import train_flow

    t0 = time.perf_counter()
    with extra_tags({"sweep": sweep_id, "backbone": backbone}), subflows():
        download_flow(params_file=params_file, overrides=overrides)
        if prepare_data:
            preprocess_flow(params_file=params_file, overrides=overrides)
        for mode in modes:
            train_flow(params_file=params_file, overrides=overrides, mode=mode)
        metrics = evaluate_flow(params_file=params_file, overrides=overrides)
    return {"backbone": backbone, "seconds": round(time.perf_counter() - t0, 1),
            "test_acc": {m: float(metrics[m]["test_acc"]) for m in modes if m in metrics}}


def table_csv(results: list[dict[str, Any]], modes: list[str]) -> str:
    """The comparison as CSV: one row per backbone, test accuracy per mode and wall time."""
    lines = [",".join(["backbone", *(f"test_acc_{m}" for m in modes), "seconds"])]
    for r in results:
        accs = [f"{r['test_acc'][m]:.4f}" if m in r["test_acc"] else "" for m in modes]
        lines.append(",".join([r["backbone"], *accs, str(r["seconds"])]))
    return "\n".join(lines) + "\n"


@flow(name="sweep", flow_run_name="sweep", log_prints=True)
def sweep_flow(backbones: list[str], params_file: str = "params.yaml",
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate every backbone of ``backbones`` with the same parameters, one after another
    (they would only fight over the same cores side by side).

    Returns:
        ``{"sweep_id", "root", "results": [{"backbone", "seconds", "test_acc": {mode: acc}}],
        "run_id"}`` (the ``sweep`` MLflow run).
    """
    if not backbones:
        raise ValueError("sweep: give at least one backbone")
    overrides = dict(overrides or {})
    base = load_params(params_file, overrides)
    per_backbone = backbone_overrides(base, overrides, backbones)
    for ov in per_backbone.values():
        load_params(params_file, ov)  # every backbone's parameters are valid before anything runs
    modes = list(base.train.modes)
    sweep_id = uuid.uuid4().hex[:12]
    results = []
    for i, (b, ov) in enumerate(per_backbone.items()):
        print(f"sweep {sweep_id}: {b} ({i + 1}/{len(backbones)})")
        results.append(sweep_backbone(params_file, b, ov, modes, prepare_data=i == 0, sweep_id=sweep_id))
    root = base.paths.sweep
    table = root / TABLE
    atomic_write_text(table, table_csv(results, modes))
    with stage_run(base, "sweep", run_name=f"sweep-{sweep_id}", tags={"sweep": sweep_id}) as run:
        run.log_params({"backbones": ",".join(backbones), "modes": ",".join(modes)})
        run.log_metrics({f"test_acc_{r['backbone']}_{m}": a for r in results for m, a in r["test_acc"].items()})
        run.log_artifact(table)
        run_id = run.run_id
    return {"sweep_id": sweep_id, "root": str(Path(root)), "results": results, "run_id": run_id}
