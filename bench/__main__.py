"""``python -m bench``: the seed's loops against ours, side by side, on this machine.

    python -m bench [--profile cpu|gpu] [--out bench/results.json] [--markdown BENCHMARKS.md] [--allow-load]
                    [--parts feature_extractor fine_tune detect orchestration memory serve gpu_throughput]
                    [--work /tmp/cvpipe-bench]

``--profile gpu`` runs ``gpu_throughput`` (bench/gpu.py: ResNet-18 at 224 px on device-resident
CIFAR-10-sized data, bf16 + channels_last) unless ``--parts`` says otherwise. A run is refused when
the 1-minute load average is above 0.5 (``--allow-load`` overrides).

Writes every measured number to ``--out`` and replaces the generated table in ``--markdown``
(between the ``bench:table`` markers; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.suite import PARTS, PROFILES, SELF_CONTAINED, machine, markdown_table, prepare, sizes_dict

MAX_LOAD = 0.5  # 1-minute load average above which a run is refused without --allow-load
BEGIN, END = "<!-- bench:table:begin -->", "<!-- bench:table:end -->"


def run(profile: str, parts: list[str], work: Path, device: str = "cpu") -> dict[str, Any]:
    """Prepare the inputs and run ``parts``; returns {"profile", "sizes", "machine", "seconds", <part>: {...}}."""
    sizes = PROFILES[profile]
    t0 = time.perf_counter()
    inp = prepare(work, sizes, device, downloads=not set(parts) <= SELF_CONTAINED)
    results: dict[str, Any] = {"profile": profile, "sizes": sizes_dict(sizes), "machine": machine(),
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    seconds = {"prepare": time.perf_counter() - t0}
    for name in parts:
        t = time.perf_counter()
        results[name] = PARTS[name](sizes, inp)
        seconds[name] = time.perf_counter() - t
        print(f"bench {name}: {seconds[name]:.1f} s: {json.dumps(results[name])}", flush=True)
    results["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return results


def report(results: dict[str, Any]) -> str:
    """The generated block of BENCHMARKS.md: machine line, table, run time."""
    m = results["machine"]
    return "\n".join([
        BEGIN,
        f"Profile `{results['profile']}`, {results['date']}: {m['cpu']}, {m['cores']} cores "
        f"({m['torch_threads']} torch threads), GPU {m['gpu'] or 'none'}; Python {m['python']}, "
        f"torch {m['torch']}, OpenCV {m['opencv']}; CPU flags {' '.join(m['flags']) or 'none of interest'}; "
        f"load average at start {m['load_average'][0]:.2f}. Whole run {sum(results['seconds'].values()):.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in results['seconds'].items())}).",
        "",
        markdown_table(results),
        END,
    ])


def write_markdown(path: Path, block: str) -> None:
    """Replace the generated block of ``path`` (or create the file around it)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + "\n\n" + BEGIN + "\n" + END + "\n"
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    path.write_text(before + block + after)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                    help="sizes: cpu (<= 15 min on 2 cores), gpu (larger, on CUDA), tiny (seconds, for tests)")
    ap.add_argument("--out", type=Path, default=Path("bench/results.json"))
    ap.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=None,
                    help="default: every part but gpu_throughput; with --profile gpu: gpu_throughput")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cvpipe-bench"), help="downloads, features, samples")
    ap.add_argument("--allow-load", action="store_true",
                    help=f"run even when the 1-minute load average is above {MAX_LOAD} (the figures are then noise)")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    if load > MAX_LOAD and not args.allow_load:
        sys.exit(f"bench: the machine is busy (1-minute load average {load:.2f} > {MAX_LOAD}): its figures would "
                 "measure the other work. Wait for it, or pass --allow-load to run anyway.")
    parts = args.parts or (["gpu_throughput"] if args.profile == "gpu" else [k for k in PARTS if k != "gpu_throughput"])
    results = run(args.profile, parts, args.work, "cuda" if args.profile == "gpu" else "cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(args.markdown, report(results))
    print(report(results))


if __name__ == "__main__":
    main()
