"""``train.amp: auto`` decides by timing (injected here) and caches its verdict per machine and workload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tasks.amp as amp
from cvpipe.io import read_json
from tasks.amp import choose_amp, decide, interleaved_medians, model_step_timer

CPU = torch.device("cpu")
FIELDS = {"backbone": "tiny", "image_size": 16, "batch_size": 4, "kind": "train"}


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU that may compute bf16 natively, whatever this machine is."""
    monkeypatch.setattr(amp, "cpu_info", lambda: {"cpu": "Test CPU", "flags": ["avx512_bf16", "avx512f"]})


def fake_timer(fp32_s: float, bf16_s: float, calls: list):
    def build():
        def step(dtype):
            calls.append(dtype)
            return bf16_s if dtype is torch.bfloat16 else fp32_s
        return step
    return build


def test_decide_needs_a_clear_gain():
    assert decide(1.0, 0.5) is torch.bfloat16
    assert decide(1.0, 0.97) is None  # within the 5 % margin: fp32 keeps its precision
    assert decide(1.0, 1.8) is None


def test_interleaved_medians_alternate_after_warmup():
    calls = []
    fp32, bf16 = interleaved_medians(fake_timer(2.0, 1.0, calls)(), pairs=3)
    assert (fp32, bf16) == (2.0, 1.0)
    assert calls == [None, torch.bfloat16] * 4  # one warm-up pair, then 3 timed pairs


def test_explicit_and_flag_choices_never_probe(tmp_path, monkeypatch):
    calls = []
    build = fake_timer(2.0, 1.0, calls)
    assert choose_amp("off", CPU, tmp_path / "c.json", FIELDS, build).dtype is None
    assert choose_amp("bf16", CPU, tmp_path / "c.json", FIELDS, build).dtype is torch.bfloat16
    monkeypatch.setattr(amp, "cpu_info", lambda: {"cpu": "Old CPU", "flags": ["avx2"]})
    c = choose_amp("auto", CPU, tmp_path / "c.json", FIELDS, build)
    assert (c.dtype, c.source) == (None, "flags")
    assert calls == [] and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("fp32_s, bf16_s, expected", [(2.0, 1.0, torch.bfloat16), (1.0, 1.6, None)])
def test_auto_probes_once_then_uses_the_cache(tmp_path, bf16_cpu, fp32_s, bf16_s, expected):
    cache, calls = tmp_path / "cache" / "amp_choice.json", []
    first = choose_amp("auto", CPU, cache, FIELDS, fake_timer(fp32_s, bf16_s, calls))
    assert (first.dtype, first.source) == (expected, "probe")
    assert first.as_dict()["bf16_speedup"] == pytest.approx(fp32_s / bf16_s)
    assert len(calls) == 8
    (entry,) = read_json(cache).values()
    assert entry["amp"] == ("bfloat16" if expected else "off") and entry["fields"] == FIELDS
    # the same workload on the same machine: the cached verdict, no new timing
    again = choose_amp("auto", CPU, cache, FIELDS, fake_timer(9.0, 9.0, calls))
    assert (again.dtype, again.source, again.fp32_s) == (expected, "cache", fp32_s) and len(calls) == 8
    # another image size is another workload: it is probed and cached next to the first
    other = choose_amp("auto", CPU, cache, {**FIELDS, "image_size": 32}, fake_timer(1.0, 3.0, calls))
    assert (other.dtype, other.source) == (None, "probe") and len(read_json(cache)) == 2


def test_unreadable_cache_is_probed_again(tmp_path, bf16_cpu):
    cache = tmp_path / "amp_choice.json"
    cache.write_text("{not json")
    c = choose_amp("auto", CPU, cache, FIELDS, fake_timer(2.0, 1.0, []))
    assert c.source == "probe" and len(read_json(cache)) == 1


@pytest.mark.parametrize("kind", ["train", "infer"])
def test_model_step_timer_leaves_the_model_alone(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = model_step_timer(model, kind, batch_size=4, image_size=16, channels_last=True, device=CPU)
    assert all(step(d) > 0 for d in (None, torch.bfloat16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
