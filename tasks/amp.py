"""``train.amp: auto``: bf16 autocast only where it is measured to be faster on the machine at hand.

A CPU flag list is not enough: AVX512-BF16 without AMX, for one, computes bf16 convolutions
more slowly than fp32 on some models and sizes. So the first time a (CPU, flags, torch, backbone,
image size, batch, kind of step) combination is seen, a few steps of the actual model at the
actual size run in fp32 and under bf16 autocast, interleaved, and the faster one is kept; the
decision and its timings are cached in a small JSON file (``<paths.cache>/amp_choice.json``,
outside DVC's outputs) and reused.

CUDA keeps bf16 where the device supports it; ``amp: bf16`` and ``amp: off`` are never second-guessed.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cvpipe.io import read_json, write_json

log = logging.getLogger(__name__)

#: bf16 must be at least this much faster (per step) to be chosen: on a tie fp32 keeps its precision.
MARGIN = 0.05
#: CPU flags that decide whether bf16 can be native at all, and that make a probe's result specific.
BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")

#: (kind, autocast dtype or None) -> seconds of one step; kind is "train" or "infer".
StepTimer = Callable[[torch.dtype | None], float]


@dataclass(frozen=True)
class AmpChoice:
    """The autocast dtype chosen, why, and the probe's median step times when one ran."""

    dtype: torch.dtype | None
    source: str  # explicit | cuda | flags | probe | cache
    fp32_s: float | None = None
    bf16_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """For metrics.json and the log: {"amp", "source", "fp32_step_s", "bf16_step_s", "bf16_speedup"}."""
        speedup = self.fp32_s / self.bf16_s if self.fp32_s and self.bf16_s else None
        return {"amp": dtype_name(self.dtype), "source": self.source, "fp32_step_s": self.fp32_s,
                "bf16_step_s": self.bf16_s, "bf16_speedup": speedup}


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "off"


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and which of :data:`BF16_FLAGS` it has (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor() or platform.machine(), "flags": []}
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                 platform.machine())
    flags_line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    present = set(flags_line.split(":", 1)[1].split()) if ":" in flags_line else set()
    return {"cpu": model, "flags": [f for f in BF16_FLAGS if f in present]}


def cpu_may_have_native_bf16(flags: list[str]) -> bool:
    """AMX or AVX512-BF16: bf16 may be faster; without either it is emulated and always much slower."""
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))


def decide(fp32_s: float, bf16_s: float, margin: float = MARGIN) -> torch.dtype | None:
    """bf16 when its step is more than ``margin`` faster than fp32's, else full precision."""
    return torch.bfloat16 if bf16_s < fp32_s * (1 - margin) else None


def probe_key(fields: dict[str, Any]) -> str:
    """A stable text key of the fields that make a probe's result valid."""
    return json.dumps(fields, sort_keys=True)


def interleaved_medians(step: StepTimer, pairs: int = 3) -> tuple[float, float]:
    """Median seconds of a step in fp32 and under bf16 autocast: one untimed warm-up each, then
    ``pairs`` alternating (fp32, bf16) steps, so that a change of load hits both alike."""
    step(None), step(torch.bfloat16)
    fp32, bf16 = [], []
    for _ in range(pairs):
        fp32.append(step(None))
        bf16.append(step(torch.bfloat16))
    return statistics.median(fp32), statistics.median(bf16)


def model_step_timer(model: nn.Module, kind: str, batch_size: int, image_size: int, channels_last: bool,
                     device: torch.device, features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
                     ) -> StepTimer:
    """A timer of one step of a *copy* of ``model`` on random input (the model itself is untouched).

    Args:
        kind: ``train`` (forward, backward, Adam step on the trainable weights) or ``infer``
            (``features(model, x)``, or the full forward, under ``inference_mode``).
    """
    net = copy.deepcopy(model).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device).contiguous(memory_format=fmt)
    params = [q for q in net.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-6) if kind == "train" and params else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(dtype: torch.dtype | None) -> float:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if opt is not None:
                net.train()
                out = net(x)
                y = torch.zeros(len(out), dtype=torch.long, device=device)
                loss = F.cross_entropy(out.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                net.eval()
                with torch.inference_mode():
                    (features or (lambda m, t: m(t)))(net, x)
        sync()
        return time.perf_counter() - t0

    return step


def choose_amp(amp: str, device: torch.device, cache_path: Path | None, fields: dict[str, Any],
               timer: Callable[[], StepTimer] | None, pairs: int = 3) -> AmpChoice:
    """The autocast dtype for ``train.amp``.

    Args:
        amp: ``off`` / ``bf16`` (taken as asked) or ``auto``.
        device: CUDA: bf16 where supported. CPU: fp32 without AMX / AVX512-BF16 (emulated bf16),
            else the probe's (or the cache's) verdict.
        cache_path: the JSON cache of earlier probes; None: no cache (the probe always runs).
        fields: what the probe's result depends on besides the machine (backbone, image size, batch, kind).
        timer: builds the step timer (called only when a probe runs); None: no probe, fp32 unless cached.
        pairs: interleaved (fp32, bf16) pairs timed.

    Returns:
        The choice, with the probe's median step times when a probe ran or was cached.
    """
    if amp == "off":
        return AmpChoice(None, "explicit")
    if amp == "bf16":
        return AmpChoice(torch.bfloat16, "explicit")
    if device.type == "cuda":
        return AmpChoice(torch.bfloat16 if torch.cuda.is_bf16_supported() else None, "cuda")
    info = cpu_info()
    if not cpu_may_have_native_bf16(info["flags"]):
        return AmpChoice(None, "flags")
    key = probe_key({**info, "torch": torch.__version__, "threads": torch.get_num_threads(), **fields})
    cache = _read_cache(cache_path)
    if key in cache:
        hit = cache[key]
        return AmpChoice(torch.bfloat16 if hit["amp"] == "bfloat16" else None, "cache", hit["fp32_step_s"],
                         hit["bf16_step_s"])
    if timer is None:
        return AmpChoice(None, "flags")
    fp32_s, bf16_s = interleaved_medians(timer(), pairs)
    choice = AmpChoice(decide(fp32_s, bf16_s), "probe", fp32_s, bf16_s)
    log.info("amp auto: %s (fp32 %.3f s, bf16 %.3f s a step; bf16 %.2fx) for %s", dtype_name(choice.dtype),
             fp32_s, bf16_s, fp32_s / bf16_s, fields)
    if cache_path is not None:
        cache[key] = {**choice.as_dict(), "fields": fields}
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_path, cache)
    return choice


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        log.warning("amp auto: ignoring unreadable %s (%s); the probe runs again", path, err)
        return {}
    return data if isinstance(data, dict) else {}
