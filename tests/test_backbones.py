"""Tests for every backbone of the registry: build, head, freezing, one training step (CPU, random weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvpipe.backbones import BACKBONES, PackagedWeights
from cvpipe.io import file_hash
from cvpipe.params import TrainParams
from tasks.backbones import (
    build_model,
    forward_features,
    freeze,
    get_backbone,
    get_head,
    stage_modules,
)
from tasks.download import packaged_weights_file, torchvision_weights

NUM_CLASSES = 7
NAMES = sorted(BACKBONES)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """One model per backbone for the whole module: initialising VGG's 138M weights takes seconds.

    Each test sets the ``requires_grad`` and train/eval state it needs; the training step,
    which changes weights, is the last test of the module.
    """
    class Lazy(dict):
        def __missing__(self, name):
            torch.manual_seed(0)
            self[name] = build_model(name, NUM_CLASSES)
            return self[name]

    return Lazy()


def tiny_batch(name: str, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random normalised images at the backbone's smallest accepted size (at least 32 px), and labels."""
    size = max(32, get_backbone(name).min_image_size)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % NUM_CLASSES


def test_registry_matches_params_and_weights():
    """Every registered backbone is a valid train.backbone and has ImageNet weights (torchvision's, or a
    package's file with its pinned sha256)."""
    allowed = set(TrainParams.model_fields["backbone"].annotation.__args__)
    assert allowed == set(BACKBONES)
    for name, spec in BACKBONES.items():
        assert spec.name == name
        if isinstance(spec.imagenet, PackagedWeights):
            assert file_hash(packaged_weights_file(spec.imagenet)) == spec.imagenet.sha256
        else:
            w = torchvision_weights(spec)
            assert w.name == "IMAGENET1K_V1" and len(w.meta["categories"]) == 1000


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_new_head(name, models):
    spec = get_backbone(name)
    model = models[name].eval()
    head = get_head(model, spec)
    assert isinstance(head, torch.nn.Linear) and head.out_features == NUM_CLASSES
    x, _ = tiny_batch(name)
    with torch.no_grad():
        logits = model(x)
        feats = forward_features(model, spec, x)
    assert logits.shape == (2, NUM_CLASSES)
    # The features are what enters the head: the head applied to them gives the logits.
    assert feats.shape == (2, head.in_features)
    torch.testing.assert_close(head(feats), logits)
    assert get_head(model, spec) is head  # forward_features put the head back


@pytest.mark.parametrize("name", NAMES)
def test_feature_extractor_trains_only_the_head(name, models):
    spec = get_backbone(name)
    model = models[name]
    freeze(model, spec, None)
    head_ids = {id(p) for p in get_head(model, spec).parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == head_ids


@pytest.mark.parametrize("name", NAMES)
def test_freeze_stages(name, models):
    """Every stage path exists; freezing all stages leaves exactly the rest (at least the head) trainable."""
    spec = get_backbone(name)
    model = models[name]
    k = len(spec.stages)
    frozen = {id(p) for m in stage_modules(model, spec, k) for p in m.parameters()}
    assert frozen  # every stage path resolves, and they hold weights
    freeze(model, spec, k)
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in frozen)
    assert all(p.requires_grad for p in get_head(model, spec).parameters())
    with pytest.raises(ValueError):
        stage_modules(model, spec, k + 1)


@pytest.mark.parametrize("name", NAMES)
def test_one_fine_tune_step(name, models):
    """One SGD step on two tiny images changes the weights of the first stage and of the head."""
    spec = get_backbone(name)
    model = models[name]
    freeze(model, spec, 0)
    model.train()
    first = stage_modules(model, spec, 1)[0]
    before = {"head": get_head(model, spec).weight.detach().clone(),
              "first": next(first.parameters()).detach().clone()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = tiny_batch(name)
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(get_head(model, spec).weight, before["head"])
    assert not torch.equal(next(first.parameters()), before["first"])
