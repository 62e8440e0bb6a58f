"""Measure the ``detect`` stage on this machine: raw ``net.forward`` images/s, end-to-end images/s
of one shard (reading, blob, forward, decode, NMS, drawing, writing), and the detections found
on the scikit-image sample photos.

    python bench/detect_speed.py [--model yolov3-tiny] [--repeat 8] [--work /tmp/cvpipe-bench]

Uses params.yaml's ``detect`` section (input size, batch size, thresholds); the detector files
and sample photos are fetched / exported into ``--work`` with the download stage's code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from cvpipe.params import load_params
from tasks.detect import detect_shard, forward, load_detector, make_blob, merge_shards, plan_inputs, summarize
from tasks.download import download_detector, export_samples
from tasks.preprocess import read_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="yolov3-tiny", choices=["yolov3", "yolov3-tiny"])
    ap.add_argument("--repeat", type=int, default=8, help="copies of the sample set in the end-to-end run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cvpipe-bench"))
    args = ap.parse_args()

    p = load_params("params.yaml")
    dp = p.detect.model_copy(update={"model": args.model})
    det_dir, samples_dir = args.work / args.model, args.work / "samples"
    download_detector(args.model, det_dir, p.download, cache_dir=args.work / "cache")
    samples = export_samples(p.download.samples, samples_dir)
    print(f"cv2 {cv2.__version__}, {cv2.getNumThreads()} OpenCV threads, {args.model} at {dp.input_size} px, "
          f"batch {dp.batch_size}, conf {dp.conf_threshold}, nms {dp.nms_threshold}")

    # raw forward: the same batch of sample photos, after one warm-up pass
    det = load_detector(det_dir, dp.conf_threshold)
    images = [read_image(s) for s in samples]
    for batch in (1, dp.batch_size):
        blob = make_blob([images[i % len(images)] for i in range(batch)], dp.input_size)
        forward(det, blob)
        reps, t = max(3, 24 // batch), time.perf_counter()
        for _ in range(reps):
            forward(det, blob)
        print(f"raw forward, batch {batch}: {reps * batch / (time.perf_counter() - t):.2f} images/s")

    # end to end: one shard over `repeat` copies of the samples (model load included)
    items = plan_inputs([s for _ in range(args.repeat) for s in samples])
    out = args.work / "images"
    out.mkdir(parents=True, exist_ok=True)
    result = detect_shard(items, det_dir, dp, out)
    records, failures = merge_shards([result])
    summary = summarize([result], records, failures)
    print(f"end to end, {len(items)} images in one shard: {summary['images_per_s']:.2f} images/s "
          f"(forward inside it: {summary['forward_images_per_s']:.2f} images/s); seconds {summary['seconds']}")

    for threshold in sorted({dp.conf_threshold, 0.25}, reverse=True):
        d = dp.model_copy(update={"conf_threshold": threshold})
        recs = detect_shard(plan_inputs(samples), det_dir, d).records
        found = {Path(r["path"]).name: [(x["class_name"], x["score"], [round(v) for v in x["box"].values()])
                                        for x in r["detections"]] for r in recs}
        print(f"detections on the sample photos at conf {threshold}: {json.dumps(found)}")
    print(f"annotated copies in {out}; mean image size "
          f"{np.mean([im.shape[1] for im in images]):.0f} x {np.mean([im.shape[0] for im in images]):.0f}")


if __name__ == "__main__":
    main()
