"""Trust and tracking-store failures: the registered model is data loaded by the installed package
(tampering with the store never runs code), runs of killed processes are marked KILLED, registry
tags are written with the version, an unreachable server fails in seconds, and two clones sharing a
store never mix their artifacts.

The model is trained on the tiny generated data of ``tests/helpers.py`` (feature extractor, CPU), logged
by the train flow's own logging function and registered by ``register_best`` into a temporary
sqlite store, as the pipeline does.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from cvpipe.errors import user_facing
from cvpipe.params import load_params
from tests.helpers import ROOT, TINY_CLASSES, tiny_images, tiny_project, write_params

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
MODE = "feature_extractor"


class Marker:
    """Unpickling this object writes a marker file (what a malicious payload would do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def marker_code(marker: Path) -> str:
    return f"\nopen({str(marker)!r}, 'w').write('ran')\n"


# --------------------------------------------------------------------------- a registered model


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project with one trained, logged (as the train flow logs) and registered model."""
    from mlflow.tracking import MlflowClient

    from flows.registry import logged_model_id, register_best
    from flows.tracking import stage_run, tracking_uri
    from flows.train import log_model, write_run_id
    from tasks.train import train

    tmp = tmp_path_factory.mktemp("trust")
    p = tiny_project(tmp, {"train.epochs": 10, "train.lr": 0.01, "train.modes": [MODE]})
    train(p, MODE)
    with stage_run(p, "train", run_name=f"train-{MODE}", tags={"mode": MODE, "backbone": p.train.backbone}) as run:
        log_model(run, p, MODE)
        run.log_metrics({"test_acc": 0.9})
        write_run_id(p, MODE, run.run_id)
    reg = register_best(p, {MODE: {"test_acc": 0.9}}, {MODE: run.run_id})
    assert reg["champion"] and reg["version"] == 1
    client = MlflowClient(tracking_uri(p))
    version = client.get_model_version(p.mlflow.registered_model, "1")
    model_dir = Path(client.get_logged_model(logged_model_id(version)).artifact_location.removeprefix("file://"))
    images = {}
    x, y = tiny_images(3, 7)
    for i, (img, label) in enumerate(zip(x, y)):
        path = tmp / "images" / f"{TINY_CLASSES[label]}_{i}.png"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(img.transpose(1, 2, 0), cv2.COLOR_RGB2BGR))
        images[path] = img
    return {"p": p, "params": tmp / "params.yaml", "run_id": run.run_id, "model_dir": model_dir,
            "images": images, "tmp": tmp}


@pytest.fixture
def store(project):
    """The project; the registered model's artifact folder is restored after the test tampers with it."""
    backup = project["tmp"] / "model-backup"
    shutil.copytree(project["model_dir"], backup)
    try:
        yield project
    finally:
        shutil.rmtree(project["model_dir"])
        shutil.move(backup, project["model_dir"])


def _mlmodel(model_dir: Path) -> dict:
    return yaml.safe_load((model_dir / "MLmodel").read_text())


def _write_mlmodel(model_dir: Path, meta: dict) -> None:
    (model_dir / "MLmodel").write_text(yaml.safe_dump(meta, sort_keys=False))


def test_logged_model_is_data_only_and_predicts_like_training(project):
    """The artifact holds no code and no pickle; predict goes through the pyfunc and answers exactly
    what the trained network (model.pt, training's preprocessing) answers, on files and on arrays."""
    import mlflow.models
    import mlflow.pyfunc

    from cvpipe.layout import MODEL
    from cvpipe.predict import predict
    from tasks.checkpoints import load_classifier
    from tasks.export import load_classifier_data, softmax

    model_dir, p = project["model_dir"], project["p"]
    files = sorted(f.relative_to(model_dir).as_posix() for f in model_dir.rglob("*") if f.is_file())
    assert "data/classifier/classifier.json" in files and "data/classifier/weights.npz" in files
    assert not [f for f in files if f.endswith((".py", ".pkl", ".pt", ".pt2", ".pth"))], files
    pyfunc = _mlmodel(model_dir)["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "cvpipe.model_flavor" and not pyfunc.get("code")
    assert "python_model" not in pyfunc and set(_mlmodel(model_dir)["flavors"]) == {"python_function"}
    info = mlflow.models.get_model_info(f"models:/{p.mlflow.registered_model}/1")
    # No input schema (MLflow would cast or refuse inputs before the model checks them); the param k.
    assert info.signature.inputs is None and [q.name for q in info.signature.params.params] == ["k"]
    assert (model_dir / "input_example.json").is_file()

    paths = list(project["images"])
    results = predict(p, paths, k=4)
    ref = load_classifier(p.paths.train / MODE / MODEL)
    x = np.stack([project["images"][f] for f in paths])
    with torch.inference_mode():
        expected = softmax(ref(torch.from_numpy(x)).numpy())
    for r, prob in zip(results, expected):
        got = dict(r["top"])
        assert r["version"] == 1 and list(got) == [TINY_CLASSES[i] for i in np.argsort(-prob)]
        assert [got[c] for c in TINY_CLASSES] == pytest.approx(prob.tolist(), abs=1e-5)
    correct = sum(r["top"][0][0] == Path(r["path"]).name.rsplit("_", 1)[0] for r in results)
    assert correct >= 0.75 * len(results)  # chance is 0.25

    # The loaded pyfunc takes what a client has: larger images, floats in [0, 1], grey.
    model = mlflow.pyfunc.load_model(f"models:/{p.mlflow.registered_model}@champion")
    base = model.predict(x)
    assert set(base) == {"label", "probability", "top_k", "logits", "probabilities"}
    assert base["probabilities"] == pytest.approx(expected, abs=1e-5)
    assert base["label"] == [TINY_CLASSES[i] for i in expected.argmax(1)]
    big = x.repeat(4, axis=2).repeat(4, axis=3)  # area-resizing this back gives x exactly, as preprocess would
    assert model.predict(big)["probabilities"] == pytest.approx(expected, abs=1e-5)
    clf = load_classifier_data(model_dir / "data" / "classifier")
    assert clf.predict(x.astype(np.float32) / 255)["logits"] == pytest.approx(base["logits"], abs=1e-4)
    assert clf.predict(x[:, :1])["probabilities"].shape == (len(x), 4)


def test_predict_makes_files_that_are_not_images_per_file_errors(project, tmp_path):
    """README.md, an empty file and a truncated PNG among real images: each is its own error, the
    images are still classified, in order (the CLI prints one line per error and exits 1)."""
    from cvpipe.predict import predict

    image = next(iter(project["images"]))
    empty, truncated = tmp_path / "empty.png", tmp_path / "truncated.png"
    empty.write_bytes(b"")
    truncated.write_bytes(image.read_bytes()[:40])
    results = predict(project["p"], [ROOT / "README.md", image, empty, truncated, image], k=2)
    assert [r.get("error") for r in results] == ["not a decodable image", None, "empty file",
                                                 "not a decodable image", None]
    assert results[1]["top"] == results[4]["top"] and len(results[1]["top"]) == 2


def test_predict_never_runs_code_planted_in_the_store(store, tmp_path):
    """Python files written into every folder of the stored model (where MLflow once copied `tasks`)
    are never imported: predict still answers and the marker is never written."""
    from cvpipe.predict import predict

    model_dir, marker = store["model_dir"], tmp_path / "marker"
    assert not list(model_dir.rglob("*.py"))  # nothing to append to: the model stores no code
    for folder in [model_dir, *[d for d in model_dir.rglob("*") if d.is_dir()]]:
        for name in ("sitecustomize.py", "tasks/__init__.py", "tasks/backbones.py", "cvpipe/__init__.py",
                     "cvpipe/model_flavor.py", "torch.py", "numpy.py"):
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_text(marker_code(marker))
    for py in model_dir.rglob("*.py"):  # and appended, as to the tasks/__init__.py MLflow used to store
        with open(py, "a") as fh:
            fh.write(marker_code(marker))
    results = predict(store["p"], list(store["images"])[:2])
    assert len(results) == 2 and not marker.exists()

    code = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from pathlib import Path
        from cvpipe.params import load_params
        from cvpipe.predict import predict
        print(predict(load_params({str(store['params'])!r}),
                      [Path({str(list(store['images'])[0])!r})])[0]['top'][0][0])
    """)], env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert code.returncode == 0, code.stderr[-2000:]
    assert code.stdout.strip().splitlines()[-1] in TINY_CLASSES and not marker.exists()


def _tamper(model_dir: Path, marker: Path, how: str) -> None:
    """Edit the stored model so that a loader that trusts it would write ``marker``."""
    meta = _mlmodel(model_dir)
    pyfunc = meta["flavors"]["python_function"]
    if how == "code_paths":
        (model_dir / "code").mkdir()
        (model_dir / "code" / "evil.py").write_text(marker_code(marker))
        (model_dir / "code" / "sitecustomize.py").write_text(marker_code(marker))
        pyfunc["code"] = "code"
    elif how == "code_paths_other_flavor":
        (model_dir / "code").mkdir()
        (model_dir / "code" / "evil.py").write_text(marker_code(marker))
        meta["flavors"]["pytorch"] = {"code": "code", "pytorch_version": str(torch.__version__)}
    elif how == "python_model":
        (model_dir / "python_model.pkl").write_bytes(pickle.dumps(Marker(marker)))
        pyfunc.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl",
                      cloudpickle_version="3.0.0")
    elif how == "foreign_loader":
        (model_dir / "evil.py").write_text(marker_code(marker) + "def _load_pyfunc(path):\n    return None\n")
        pyfunc["loader_module"] = "evil"
    elif how == "non_cvpipe_installed_loader":
        pyfunc["loader_module"] = "mlflow.pyfunc.model"
    elif how == "model_from_code":
        (model_dir / "model.py").write_text(marker_code(marker))
        pyfunc.update(loader_module="mlflow.pyfunc.model", model_code_path="model.py")
    elif how == "data_outside":
        pyfunc["data"] = "../../../../.."
    _write_mlmodel(model_dir, meta)


@pytest.mark.parametrize("how", ["code_paths", "code_paths_other_flavor", "python_model", "foreign_loader",
                                 "non_cvpipe_installed_loader", "model_from_code", "data_outside"])
def test_tampered_mlmodel_is_refused_with_one_clear_error(store, tmp_path, how):
    from cvpipe.predict import predict
    from tasks.export import UntrustedModel

    marker = tmp_path / "marker"
    _tamper(store["model_dir"], marker, how)
    with pytest.raises(UntrustedModel) as err:
        predict(store["p"], list(store["images"])[:1])
    msg = str(err.value)
    assert "refusing to load models:/cvpipe-classifier@champion (version 1)" in msg and "--trust-model-code" in msg
    line = user_facing(err.value)
    assert line is not None and line.startswith("error: refusing to load") and "\n" not in line
    assert not marker.exists()


@pytest.mark.parametrize("how", ["python_model", "foreign_loader"])
def test_serve_model_refuses_what_predict_refuses(store, tmp_path, how):
    """`cvpipe serve-model` loads through the same check: one error line, exit code 1, nothing
    listening, the planted code never run."""
    marker = tmp_path / "marker"
    _tamper(store["model_dir"], marker, how)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cvpipe = str(Path(sys.executable).parent / "cvpipe")
    r = subprocess.run([cvpipe, "serve-model", "--port", str(port), "--params", str(store["params"])],
                       env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to load models:/cvpipe-classifier@champion")
    assert "--trust-model-code" in lines[0] and not marker.exists()


def test_tampered_weights_are_refused_without_unpickling(store, tmp_path):
    """weights.npz replaced by an archive holding a pickled object: refused, never unpickled."""
    from cvpipe.predict import predict
    from tasks.export import UntrustedModel

    marker = tmp_path / "marker"
    weights = store["model_dir"] / "data" / "classifier" / "weights.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = Marker(marker)
    np.savez(weights, **{"_fc.weight": payload})
    with pytest.raises(UntrustedModel, match="pickle-free"):
        predict(store["p"], list(store["images"])[:1])
    assert not marker.exists()


@pytest.mark.slow  # mlflow.pytorch logs, loads and predicts image by image: ~10 s
def test_a_model_of_the_old_format_is_refused_unless_trusted(project):
    """A version logged the old way (mlflow.pytorch) is refused by default; trust_model_code loads it."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from cvpipe.layout import MODEL
    from cvpipe.predict import predict
    from flows.tracking import stage_run, tracking_uri
    from tasks.checkpoints import load_classifier
    from tasks.export import UntrustedModel

    p = project["p"]
    clf = load_classifier(p.paths.train / MODE / MODEL)
    x = np.stack(list(project["images"].values()))
    with torch.inference_mode():
        logits = clf(torch.from_numpy(x)).numpy()
    with stage_run(p, "train", run_name="legacy") as run, mlflow.start_run(run_id=run.run_id):
        mlflow.pytorch.log_model(clf, name="model", signature=infer_signature(x[:2], logits[:2]),
                                 input_example=x[:2])
    client = MlflowClient(tracking_uri(p))
    mv = mlflow.register_model(f"runs:/{run.run_id}/model", p.mlflow.registered_model,
                               tags={"classes": json.dumps(TINY_CLASSES), "test_acc": "0.1"})
    client.set_registered_model_alias(p.mlflow.registered_model, "legacy", mv.version)
    paths = list(project["images"])
    with pytest.raises(UntrustedModel, match=r"models:/cvpipe-classifier@legacy \(version 2\): its loader_module "
                                             r"'mlflow.pytorch' is not a module of the installed cvpipe package"):
        predict(p, paths, alias="legacy")
    results = predict(p, paths, k=4, alias="legacy", trust_model_code=True)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    for r, expected in zip(results, prob):
        assert dict(r["top"]) == pytest.approx(dict(zip(TINY_CLASSES, expected.tolist())), abs=1e-5)


# --------------------------------------------------------------------------- registry tags


def test_registration_writes_the_tags_with_the_version(project, monkeypatch):
    """A kill right after the version is created cannot leave it untagged: no separate tag call is made."""
    from mlflow.tracking import MlflowClient

    from flows.registry import register_best
    from flows.tracking import tracking_uri

    def killed(*args, **kwargs):
        raise RuntimeError("killed right after the version was created")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", killed)
    p = project["p"]
    reg = register_best(p, {MODE: {"test_acc": 0.25}}, {MODE: project["run_id"]})
    assert not reg["champion"]
    tags = MlflowClient(tracking_uri(p)).get_model_version(p.mlflow.registered_model, str(reg["version"])).tags
    assert json.loads(tags["classes"]) == TINY_CLASSES and float(tags["test_acc"]) == 0.25
    assert tags["mode"] == MODE and tags["backbone"] == p.train.backbone and tags["dataset"] == p.data.dataset


def test_a_version_left_untagged_is_repaired_on_the_next_registration_and_predicts(project):
    from mlflow.tracking import MlflowClient

    from cvpipe.predict import predict
    from flows.registry import register_best
    from flows.tracking import tracking_uri

    p = project["p"]
    name = p.mlflow.registered_model
    client = MlflowClient(tracking_uri(p))
    v1 = client.get_model_version(name, "1")
    bare = client.create_model_version(name, v1.source, run_id=v1.run_id)
    client.set_registered_model_alias(name, "bare", bare.version)
    assert "classes" not in bare.tags
    assert [r["top"][0][0] for r in predict(p, list(project["images"]), alias="bare")] == \
        [r["top"][0][0] for r in predict(p, list(project["images"]))]  # the card, not tags, names classes

    register_best(p, {MODE: {"test_acc": 0.2}}, {MODE: project["run_id"]})
    tags = client.get_model_version(name, bare.version).tags
    assert json.loads(tags["classes"]) == TINY_CLASSES and float(tags["test_acc"]) == pytest.approx(0.9)
    assert tags["mode"] == MODE and tags["backbone"] == p.train.backbone and tags["dataset"] == p.data.dataset


# --------------------------------------------------------------------------- killed runs

OPEN_RUN = textwrap.dedent("""
    import sys, time
    from cvpipe.params import load_params
    from flows.tracking import stage_run
    with stage_run(load_params(sys.argv[1]), "train", run_name=sys.argv[2]) as run:
        print(run.run_id, flush=True)
        time.sleep(600)
""")


def test_runs_of_killed_processes_are_marked_killed_at_the_next_stage(tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.run_tags import HOST_TAG, PID_TAG
    from flows.tracking import configure, stage_run, tracking_uri

    params = write_params(tmp_path)
    p = load_params(params)
    configure(p)  # create the store once, before the two children race for it
    procs = {name: subprocess.Popen([sys.executable, "-c", OPEN_RUN, str(params), name], env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("doomed", "alive")}
    try:
        run_ids = {name: proc.stdout.readline().strip() for name, proc in procs.items()}
        assert all(run_ids.values()), "a child did not open its run"
        os.kill(procs["doomed"].pid, signal.SIGKILL)
        procs["doomed"].wait(timeout=30)
        client = MlflowClient(tracking_uri(p))
        doomed = client.get_run(run_ids["doomed"])
        assert doomed.info.status == "RUNNING"
        assert doomed.data.tags[HOST_TAG] == socket.gethostname()
        assert doomed.data.tags[PID_TAG] == str(procs["doomed"].pid)

        with stage_run(p, "preprocess") as mine:
            assert client.get_run(run_ids["doomed"]).info.status == "KILLED"
            assert client.get_run(run_ids["alive"]).info.status == "RUNNING"
            assert client.get_run(mine.run_id).info.status == "RUNNING"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert client.get_run(mine.run_id).info.status == "FINISHED"


def test_owner_alive_tells_a_reused_pid_apart():
    from flows.run_tags import PID_START_TAG, PID_TAG, owner_alive, owner_tags

    tags = owner_tags()
    assert owner_alive(tags)
    if tags[PID_START_TAG]:  # Linux: the pid's start time is known
        assert not owner_alive({**tags, PID_START_TAG: str(int(tags[PID_START_TAG]) + 1)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not owner_alive({PID_TAG: str(dead.pid)})


# --------------------------------------------------------------------------- unreachable server


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_fails_in_seconds_with_one_line(tmp_path, monkeypatch):
    from flows.tracking import TrackingUnreachable, check_tracking, stage_run

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # the user's choice is kept
    uri = f"http://127.0.0.1:{_closed_port()}"
    p = load_params(write_params(tmp_path, {"mlflow.tracking_uri": uri}))
    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachable) as err:
        check_tracking(p)
    assert time.monotonic() - t0 < 10
    assert str(err.value).startswith(f"MLflow tracking server {uri} is not reachable (")
    assert str(err.value).endswith("start it or fix mlflow.tracking_uri")
    assert user_facing(err.value) == f"error: {err.value}"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"

    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachable, match="is not reachable"):
        with stage_run(p, "train"):
            pytest.fail("the stage must not start")
    assert time.monotonic() - t0 < 10


def test_a_server_that_answers_health_passes(tmp_path, http_root):
    from flows.tracking import TrackingUnreachable, check_tracking

    root, url = http_root
    p = load_params(write_params(tmp_path, {"mlflow.tracking_uri": url}))
    with pytest.raises(TrackingUnreachable, match="HTTP 404 on /health and on the REST API"):
        check_tracking(p)
    (root / "health").write_text("OK")
    check_tracking(p)


# --------------------------------------------------------------------------- two clones, one store


def test_two_clones_sharing_a_store_never_mix_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.tracking import (
        ArtifactLocationConflict,
        configure,
        stage_run,
        tracking_uri,
    )

    shared = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    (tmp_path / "shared").mkdir()
    clones = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        clones[name] = load_params(write_params(tmp_path / name, {"mlflow.tracking_uri": shared}))
    configure(clones["a"])
    with pytest.raises(ArtifactLocationConflict) as err:
        configure(clones["b"])
    msg = str(err.value)
    assert str(tmp_path / "a" / "mlruns" / "artifacts") in msg and str(tmp_path / "b" / "mlruns" / "artifacts") in msg
    assert "mlflow.experiment" in msg and "proxied artifacts" in msg
    assert user_facing(err.value) == f"error: {msg}"

    # The remedy: one experiment per clone; each clone's artifacts stay in its own folder.
    b = clones["b"].model_copy(update={"mlflow": clones["b"].mlflow.model_copy(update={"experiment": "cvpipe-b"})})
    (tmp_path / "note.txt").write_text("hello")
    with stage_run(b, "train") as run:
        run.log_artifact(tmp_path / "note.txt")
    client = MlflowClient(tracking_uri(b))
    where = client.get_run(run.run_id).info.artifact_uri
    assert where.startswith((tmp_path / "b" / "mlruns" / "artifacts").as_uri())
    assert list((tmp_path / "b" / "mlruns" / "artifacts").rglob("note.txt"))
    assert not list((tmp_path / "a" / "mlruns" / "artifacts").rglob("note.txt"))
