"""`cvpipe compare`: the training runs recorded in MLflow, side by side, as a table and a plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from cvpipe.params import Params

COLUMNS = ["run", "mode", "backbone", "weights", "image_size", "epochs", "lr", "freeze_stages",
           "val_acc", "test_acc", "images_per_s", "n_params", "model_size_mb", "latency_ms", "minutes",
           "data_hash", "dvc_exp"]


def run_row(run) -> dict[str, Any]:
    """One comparable row from an MLflow run of the train stage."""
    prm, met, tags = run.data.params, run.data.metrics, run.data.tags
    start, end = run.info.start_time, run.info.end_time
    epochs = prm.get("train.epochs")
    if tags.get("mode") == "fine_tune" and prm.get("train.fine_tune_epochs") not in (None, "None"):
        epochs = prm.get("train.fine_tune_epochs")
    return {
        "run": run.info.run_name,
        "mode": tags.get("mode"),
        "backbone": prm.get("train.backbone"),
        "weights": tags.get("weights_label", prm.get("train.weights")),
        "image_size": prm.get("train.image_size"),
        "epochs": epochs,
        "lr": prm.get("train.lr"),
        "freeze_stages": prm.get("train.freeze_stages") if tags.get("mode") == "fine_tune" else "-",
        "val_acc": met.get("best_val_acc", met.get("val_acc")),
        "test_acc": met.get("test_acc"),
        "images_per_s": met.get("images_per_s"),
        "n_params": int(met["n_params"]) if "n_params" in met else None,
        "model_size_mb": met.get("model_size_mb"),
        "latency_ms": met.get("latency_ms"),
        "minutes": round((end - start) / 60000, 2) if start and end else None,
        "data_hash": (tags.get("data_hash") or "")[:12],
        "dvc_exp": tags.get("dvc.exp_name", ""),
    }


def collect_runs(p: Params, max_runs: int = 50) -> list[dict[str, Any]]:
    """Finished train-stage runs of the project's experiment, newest first."""
    from flows.tracking import configure

    client, exp_id = configure(p)
    runs = client.search_runs([exp_id], filter_string="tags.stage = 'train' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=max_runs)
    return [run_row(r) for r in runs]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if v < 10 else f"{v:.1f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the rows (one line per run)."""
    from tabulate import tabulate

    return tabulate([[_fmt(r[c]) for c in COLUMNS] for r in rows], headers=COLUMNS, tablefmt="github")


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of validation and test accuracy per run, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cvpipe.io import atomic_path

    labels = [f"{r['run']}\n{r['backbone']} · {r['mode']}" for r in rows]
    val = [r["val_acc"] or 0 for r in rows]
    test = [r["test_acc"] or 0 for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5))
    ax.bar(x - 0.2, val, 0.4, label="best val accuracy")
    ax.bar(x + 0.2, test, 0.4, label="test accuracy")
    ax.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("Training runs (MLflow)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
