"""The served inference pipeline: the registered pyfunc takes what a client has (encoded image files,
base64 in JSON, or uint8/float arrays of any size) and answers class names with probabilities;
`cvpipe serve-model` serves it over MLflow's scoring protocol with one-line 4xx errors.

Fast tests use a classifier with random weights (its answers need not be right, only consistent);
the slow test trains a digits classifier, registers it in a temporary store and talks to the real
server process.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.export import TOP_K, Classifier, make_card
from tasks.inputs import InvalidInput, images_from_input
from tests.helpers import ROOT, write_params

CLASSES = ["a", "b", "c"]
CVPIPE = str(Path(sys.executable).parent / "cvpipe")


def _png(img_hwc: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img_hwc)
    assert ok
    return buf.tobytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def clf() -> Classifier:
    """EfficientNet-Lite0 (random weights, 3 classes) for grey 8x8 training images at 32 px."""
    import torch

    from tasks.backbones import ImageClassifier, build_model

    torch.manual_seed(0)
    card = make_card(backbone="efficientnet_lite0", mode="feature_extractor", classes=CLASSES, channels=1,
                     input_size=(8, 8), image_size=32, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                     interpolation="bilinear")
    net = build_model("efficientnet_lite0", len(CLASSES))
    return Classifier(card, ImageClassifier(net, 32, card["mean"], card["std"], CLASSES, "bilinear"))


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    """A 24x16 grey image with some structure (uint8 H, W)."""
    rng = np.random.default_rng(3)
    img = np.zeros((24, 16), np.uint8)
    img[4:20, 6:10] = 230
    return np.clip(img.astype(int) + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- the pyfunc's inputs and outputs


def test_every_input_form_gives_the_same_answer(clf, grey):
    """A PNG (bytes, base64, data URL, in a list, an `image` field or column), the uint8 array, floats in
    [0, 1] and the colour version of the same image: one answer, with names, top-k and logits."""
    import pandas as pd

    png = _png(grey)
    rgb = np.repeat(grey[None], 3, axis=0)
    forms = {
        "bytes": png, "base64": _b64(png), "data URL": "data:image/png;base64," + _b64(png),
        "list": [_b64(png)], "array of str": np.array([_b64(png)]), "field": {"image": np.array([_b64(png)])},
        "column": pd.DataFrame({"image": [_b64(png)]}), "uint8 (C, H, W)": grey[None],
        "uint8 (N, C, H, W)": grey[None, None], "float in [0, 1]": grey[None, None] / 255.0,
        "int64 (from JSON)": grey[None, None].astype(np.int64), "RGB": rgb[None],
        "colour PNG": _png(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)),
    }
    ref = clf.predict(grey[None, None])
    assert set(ref) == {"label", "probability", "top_k", "logits", "probabilities"}
    assert ref["logits"].shape == ref["probabilities"].shape == (1, 3)
    best = int(ref["probabilities"][0].argmax())
    assert ref["label"] == [CLASSES[best]] and ref["probability"][0] == pytest.approx(ref["probabilities"][0, best])
    assert len(ref["top_k"][0]) == TOP_K and ref["top_k"][0][0] == {"label": CLASSES[best],
                                                                      "probability": pytest.approx(ref["probability"][0])}
    for name, value in forms.items():
        out = clf.predict(value)
        assert out["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-5), name
        assert out["label"] == ref["label"], name


def test_batches_mix_sizes_when_encoded_and_k_is_a_param(clf, grey):
    big = cv2.resize(grey, (64, 96), interpolation=cv2.INTER_NEAREST)
    out = clf.predict([_b64(_png(grey)), _b64(_png(big)), _b64(_png(255 - grey))], params={"k": 2})
    assert out["probabilities"].shape == (3, 3) and len(out["label"]) == 3
    assert [len(t) for t in out["top_k"]] == [2, 2, 2]
    probs = [t["probability"] for t in out["top_k"][0]]
    assert probs == sorted(probs, reverse=True)
    assert [len(t) for t in clf.predict(grey[None], params={"k": 10})["top_k"]] == [3]  # at most every class
    batch = np.stack([grey[None]] * 32)
    assert clf.predict(batch)["logits"].shape == (32, 3)


@pytest.mark.parametrize("value, message", [
    ("hello world!", r"image 0: not base64"),
    (_b64(b"just some text"), r"image 0: not a decodable image"),
    ([_b64(_png(np.zeros((4, 4), np.uint8))), _b64(b"")], r"image 1: empty file"),
    (np.zeros((1, 2, 5, 5), np.uint8), r"expected images as \(N, C, H, W\) with C = 1 or 3, got shape \(1, 2, 5, 5\)"),
    (np.zeros((1, 8, 8, 3), np.uint8), r"channels last\? send \(N, C, H, W\)"),
    (np.full((1, 1, 4, 4), 128.0), r"float images must be in \[0, 1\]"),
    (np.full((1, 1, 4, 4), 300), r"integer images must be in 0\.\.255"),
    ({"pixels": [1]}, r"expected the field 'image'"),
    ([[[[1]]], [[[1, 2]]]], r"must all have one shape"),
    ([_b64(b"x"), 3], r"not both in one request"),
])
def test_bad_inputs_are_one_short_line(clf, value, message):
    import re

    with pytest.raises(InvalidInput) as info:
        clf.predict(value)
    text = str(info.value)
    assert re.search(message, text) and "\n" not in text and len(text) < 200, text


def test_bad_k_and_the_pixel_limit(clf, grey):
    for k in (0, -1, "3", 2.5, True):
        with pytest.raises(InvalidInput, match="param k must be a positive integer"):
            clf.predict(grey[None], params={"k": k})
    with pytest.raises(InvalidInput, match=r"image 0: 16x24 image: over the limit of 100 pixels"):
        images_from_input([_png(grey)], 1, (8, 8), max_pixels=100)


def test_signature_declares_k_and_no_input_schema():
    """No input schema: MLflow would cast every request to its dtype (floats in [0, 1] to zeros) or
    refuse strings before the model sees them."""
    from cvpipe.model_flavor import signature

    sig = signature()
    assert sig.inputs is None
    assert [(p.name, p.default) for p in sig.params.params] == [("k", TOP_K)]
    assert {s.name for s in sig.outputs.inputs} == {"label", "probability", "top_k", "logits", "probabilities"}


def test_decode_image_reads_bytes_as_read_image_reads_files(tmp_path, grey):
    from tasks.images import decode_image, read_image

    colour = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    colour[..., 2] = 40
    path = tmp_path / "x.png"
    path.write_bytes(_png(colour))
    assert np.array_equal(decode_image(path.read_bytes()), read_image(path))
    for bad, why in [(b"", "empty file"), (b"%PDF-1.4", "not a decodable image")]:
        with pytest.raises(ValueError, match=why):
            decode_image(bad)


# --------------------------------------------------------------------------- the HTTP app, in process


@pytest.fixture(scope="module")
def client(clf, tmp_path_factory):
    """The serving app around the pyfunc as MLflow loads it (saved with the real flavour and signature)."""
    import mlflow.pyfunc
    from fastapi.testclient import TestClient

    from cvpipe import model_flavor
    from cvpipe.serving import build_app
    from tasks.export import save_classifier_data

    tmp = tmp_path_factory.mktemp("served")
    data = save_classifier_data(clf, tmp / model_flavor.DATA_DIR)
    mlflow.pyfunc.save_model(tmp / "model", loader_module=model_flavor.LOADER_MODULE, data_path=str(data),
                             signature=model_flavor.signature(), input_example=np.zeros((1, 1, 8, 8), np.uint8))
    return TestClient(build_app(mlflow.pyfunc.load_model(str(tmp / "model"))))


def test_app_answers_mlflow_request_formats(client, clf, grey):
    png = _b64(_png(grey))
    ref = clf.predict(grey[None])
    requests = [{"inputs": {"image": [png]}}, {"instances": [{"image": png}]}, {"inputs": [png]},
                {"dataframe_records": [{"image": png}]},
                {"dataframe_split": {"columns": ["image"], "data": [[png]]}},
                {"inputs": grey[None, None].tolist()}, {"inputs": (grey[None, None] / 255).tolist()}]
    for body in requests:
        r = client.post("/invocations", json={**body, "params": {"k": 2}})
        assert r.status_code == 200, (body.keys(), r.text[:300])
        pred = r.json()["predictions"]
        assert pred["label"] == ref["label"] and len(pred["top_k"][0]) == 2
        assert np.array(pred["probabilities"]) == pytest.approx(ref["probabilities"], abs=1e-5)
    assert client.get("/ping").status_code == 200 and client.get("/health").status_code == 200


@pytest.mark.parametrize("body, status, message", [
    ({"inputs": {"image": [_b64(b"not an image")]}}, 400, "image 0: not a decodable image"),
    ({"inputs": np.zeros((1, 2, 40, 40), int).tolist()}, 400, "got shape (1, 2, 40, 40)"),
    ({"image": "abc"}, 400, 'expected a JSON object with one of "inputs"'),
    ({"inputs": {"image": ["aGk="]}, "params": {"k": 0}}, 400, "param k must be a positive integer"),
    ("{not json", 400, "valid JSON"),
])
def test_app_bad_requests_are_4xx_with_one_short_line(client, body, status, message):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = client.post("/invocations", **kwargs)
    assert r.status_code == status, r.text[:500]
    text = r.json()["message"]
    assert message in text and len(text) < 300 and "\n" not in text, text
    assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"


# --------------------------------------------------------------------------- the real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def digits_registry(tmp_path_factory):
    """A digits classifier (feature extractor at 32 px) trained, logged as the train flow logs it and
    registered as champion in a temporary store; the digit sample the download stage writes."""
    from cvpipe.params import load_params
    from flows.registry import register_best
    from flows.tracking import stage_run
    from flows.train import log_model, write_run_id
    from tasks.download import download_backbone, export_digits
    from tasks.preprocess import preprocess
    from tasks.samples import digit_sample
    from tasks.train import train

    tmp = tmp_path_factory.mktemp("digits-served")
    mode = "feature_extractor"
    params = write_params(tmp, {"train.image_size": 32, "train.epochs": 40, "train.lr": 0.01, "train.modes": [mode],
                                "train.hflip": False, "train.vflip": False})
    p = load_params(params)
    digits = export_digits(p.paths.raw)
    preprocess(p)
    download_backbone(p.train, p.paths.backbone, p.download)
    metrics = train(p, mode)
    with stage_run(p, "train", run_name=f"train-{mode}", tags={"mode": mode, "backbone": p.train.backbone}) as run:
        log_model(run, p, mode)
        write_run_id(p, mode, run.run_id)
    register_best(p, {mode: {"test_acc": metrics["val_acc"]}}, {mode: run.run_id})
    (name, png), = digit_sample(digits).items()
    (tmp / name).write_bytes(png)
    return {"params": params, "tmp": tmp, "digit": tmp / name, "val_acc": metrics["val_acc"]}


@pytest.mark.slow
def test_cvpipe_serve_model_answers_over_http_and_stops(digits_registry):
    """`cvpipe serve-model` on a free port (no activated virtualenv, no MLFLOW_TRACKING_URI): a real PNG
    of a 7 is a 7 with its top-k; a batch of arrays; bad payloads are a 400 with a short message;
    SIGTERM stops it and no process is left."""
    tmp, port = digits_registry["tmp"], _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/bin:/bin"  # not the virtualenv's bin
    env["PYTHONPATH"] = str(ROOT)
    log = open(tmp / "server.log", "w")
    t0 = time.perf_counter()
    server = subprocess.Popen([CVPIPE, "serve-model", "--port", str(port), "--params", str(digits_registry["params"])],
                              cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert server.poll() is None, (tmp / "server.log").read_text()[-3000:]
            assert time.perf_counter() - t0 < 180, "no answer on /ping within 180 s"
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        print(f"serve-model ready in {time.perf_counter() - t0:.1f} s")
        assert "version 1" in (tmp / "server.log").read_text() and "10 classes: 0, 1, 2" in (tmp / "server.log").read_text()

        png = digits_registry["digit"].read_bytes()
        status, out = _post(url + "/invocations", {"inputs": {"image": [_b64(png)]}, "params": {"k": 3}})
        assert status == 200, out
        pred = out["predictions"]
        assert pred["label"] == ["7"], pred["top_k"]
        top = pred["top_k"][0]
        assert [t["label"] for t in top][0] == "7" and len(top) == 3
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
        assert len(pred["logits"][0]) == 10 and sum(pred["probabilities"][0]) == pytest.approx(1, abs=1e-4)

        x = np.load(Path(tmp / "data/processed/test.npz"))["x"][:32]
        status, out = _post(url + "/invocations", {"inputs": x.tolist()})
        assert status == 200 and len(out["predictions"]["label"]) == 32
        status, floats = _post(url + "/invocations", {"inputs": (x / 255.0).tolist()})
        assert floats["predictions"]["label"] == out["predictions"]["label"]  # not cast to zeros

        for body, expected in [({"inputs": {"image": [_b64(b"%PDF-1.4 not an image")]}}, "not a decodable image"),
                               ({"inputs": np.zeros((2, 4, 16, 16), int).tolist()}, "got shape (2, 4, 16, 16)")]:
            status, err = _post(url + "/invocations", body)
            assert status == 400 and expected in err["message"] and len(err["message"]) < 300, err
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    # uvicorn shuts down gracefully, then lets the signal end the process as it would have.
    assert server.returncode in (0, -signal.SIGTERM), (tmp / "server.log").read_text()[-2000:]
    assert "Traceback" not in (tmp / "server.log").read_text()
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)  # nothing of its process group is left
    with socket.socket() as s:  # nothing listens on the port any more (TIME_WAIT connections may remain)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


@pytest.mark.slow
def test_predict_prints_the_model_and_makes_non_images_per_file_errors(digits_registry):
    """`cvpipe predict` on the digit sample and README.md: the model line, the 7, and one error line
    for README.md (exit code 1), no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([CVPIPE, "predict", "--params", str(digits_registry["params"]), str(ROOT / "README.md"),
                        str(digits_registry["digit"]), "-k", "2"], cwd=digits_registry["tmp"], env=env,
                       capture_output=True, text=True, timeout=300)
    print(f"cvpipe predict: {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"error: {ROOT / 'README.md'}: not a decodable image"], r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("model: models:/cvpipe-classifier@champion = version 1 (feature_extractor, ")
    assert "trained on digits" in lines[0] and "10 classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in lines[0]
    assert lines[1] == str(digits_registry["digit"]) and lines[2].split()[-1] == "7" and len(lines) == 4
