"""The figures of the ``detect`` stage: counts, detections per class, throughput and seconds per
phase from the shards' results, and mAP against a COCO annotation file (pycocotools)."""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path

from tasks.detect_shard import ShardResult


def summarize(results: list[ShardResult], records: list[dict], failures: list[dict]) -> dict:
    """The stage's metrics: counts, detections per class and throughput.

    ``images_per_s`` is end to end (inputs / wall time from the first shard's start, model
    loading included, to the last shard's end); ``forward_images_per_s`` is the images
    read / seconds spent in ``net.forward`` summed over shards.
    """
    per_class = Counter(d["class_name"] for r in records for d in r["detections"])
    wall = max(s.end for s in results) - min(s.start for s in results)
    seconds = {k: round(sum(s.seconds[k] for s in results), 4) for k in results[0].seconds}
    inputs = len(records) + len(failures)
    return {
        "inputs": inputs,
        "images": len(records),
        "failures": len(failures),
        "detections": sum(per_class.values()),
        "per_class": dict(sorted(per_class.items())),
        "images_per_s": round(inputs / wall, 3) if wall > 0 else 0.0,
        "forward_images_per_s": round(len(records) / seconds["forward"], 3) if seconds["forward"] > 0 else 0.0,
        "seconds": {"wall": round(wall, 4), **seconds},
    }


def coco_map(results: list[dict], records: list[dict], annotations: Path) -> dict:
    """mAP@0.5 and mAP@[.5:.95] with pycocotools' COCOeval against a COCO annotation file.

    Images are matched by file name (an annotation image's ``file_name`` against the
    name of the record's ``path``); only matched images are evaluated. Category ids
    must be the official COCO ones (as :func:`coco_results` writes). pycocotools
    reports -1 when there is no ground-truth box at all.

    Returns:
        {"map50", "map50_95", "annotated_images"}.

    Raises:
        ValueError: no processed image appears in the annotation file.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
    by_name = {Path(im["file_name"]).name: im["id"] for im in gt.dataset.get("images", [])}
    gt_id = {r["image_id"]: by_name[Path(r["path"]).name] for r in records if Path(r["path"]).name in by_name}
    if not gt_id:
        raise ValueError(f"detect.annotations {annotations}: none of the {len(records)} processed images "
                         "is listed in it (matched by file name)")
    dts = [{**d, "image_id": gt_id[d["image_id"]]} for d in results if d["image_id"] in gt_id]
    out = {"map50": 0.0, "map50_95": 0.0, "annotated_images": len(gt_id)}
    if dts:
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(dts), "bbox")
            ev.params.imgIds = sorted(set(gt_id.values()))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out.update(map50=float(ev.stats[1]), map50_95=float(ev.stats[0]))
    return out
