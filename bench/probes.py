"""Measurements that need a process of their own (run as ``python -m bench.probes <name> ...``).

``memory``: peak RSS (``VmHWM``) of our fine_tune training path on a generated
CIFAR-10-sized uint8 set. ``flow``: Prefect's overhead around a trivial stage.
Each prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB: ``VmHWM`` of /proc/self/status.

    ``ru_maxrss`` is not used as the peak: Linux carries it over ``fork`` + ``exec``, so a probe
    started by a 2 GB parent would report the parent's peak. It is reported alongside.
    """
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(n: int, steps: int, batch_size: int, image_size: int, weights: str | None) -> dict:
    import numpy as np
    import torch

    from tasks.backbones import build_model, freeze, get_backbone, set_bn_momentum
    from tasks.engine import epoch_generator, train_one_epoch
    from tasks.runtime import Runtime
    from tasks.transforms import image_transforms
    from cvpipe.params import load_params

    base = rss_mb()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 10, n).astype(np.int64))
    after_data = rss_mb()
    tp = load_params("params.yaml").train.model_copy(
        update={"backbone": "efficientnet_lite0", "image_size": image_size, "batch_size": batch_size})
    rt = Runtime(torch.device("cpu"), None, True)
    torch.manual_seed(0)
    model = build_model(tp.backbone, 10, weights)
    freeze(model, get_backbone(tp.backbone), 0)
    set_bn_momentum(model, 0.1)
    model.to(memory_format=torch.channels_last)
    after_model = rss_mb()
    train_tf, _ = image_transforms(tp, rt)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=tp.lr)
    g = epoch_generator(0, 1)
    # train_one_epoch visits every row it is given: hand it the first `steps` batches of the full set.
    stats = train_one_epoch(model, opt, x[:steps * batch_size], y[:steps * batch_size], batch_size=batch_size,
                            transform=train_tf, generator=g, rt=rt, desc="memory")
    return {"images": n, "dataset_mb": x.numel() / 2**20, "steps": steps, "batch_size": batch_size,
            "image_size": image_size, "rss_start_mb": base, "rss_after_data_mb": after_data,
            "rss_after_model_mb": after_model, "peak_rss_mb": rss_mb(),
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_seconds": stats["seconds"], "loss": stats["loss"]}


def flow(repeats: int) -> dict:
    # A fresh Prefect home (the first run pays its database migrations), otherwise the CLI's settings.
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cvpipe-bench-prefect-"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from cvpipe.prefect_home import prepare_env
    from cvpipe.prefect_server import connect, status, stop, user_api_url

    prepare_env()
    started = user_api_url() is None and status()[1] is not None
    t = time.perf_counter()
    connect()  # the home's persistent server, started here when none runs, as the CLI does
    server_start_s = time.perf_counter() - t
    try:
        return {**_flow_runs(repeats), "server_start_s": server_start_s}
    finally:
        if started:
            stop()  # the fresh home's server: nothing else will use it


def _flow_runs(repeats: int) -> dict:
    import numpy as np
    from prefect import flow as prefect_flow, task
    from prefect.cache_policies import NO_CACHE

    body_seconds: list[float] = []

    def body() -> float:
        t = time.perf_counter()
        out = float(np.linalg.norm(np.random.default_rng(0).random((400, 400)) @ np.ones((400, 400))))
        body_seconds.append(time.perf_counter() - t)
        return out

    stage = task(body, name="bench-stage", cache_policy=NO_CACHE)

    @prefect_flow(name="bench-flow")
    def run() -> float:
        return stage()

    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t)
    return {"flow_runs": repeats, "first_wall_s": walls[0], "first_body_s": body_seconds[0],
            "warm_wall_s": float(np.median(walls[1:])) if repeats > 1 else walls[0],
            "warm_body_s": float(np.median(body_seconds[1:])) if repeats > 1 else body_seconds[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="probe", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--n", type=int, default=50_000)
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--batch-size", type=int, default=50)
    m.add_argument("--image-size", type=int, default=32)
    m.add_argument("--weights", default=None)
    f = sub.add_parser("flow")
    f.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    if args.probe == "memory":
        out = memory(args.n, args.steps, args.batch_size, args.image_size, args.weights)
    else:
        out = flow(args.repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
