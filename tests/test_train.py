"""Tests for the backbone registry and the ``train`` stage, on tiny generated data, CPU only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cvpipe.backbones import BACKBONES
from cvpipe.io import read_json
from cvpipe.layout import AMP_CHOICE, CHECKPOINT, HISTORY, MODEL, TRAIN_METRICS
from cvpipe.params import load_params
from tasks.backbones import (
    build_architecture,
    build_model,
    forward_features,
    freeze,
    get_backbone,
    get_head,
    set_train_mode,
)
from tasks.checkpoints import load_classifier
from tasks.engine import epoch_generator, train_one_epoch
from tasks.runtime import Runtime, autocast_dtype, resolve_device
from tasks.train import train
from tasks.transforms import flip_variants, prepare_batch, random_flips
from tests.helpers import TINY_CLASSES, tiny_images, tiny_project, write_params

CPU = Runtime(torch.device("cpu"), None, False)


def state(model_file: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_file, map_location="cpu", weights_only=True)["state_dict"]


# --------------------------------------------------------------------------- input pipeline


def test_prepare_batch_resizes_expands_and_normalises():
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    x[1] = 0
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = prepare_batch(x, 20, mean, std, channels_last=True, interpolation="bicubic")
    assert out.shape == (2, 3, 20, 20) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    for c in range(3):
        assert torch.allclose(out[0, c], torch.full((20, 20), (1 - mean[c]) / std[c]), atol=1e-5)
        assert torch.allclose(out[1, c], torch.full((20, 20), -mean[c] / std[c]), atol=1e-5)


def test_prepare_batch_bicubic_stays_in_image_range_and_shrinks():
    x = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
    x[..., ::2] = 255  # sharp edges make bicubic overshoot before clipping
    up = prepare_batch(x, 32, (0, 0, 0), (1, 1, 1), interpolation="bicubic")
    assert up.min() >= 0 and up.max() <= 1 and up.max() == 1
    down = prepare_batch(torch.full((1, 3, 64, 48), 100, dtype=torch.uint8), 16, (0, 0, 0), (1, 1, 1))
    assert down.shape == (1, 3, 16, 16) and torch.allclose(down, torch.full_like(down, 100 / 255), atol=1e-5)


def test_random_flips_are_per_image_and_seeded():
    x = torch.arange(8 * 3 * 4 * 4, dtype=torch.int64).reshape(8, 3, 4, 4).to(torch.uint8)
    a = random_flips(x, True, True, torch.Generator().manual_seed(0))
    b = random_flips(x, True, True, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    variants = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    kinds = [next(k for k, v in enumerate(variants) if torch.equal(a[i], v[i])) for i in range(8)]
    assert len(set(kinds)) > 1  # not the same flip for every image
    assert torch.equal(random_flips(x, False, False, torch.Generator().manual_seed(0)), x)


def test_flip_variants_follow_params(tmp_path):
    p = load_params(write_params(tmp_path, {"train.feature_augment": "flips"}))
    assert flip_variants(p.train) == [(False, False), (True, False), (False, True), (True, True)]
    p = load_params(write_params(tmp_path, {"train.feature_augment": "flips", "train.vflip": False}))
    assert flip_variants(p.train) == [(False, False), (True, False)]
    p = load_params(write_params(tmp_path, {"train.feature_augment": "none"}))
    assert flip_variants(p.train) == [(False, False)]


def test_runtime_choices():
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    # without a model to time, auto on a CPU is full precision (train() times one: tests/test_amp.py)
    assert autocast_dtype("auto", cpu) is None
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


# --------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_head_stages_and_freezing(name):
    torch.manual_seed(0)
    spec = get_backbone(name)
    model = build_model(name, 7)
    head = get_head(model, spec)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 7
    # Every parameter belongs to exactly one stage or to the head.
    owners: dict[str, int] = {}
    for i, stage in enumerate(spec.stages):
        for path in stage:
            for pname, _ in model.get_submodule(path).named_parameters(prefix=path):
                assert pname not in owners
                owners[pname] = i
    head_params = {f"{spec.head}.{n}" for n, _ in head.named_parameters()}
    assert set(owners) | head_params == {n for n, _ in model.named_parameters()}

    freeze(model, spec, None)
    assert {n for n, q in model.named_parameters() if q.requires_grad} == head_params
    freeze(model, spec, 2)
    frozen = {n for n, q in model.named_parameters() if not q.requires_grad}
    assert frozen == {n for n, i in owners.items() if i < 2}
    with pytest.raises(ValueError, match="stages"):
        freeze(model, spec, len(spec.stages) + 1)

    model.eval()
    size = max(32, spec.min_image_size)
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 7)
    assert forward_features(model, spec, x).shape == (2, head.in_features)
    assert get_head(model, spec) is head  # restored after feature extraction


# VGG-16's 528 MB state dict is saved and loaded twice: seconds each, in the slow suite
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("vgg") else n
                                  for n in sorted(BACKBONES)])
def test_build_model_loads_weights_strictly(name, tmp_path):
    torch.manual_seed(1)
    reference = build_architecture(get_backbone(name))
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    model = build_model(name, 3, tmp_path / "w.pth")
    spec = get_backbone(name)
    for k, v in reference.state_dict().items():
        if not k.startswith(spec.head + "."):
            assert torch.equal(model.state_dict()[k], v), k
    torch.save({"nonsense.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="state_dict"):
        build_model(name, 3, tmp_path / "bad.pth")


def test_frozen_stages_do_not_change_during_training():
    """freeze_stages: k keeps the weights *and* the batch-norm statistics of the first k stages."""
    torch.manual_seed(0)
    spec = get_backbone("efficientnet_lite0")
    model = build_model("efficientnet_lite0", 4)
    freeze(model, spec, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = tiny_images(4, 0)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    g = epoch_generator(0, 1)
    train_one_epoch(model, opt, torch.from_numpy(x), torch.from_numpy(y), batch_size=8,
                    transform=lambda xb, _: prepare_batch(xb, 32, (0.5,) * 3, (0.25,) * 3), generator=g, rt=CPU)
    frozen_prefixes = tuple(f"{path}." for stage in spec.stages[:3] for path in stage)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not {k for k in changed if k.startswith(frozen_prefixes)}
    assert any(k.startswith("_blocks.15.") for k in changed) and "_fc.weight" in changed
    set_train_mode(model)
    assert not model._bn0.training and model._bn1.training


# --------------------------------------------------------------------------- the stage on tiny data


def test_fine_tune_learns_tiny_data(tmp_path):
    p = tiny_project(tmp_path)
    metrics = train(p, "fine_tune")
    out = p.paths.train / "fine_tune"
    history = read_json(out / HISTORY)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert read_json(out / TRAIN_METRICS) == metrics
    assert metrics["val_acc"] >= 0.8  # chance is 0.25
    assert metrics["best_epoch"] == min(history, key=lambda r: r["val_loss"])["epoch"]
    assert metrics["images_per_s"] > 0 and metrics["device"] == "cpu"
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 3 and set(ckpt) >= {"model", "optimizer", "params", "rng", "history", "best"}
    clf = load_classifier(out / MODEL)
    x, y = tiny_images(10, 3)
    with torch.inference_mode():
        acc = (clf(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert acc >= 0.8
    assert clf.classes == TINY_CLASSES
    assert not any(out.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_feature_extractor_keeps_backbone_bit_identical_and_caches_features(tmp_path):
    p = tiny_project(tmp_path, {"train.epochs": 15, "train.lr": 0.01})
    metrics = train(p, "feature_extractor")
    assert metrics["val_acc"] >= 0.8 and metrics["feature_cache_hit"] is False
    assert metrics["feature_images_per_s"] > 0

    spec = get_backbone("efficientnet_lite0")
    imagenet = torch.load(p.paths.backbone / "weights.pth", map_location="cpu", weights_only=True)
    trained = state(p.paths.train / "feature_extractor" / MODEL)
    backbone_keys = [k for k in imagenet if not k.startswith(spec.head + ".")]
    assert len(backbone_keys) > 100
    for k in backbone_keys:  # weights and batch-norm statistics, bit for bit
        assert torch.equal(trained[k], imagenet[k]), k
    assert trained["_fc.weight"].shape == (4, 1280)

    cache = list(p.paths.features.glob("efficientnet_lite0-*.npz"))
    assert len(cache) == 1
    again = train(p, "feature_extractor")
    assert again["feature_cache_hit"] is True
    assert {k: again[k] for k in ("train_loss", "val_loss", "val_acc")} == \
        {k: metrics[k] for k in ("train_loss", "val_loss", "val_acc")}

    # Another image size, or the flip variants, are other cache entries.
    p2 = tiny_project(tmp_path, {"train.epochs": 1, "train.feature_augment": "flips", "train.vflip": True})
    train(p2, "feature_extractor")
    feats = sorted(p.paths.features.glob("efficientnet_lite0-*.npz"))
    assert len(feats) == 2
    shapes = sorted(np.load(f)["train"].shape for f in feats)
    assert shapes == [(1, 96, 1280), (4, 96, 1280)]


@pytest.mark.parametrize("mode", ["fine_tune", "feature_extractor"])
def test_resume_equals_uninterrupted(tmp_path, mode):
    epochs = "train.fine_tune_epochs" if mode == "fine_tune" else "train.epochs"
    a = tiny_project(tmp_path / "a", {epochs: 2, "train.vflip": True})
    full = train(a, mode)

    b = tiny_project(tmp_path / "b", {epochs: 1, "train.vflip": True})
    train(b, mode)
    b = tiny_project(tmp_path / "b", {epochs: 2, "train.vflip": True, "train.resume": True})
    resumed = train(b, mode)

    keys = ("epochs", "best_epoch", "train_loss", "train_acc", "val_loss", "val_acc", "best_val_loss")
    assert {k: resumed[k] for k in keys} == {k: full[k] for k in keys}
    strip = [{k: v for k, v in r.items() if k != "images_per_s"} for r in
             (read_json(a.paths.train / mode / HISTORY) + read_json(b.paths.train / mode / HISTORY))]
    assert strip[:2] == strip[2:]
    sa, sb = state(a.paths.train / mode / MODEL), state(b.paths.train / mode / MODEL)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ca = torch.load(a.paths.train / mode / CHECKPOINT, weights_only=True)["model"]
    cb = torch.load(b.paths.train / mode / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_bf16_autocast_trains_both_modes(tmp_path):
    """The path taken on GPUs and AMX CPUs (emulated, hence slow, on other CPUs)."""
    # The default learning rate: at 0.01 the one-epoch fine-tune of the tiny set diverged on an AMX
    # Xeon (validation loss 55 in bf16, 12 in fp32; accuracy at chance either way) and passed on
    # other CPUs only by the luck of their rounding.
    p = tiny_project(tmp_path, {"train.epochs": 3, "train.fine_tune_epochs": 1, "train.amp": "bf16"})
    fe, ft = train(p, "feature_extractor"), train(p, "fine_tune")
    assert fe["amp"] == ft["amp"] == "bfloat16"
    assert fe["val_acc"] >= 0.5 and ft["val_acc"] >= 0.5  # chance is 0.25


def test_resume_refuses_a_checkpoint_made_with_other_params(tmp_path):
    p = tiny_project(tmp_path, {"train.epochs": 1})
    train(p, "feature_extractor")
    p = tiny_project(tmp_path, {"train.epochs": 2, "train.resume": True, "train.lr": 0.5})
    with pytest.raises(ValueError, match=r"train\.lr: 0\.001 -> 0\.5"):
        train(p, "feature_extractor")


def test_train_needs_the_downloaded_weights_of_its_backbone(tmp_path):
    p = tiny_project(tmp_path)
    p = load_params(write_params(tmp_path, {"train.backbone": "resnet18", "train.weights": "none"}))
    with pytest.raises(FileNotFoundError, match="cvpipe download"):
        train(p, "fine_tune")
    with pytest.raises(ValueError, match="unknown mode"):
        train(p, "linear_probe")


def test_auto_amp_is_timed_once_and_recorded(tmp_path, monkeypatch):
    """On a CPU that may compute bf16 natively, ``auto`` times the real model once, caches the verdict
    under ``paths.cache`` and records it in metrics.json."""
    import tasks.amp as amp

    monkeypatch.setattr(amp, "cpu_info", lambda: {"cpu": "Test CPU", "flags": ["avx512_bf16"]})
    p = tiny_project(tmp_path, {"train.epochs": 1, "train.amp": "auto"})
    first = train(p, "fine_tune")
    assert first["amp_choice"]["source"] == "probe" and first["amp"] == first["amp_choice"]["amp"]
    assert first["amp_choice"]["fp32_step_s"] > 0 and first["amp_choice"]["bf16_step_s"] > 0
    (entry,) = read_json(p.paths.cache / AMP_CHOICE).values()
    assert entry["fields"]["kind"] == "train" and entry["amp"] == first["amp"]
    again = train(p, "fine_tune")
    assert again["amp_choice"]["source"] == "cache" and again["amp"] == first["amp"]
