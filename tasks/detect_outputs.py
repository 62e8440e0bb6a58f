"""The files of the ``detect`` stage: each image's record (JSON lines), the detections in the COCO
results format and as CSV, the failures, the summary and its headline figures (``metrics.json``),
all written into the staging folder that :mod:`tasks.detect_staging` swaps in as one set."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from cvpipe.io import atomic_write_text, write_json
from cvpipe.layout import COCO_RESULTS, DETECT_METRICS, DETECT_SUMMARY, DETECTIONS, DETECTIONS_CSV, FAILURES
from tasks.boxes import Detections

OUTPUT_FILES = (DETECTIONS, COCO_RESULTS, DETECTIONS_CSV, FAILURES, DETECT_METRICS, DETECT_SUMMARY)
#: The figures of ``metrics.json`` (a DVC metrics file: `dvc metrics show` has one column per key);
#: detections per class and seconds per phase are in ``summary.json``.
HEADLINE = ("inputs", "images", "failures", "detections", "images_per_s", "forward_images_per_s",
            "map50", "map50_95", "annotated_images")

#: COCO category id of each of the 80 Darknet ``coco.names`` classes, in file order
#: (the ids the official COCO annotation files use; 91 ids with gaps).
COCO80_TO_91 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)


def detection_dicts(dets: Detections, classes: list[str]) -> list[dict]:
    """JSON-able detections: class id and name, score, box {x, y, w, h} in pixels."""
    return [{"class_id": int(c), "class_name": classes[c], "score": round(float(s), 5),
             "box": dict(zip("xywh", (round(float(v), 2) for v in b)))}
            for b, s, c in zip(dets.boxes, dets.scores, dets.class_ids)]


def coco_results(records: list[dict]) -> list[dict]:
    """Detections in the COCO results format: ``image_id`` is the record's, ``category_id``
    the official COCO id of the Darknet class (:data:`COCO80_TO_91`)."""
    return [{"image_id": r["image_id"], "category_id": COCO80_TO_91[d["class_id"]],
             "bbox": [d["box"][k] for k in "xywh"], "score": d["score"]}
            for r in records for d in r["detections"]]


def detections_csv(records: list[dict]) -> str:
    """One CSV row per detection (images without detections have no row)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "path", "width", "height", "class_id", "class_name", "score", "x", "y", "w", "h"])
    for r in records:
        for d in r["detections"]:
            writer.writerow([r["image_id"], r["path"], r["width"], r["height"], d["class_id"], d["class_name"],
                             d["score"], *(d["box"][k] for k in "xywh")])
    return buf.getvalue()


def write_outputs(out_dir: Path, records: list[dict], failures: list[dict], results: list[dict],
                  summary: dict) -> None:
    """Write every output file of the stage into ``out_dir`` (the staging folder), each atomically."""
    atomic_write_text(out_dir / DETECTIONS, "".join(json.dumps(r) + "\n" for r in records))
    write_json(out_dir / COCO_RESULTS, results)
    atomic_write_text(out_dir / DETECTIONS_CSV, detections_csv(records))
    write_json(out_dir / FAILURES, failures)
    write_json(out_dir / DETECT_SUMMARY, summary)
    write_json(out_dir / DETECT_METRICS, headline_metrics(summary))


def headline_metrics(summary: dict) -> dict:
    """The figures of ``summary`` that ``metrics.json`` keeps (:data:`HEADLINE`), in that order."""
    return {k: summary[k] for k in HEADLINE if k in summary}
