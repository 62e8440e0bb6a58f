"""Bench part ``serve``: `cvpipe serve-model` start-up time and requests/s.

A digits-shaped classifier (EfficientNet-Lite0 with its ImageNet weights and a new 10-class head;
untrained: throughput does not depend on the head's values) is logged in the project's flavour and
registered as champion in a store under ``work``; the real ``cvpipe serve-model`` process is then
timed from its start to its first answer on /ping, and requests are sent one after the other:
single images (a base64 PNG each), batches of 32 base64 PNGs and batches of 32 uint8 arrays.

    python -m bench.serve [--profile cpu|gpu|tiny] [--work /tmp/cvpipe-bench]
    python -m bench --parts serve       (the same, inside the whole bench's report)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
CVPIPE = str(Path(sys.executable).parent / "cvpipe")
BATCH = 32
QUICKSTART_SIZE = 112  # the offline quickstart's train.image_size


def requests_for(n_test: int) -> tuple[int, int]:
    """(single-image requests, batch requests) for a profile's ``n_test`` (cpu: 200 and 20; tiny: 10 and 2)."""
    return max(5, n_test // 2), max(2, n_test // 20)


def register_model(work: Path, weights: Path, image_size: int, example: np.ndarray) -> Path:
    """Register an untrained digits-shaped classifier as champion in a store under ``work``.

    Returns:
        The params file ``cvpipe serve-model --params`` reads (the project's, with that store).
    """
    import mlflow
    import mlflow.pyfunc

    from cvpipe import model_flavor
    from cvpipe.params import load_params
    from flows.tracking import configure
    from tasks.backbones import ImageClassifier, build_model
    from tasks.export import Classifier, make_card, save_classifier_data

    work.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["mlflow"].update(tracking_uri=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
                         artifact_location=str(work / "mlruns" / "artifacts"))
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    p = load_params(params)
    classes = [str(i) for i in range(10)]
    card = make_card(backbone="efficientnet_lite0", mode="feature_extractor", classes=classes,
                     channels=1, input_size=example.shape[2:], image_size=image_size,
                     mean=list(p.train.mean), std=list(p.train.std), interpolation=p.train.interpolation)
    net = build_model("efficientnet_lite0", len(classes), weights)
    clf = Classifier(card, ImageClassifier(net, image_size, card["mean"], card["std"], classes,
                                           card["interpolation"]))
    client, _ = configure(p)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run():
        data = save_classifier_data(clf, Path(tmp) / model_flavor.DATA_DIR)
        info = mlflow.pyfunc.log_model(name="model", loader_module=model_flavor.LOADER_MODULE, data_path=str(data),
                                       signature=model_flavor.signature(), input_example=example)
    mv = mlflow.register_model(info.model_uri, p.mlflow.registered_model)
    client.set_registered_model_alias(p.mlflow.registered_model, "champion", mv.version)
    return params


def _post(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def measure(params: Path, images: np.ndarray, singles: int, batches: int) -> dict[str, Any]:
    """Start `cvpipe serve-model`, time its start-up and the requests, stop it.

    Args:
        params: params file naming the store with the champion.
        images: uint8 (N, 1, H, W) images (N >= 1) sent round-robin.
        singles, batches: how many requests of each kind.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    pngs = [base64.b64encode(cv2.imencode(".png", im[0])[1].tobytes()).decode() for im in images]
    batch_png = json.dumps({"inputs": {"image": [pngs[i % len(pngs)] for i in range(BATCH)]}}).encode()
    batch_arr = json.dumps({"inputs": images[np.arange(BATCH) % len(images)].tolist()}).encode()
    log = open(params.parent / "serve-model.log", "w")
    t0 = time.perf_counter()
    server = subprocess.Popen([CVPIPE, "serve-model", "--port", str(port), "--params", str(params)],
                              cwd=params.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"serve-model exited: {(params.parent / 'serve-model.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/ping", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        startup = time.perf_counter() - t0
        _post(url + "/invocations", json.dumps({"inputs": {"image": [pngs[0]]}}).encode())  # warm-up
        t = time.perf_counter()
        for i in range(singles):
            out = _post(url + "/invocations", json.dumps({"inputs": {"image": [pngs[i % len(pngs)]]}}).encode())
        single_s = time.perf_counter() - t
        assert len(out["predictions"]["label"]) == 1
        rates = {}
        for name, body in (("batch32_png", batch_png), ("batch32_array", batch_arr)):
            t = time.perf_counter()
            for _ in range(batches):
                out = _post(url + "/invocations", body)
            rates[name] = batches / (time.perf_counter() - t)
            assert len(out["predictions"]["label"]) == BATCH
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    return {"startup_s": startup, "single_requests": singles, "single_requests_per_s": singles / single_s,
            "batch_requests": batches,
            "batch32_png_requests_per_s": rates["batch32_png"],
            "batch32_png_images_per_s": rates["batch32_png"] * BATCH,
            "batch32_array_requests_per_s": rates["batch32_array"],
            "batch32_array_images_per_s": rates["batch32_array"] * BATCH}


def bench_serve(sizes, inp) -> dict[str, Any]:
    """The ``serve`` part of ``python -m bench`` (see the module docstring)."""
    image_size = QUICKSTART_SIZE if sizes.image_size >= 64 else sizes.image_size
    singles, batches = requests_for(sizes.n_test)
    params = register_model(inp.work / "serve", inp.weights, image_size, np.ascontiguousarray(inp.x_test[:2]))
    return {"image_size": image_size, **measure(params, inp.x_test, singles, batches)}


def main() -> None:
    from types import SimpleNamespace

    from bench.suite import PROFILES
    from cvpipe.io import load_npz
    from cvpipe.params import load_params
    from tasks.download import download_backbone, export_digits

    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cvpipe-bench"))
    args = ap.parse_args()
    sizes = PROFILES[args.profile]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    p = load_params(ROOT / "params.yaml", {"train.backbone": "efficientnet_lite0", "train.weights": "imagenet"})
    download_backbone(p.train, work / "backbone", p.download)
    digits = load_npz(export_digits(work))
    inp = SimpleNamespace(work=work, weights=work / "backbone" / "weights.pth",
                          x_test=digits["images"][-sizes.n_test:, None])
    print(json.dumps(bench_serve(sizes, inp), indent=1))


if __name__ == "__main__":
    main()
