"""The output layout: the folders (``paths.*`` keys of params.yaml) and the file names each stage
reads and writes, in one place.

Code names files through this module; dvc.yaml names the same files by path template, and
``tests/test_layout.py`` checks that every stage's ``outs``, ``metrics`` and ``plots`` in dvc.yaml are
exactly :func:`stage_outputs` (and the slow tracing test checks what the stage really opens).
Folders are never written here: they come from ``params.yaml`` (``paths``), so a user can move them.
"""

from __future__ import annotations

from typing import Literal, get_args

STAGES = ("download", "preprocess", "train", "evaluate", "detect")

# --- download ------------------------------------------------------------------------------
#: ``paths.raw``: the datasets.
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
DIGITS_FILE = "digits.npz"
#: ``paths.backbone`` and ``paths.detector``: what was fetched, from where, with which checksum.
MANIFEST = "manifest.json"
#: ``paths.detector``: the Darknet network, in the order (cfg, weights, names).
DETECTOR_CFG, DETECTOR_WEIGHTS, DETECTOR_CLASSES = "model.cfg", "model.weights", "classes.txt"
DETECTOR_FILES = (DETECTOR_CFG, DETECTOR_WEIGHTS, DETECTOR_CLASSES)
#: ``paths.samples``: the sample photos download wrote (it removes or replaces only these).
SAMPLES_MANIFEST = "samples_manifest.json"

# --- preprocess (``paths.processed``) ------------------------------------------------------
CARD = "card.json"
SPLITS = ("train", "val", "test")


def split_file(split: str) -> str:
    """The uint8 arrays of one split: ``<split>.npz`` (``x`` N×C×H×W, ``y`` N)."""
    return f"{split}.npz"


# --- train (``paths.train``/<mode>/) -------------------------------------------------------
#: The two training modes: the one type used by params, the CLI and the code.
Mode = Literal["feature_extractor", "fine_tune"]
MODES: tuple[str, ...] = get_args(Mode)
MODEL, CHECKPOINT, HISTORY, TRAIN_METRICS, RUN = "model.pt", "checkpoint.pt", "history.json", "metrics.json", "run.json"
#: ``paths.cache``: the timed choice of ``train.amp: auto`` for this machine.
AMP_CHOICE = "amp_choice.json"

# --- evaluate (``paths.evaluate``) ---------------------------------------------------------
EVAL_METRICS, PER_CLASS, ACCURACY_PLOT = "metrics.json", "per_class.json", "accuracy.png"
#: ``{mode: {"classes", "matrix", "predictions"}}`` for every evaluated mode.
CONFUSION_COUNTS = "confusion.json"
#: One figure per evaluated mode, ``confusion/<mode>.png``: a folder, so dvc.yaml need not name the modes.
CONFUSION_DIR = "confusion"


def confusion_plot(mode: str) -> str:
    """The confusion-matrix figure of one mode, relative to ``paths.evaluate``."""
    return f"{CONFUSION_DIR}/{mode}.png"


# --- detect (``paths.detect``) -------------------------------------------------------------
DETECTIONS, COCO_RESULTS, DETECTIONS_CSV = "detections.jsonl", "coco_results.json", "detections.csv"
FAILURES, DETECT_METRICS, DETECT_SUMMARY = "failures.json", "metrics.json", "summary.json"
ANNOTATED_DIR = "images"

# --- the exported classifier (MLflow model data, no pickle) --------------------------------
CLASSIFIER_CARD, CLASSIFIER_WEIGHTS = "classifier.json", "weights.npz"


def stage_outputs(stage: str) -> dict[str, list[str]]:
    """What dvc.yaml declares for ``stage``, as path templates (``${paths.x}/name``).

    Returns:
        ``{"outs": [...], "metrics": [...], "plots": [...]}``; for ``train`` the templates hold
        ``${item}`` (the stage is a ``foreach`` over the modes).
    """
    t = "${paths.train}/${item}"
    e, d = "${paths.evaluate}", "${paths.detect}"
    table = {
        "download": {"outs": ["${paths.raw}", "${paths.backbone}", "${paths.detector}", "${paths.samples}"]},
        "preprocess": {"outs": ["${paths.processed}"]},
        "train": {"outs": [f"{t}/{MODEL}", f"{t}/{CHECKPOINT}", f"{t}/{RUN}", f"{t}/{TRAIN_METRICS}"],
                  "plots": [f"{t}/{HISTORY}"]},
        "evaluate": {"outs": [f"{e}/{PER_CLASS}", f"{e}/{CONFUSION_COUNTS}"], "metrics": [f"{e}/{EVAL_METRICS}"],
                     "plots": [f"{e}/{ACCURACY_PLOT}", f"{e}/{CONFUSION_DIR}"]},
        "detect": {"outs": [f"{d}/{DETECTIONS}", f"{d}/{COCO_RESULTS}", f"{d}/{DETECTIONS_CSV}", f"{d}/{FAILURES}",
                            f"{d}/{ANNOTATED_DIR}", f"{d}/{DETECT_SUMMARY}"],
                   "metrics": [f"{d}/{DETECT_METRICS}"]},
    }
    spec = table[stage]
    return {k: list(spec.get(k, [])) for k in ("outs", "metrics", "plots")}
