"""The ``evaluate`` stage: test accuracy, per-class accuracy and confusion matrix of each trained mode.

Writes to ``paths.evaluate``: ``metrics.json`` (a DVC metrics file, one section per
mode, headline numbers only: they are columns of ``dvc exp show`` and ``dvc metrics show``),
``per_class.json`` (per-class accuracy of each mode, a plain output), ``confusion.json`` (for each
mode: the class names, the matrix and per-image rows), ``confusion/<mode>.png``, and
``accuracy.png`` (train and validation accuracy per epoch of every mode in one figure). The
figures of modes no longer evaluated are removed with the rest of ``confusion/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvpipe.io import atomic_path, read_json, write_json
from cvpipe.layout import (
    ACCURACY_PLOT,
    CONFUSION_COUNTS,
    CONFUSION_DIR,
    EVAL_METRICS,
    HISTORY,
    MODEL,
    PER_CLASS,
    RUN,
    confusion_plot,
)
from cvpipe.params import Params
from tasks.checkpoints import load_classifier
from tasks.engine import evaluate as evaluate_model
from tasks.runtime import Runtime, make_runtime
from tasks.splits import load_split
from tasks.transforms import prepare_batch


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): row = true class, column = predicted class."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class (diagonal / row sums); NaN for a class absent from the test set."""
    rows = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, np.diag(cm) / rows, np.nan)


def score_model(model_file: Path, x: np.ndarray, y: np.ndarray, batch_size: int, rt: Runtime) -> dict[str, Any]:
    """Run a saved model on the test split.

    Returns:
        {"classes", "test_acc", "test_loss", "per_class_acc" ({class: acc}), "confusion" (array), "pred"}.
    """
    clf = load_classifier(model_file)
    net = clf.net.to(rt.device, memory_format=rt.memory_format)

    def tf(xb, g):
        return prepare_batch(xb, clf.image_size, clf.mean.flatten().tolist(), clf.std.flatten().tolist(),
                             rt.channels_last, clf.interpolation)

    classes = clf.classes
    res = evaluate_model(net, torch.from_numpy(x), torch.from_numpy(y), batch_size=batch_size, transform=tf, rt=rt,
                   desc=f"test {model_file.parent.name}")
    cm = confusion_matrix(y, res["pred"], len(classes))
    pca = per_class_accuracy(cm)
    return {"classes": classes, "test_acc": res["acc"], "test_loss": res["loss"],
            "per_class_acc": {c: None if np.isnan(a) else float(a) for c, a in zip(classes, pca)},
            "confusion": cm, "pred": res["pred"]}


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_confusion(cm: np.ndarray, classes: list[str], title: str):
    """A matplotlib figure of the confusion matrix (counts written in the cells when there are few classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 2)))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set(xticks=range(n), yticks=range(n), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    if n <= 30:
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > thresh else "black")
    return fig


def plot_accuracy(histories: dict[str, list[dict]]):
    """Train and validation accuracy per epoch of every mode, in one figure (the seed's ``plot_accuracy``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (mode, rows) in enumerate(histories.items()):
        epochs = [r["epoch"] for r in rows]
        color = f"C{i}"
        ax.plot(epochs, [r["train_acc"] for r in rows], "--", marker="o", color=color, label=f"{mode} train")
        ax.plot(epochs, [r["val_acc"] for r in rows], "-", marker="s", color=color, label=f"{mode} val")
    ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def trained_modes(p: Params) -> list[str]:
    """The modes of ``train.modes`` that have a trained model."""
    return [m for m in p.train.modes if (p.paths.train / m / MODEL).is_file()]


def model_run_id(p: Params, mode: str) -> str | None:
    """The MLflow run id recorded by ``train`` for ``mode``, or None."""
    path = p.paths.train / mode / RUN
    return read_json(path)["run_id"] if path.is_file() else None


def evaluate(p: Params) -> dict[str, dict[str, Any]]:
    """Evaluate every trained mode on the test split and write the stage's outputs.

    Returns:
        {mode: {"test_acc", "test_loss", "n_test", "per_class_acc"}}: ``metrics.json`` holds all but
        ``per_class_acc``, which ``per_class.json`` holds ({mode: {class: acc}}).

    Raises:
        FileNotFoundError: no mode of ``train.modes`` has a trained model.
    """
    modes = trained_modes(p)
    if not modes:
        raise FileNotFoundError(f"no trained model in {p.paths.train} for train.modes={p.train.modes}: "
                                "run `cvpipe train` first")
    rt = make_runtime(p)
    x, y = load_split(p.paths.processed, "test")
    out = p.paths.evaluate
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / CONFUSION_DIR, ignore_errors=True)  # this stage's own output: no stale mode survives
    (out / CONFUSION_DIR).mkdir()
    metrics: dict[str, dict[str, Any]] = {}
    confusion: dict[str, dict[str, Any]] = {}
    for mode in modes:
        res = score_model(p.paths.train / mode / MODEL, x, y, p.evaluate.batch_size, rt)
        classes, cm = res["classes"], res["confusion"]
        metrics[mode] = {"test_acc": res["test_acc"], "test_loss": res["test_loss"], "n_test": int(len(y)),
                         "per_class_acc": res["per_class_acc"]}
        confusion[mode] = {
            "classes": classes, "matrix": cm.tolist(),
            "predictions": [{"actual": classes[t], "predicted": classes[q]} for t, q in zip(y, res["pred"])]}
        _save_figure(plot_confusion(cm, classes, f"{mode}: test accuracy {res['test_acc']:.4f}"),
                     out / confusion_plot(mode))
        print(f"evaluate {mode}: test accuracy {res['test_acc']:.4f} on {len(y)} images")
    histories = {m: read_json(p.paths.train / m / HISTORY) for m in modes}
    _save_figure(plot_accuracy(histories), out / ACCURACY_PLOT)
    write_json(out / EVAL_METRICS,
               {m: {k: v for k, v in r.items() if k != "per_class_acc"} for m, r in metrics.items()})
    write_json(out / PER_CLASS, {m: r["per_class_acc"] for m, r in metrics.items()})
    write_json(out / CONFUSION_COUNTS, confusion)
    return metrics
