"""The ``detect`` stage: YOLOv3 (Darknet files) over a batch of images, through OpenCV's DNN module
or PyTorch (:mod:`tasks.detect_torch`, for GPUs). The entry point that the flow and ``dvc repro``
run: :func:`plan`, then :func:`tasks.detect_shard.detect_shard` on each shard, then :func:`collect`.

The work is split by job:

- :mod:`tasks.detect_inputs`: the inputs ``detect.input`` names, numbered, sharded;
- :mod:`tasks.predictor`: the predictor (``preprocess -> inference -> postprocess``) and its OpenCV
  backend, the backend and device chosen, one network per process;
- :mod:`tasks.boxes`: letterbox / stretch geometry, decoding to original pixels, class-aware NMS;
- :mod:`tasks.detect_shard`: one shard, with reader and writer threads, each phase timed;
- :mod:`tasks.annotate`: annotated images;
- :mod:`tasks.detect_outputs` and :mod:`tasks.detect_metrics`: the files and the figures;
- :mod:`tasks.detect_staging`: the output folder replaced as one set.

Shards of the input list are independent, so the flow maps them over any Prefect task runner;
shards on threads of one process share one network and take turns at it. The outputs are
written once, from the merged shard results.

Outputs (under ``paths.detect``; names in :mod:`cvpipe.layout`): ``detections.jsonl``,
``coco_results.json``, ``detections.csv``, ``failures.json``, ``metrics.json`` (headline figures),
``summary.json`` and, when ``detect.save_images``, annotated JPEGs in ``images/``. They are
written into a staging folder and swapped in as one set (:mod:`tasks.detect_staging`).
"""

from __future__ import annotations

from pathlib import Path

from cvpipe.layout import ANNOTATED_DIR
from cvpipe.params import Params
from tasks.detect_inputs import InputImage, list_inputs, plan_inputs, split_shards
from tasks.detect_metrics import coco_map, summarize
from tasks.detect_outputs import coco_results, write_outputs
from tasks.detect_shard import ShardResult
from tasks.detect_staging import check_inputs_outside, check_output_folder, recover_outputs
from tasks.predictor import check_detector, resolve_backend


def merge_shards(results: list[ShardResult]) -> tuple[list[dict], list[dict]]:
    """All records and all failures, each ordered by ``image_id``."""
    records = sorted((r for s in results for r in s.records), key=lambda r: r["image_id"])
    failures = sorted((f for s in results for f in s.failures), key=lambda f: f["image_id"])
    return records, failures


def plan(p: Params, staging: Path) -> tuple[list[list[InputImage]], Path | None]:
    """Check the detector, list and shard the inputs, check ``paths.detect``, create ``staging``.

    Nothing is written or removed before every check has passed, except the leftovers of a
    killed run (:func:`tasks.detect_staging.recover_outputs`).

    Args:
        p: the parameters.
        staging: the staging folder to create (from :func:`tasks.detect_staging.staged_outputs`).

    Returns:
        (shards, images_dir): ``images_dir`` is ``staging/images``, None when ``detect.save_images``
        is false.

    Raises:
        OutputConflict: inputs inside ``paths.detect``, or entries there this stage did not write.
        ParamsError: ``detect.backend`` cannot run on ``device`` here.
    """
    check_detector(p.paths.detector, p.detect.model)
    resolve_backend(p.detect.backend, p.device)
    items = plan_inputs(list_inputs(p.detect.input))
    check_inputs_outside(items, p.paths.detect)
    recover_outputs(p.paths.detect, keep=staging)
    check_output_folder(p.paths.detect)
    staging.mkdir(parents=True)
    images_dir = staging / ANNOTATED_DIR if p.detect.save_images else None
    if images_dir is not None:
        images_dir.mkdir()
    return split_shards(items, p.detect.shards), images_dir


def collect(p: Params, shard_results: list[ShardResult], staging: Path) -> dict:
    """Merge the shards, evaluate against ``detect.annotations`` when given, write the outputs
    into ``staging`` (:func:`tasks.detect_staging.staged_outputs` publishes them).

    Returns:
        The summary written to ``summary.json`` (its headline figures go to ``metrics.json``).
    """
    records, failures = merge_shards(shard_results)
    results = coco_results(records)
    summary = summarize(shard_results, records, failures)
    if p.detect.annotations is not None:
        summary.update(coco_map(results, records, p.detect.annotations))
    write_outputs(staging, records, failures, results, summary)
    return summary
