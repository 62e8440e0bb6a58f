"""The benchmark's code runs end to end on the tiny profile and reports finite numbers for both variants.

Nothing here is timed against a target: CI does not benchmark (issue 6).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.__main__ import BEGIN, END, report, run, write_markdown
from bench.suite import table_rows

FAST_PARTS = ["feature_extractor", "fine_tune", "detect", "memory"]  # orchestration starts Prefect: ~1 min


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return run("tiny", FAST_PARTS, tmp_path_factory.mktemp("bench"))


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values)


def test_feature_extractor_both_variants(tiny):
    a = tiny["feature_extractor"]
    assert _finite(a["seed_seconds"], a["ours_seconds"], a["speedup"], a["ours_feature_images_per_s"])
    assert a["seed_seconds"] > 0 and a["ours_seconds"] > 0
    assert 0 <= a["seed_acc"] <= 1 and 0 <= a["ours_acc"] <= 1
    assert (a["n_train"], a["n_test"], a["epochs"]) == (40, 20, 2)
    # seed, ours and the bare forward interleaved: one ratio per pair, the median and spread over them
    assert len(a["speedups"]) == len(a["of_limits"]) == a["pairs"] == 3
    assert min(a["speedups"]) <= a["speedup"] <= max(a["speedups"]) and _finite(a["speedup_spread"])
    assert _finite(a["bare_forward_images_per_s"], a["of_limit"]) and a["of_limit"] > 0
    assert a["amp"]["amp"] in ("off", "bfloat16")


def test_fine_tune_both_variants(tiny):
    b = tiny["fine_tune"]
    assert _finite(b["seed_images_per_s"], b["ours_images_per_s"], b["speedup"])
    assert b["seed_images_per_s"] > 0 and b["ours_images_per_s"] > 0
    assert 0 <= b["seed_acc"] <= 1 and 0 <= b["ours_acc"] <= 1
    assert len(b["speedups"]) == len(b["of_limits"]) == 3
    assert _finite(b["bare_step_images_per_s"], b["of_limit"], b["of_limit_spread"]) and b["of_limit"] > 0


def test_a_busy_machine_is_refused(monkeypatch, capsys):
    import bench.__main__ as main

    monkeypatch.setattr(main.os, "getloadavg", lambda: (3.2, 2.0, 1.0))
    monkeypatch.setattr(main, "run", lambda *a, **k: pytest.fail("a busy machine was benchmarked"))
    monkeypatch.setattr("sys.argv", ["bench", "--parts", "fine_tune"])
    with pytest.raises(SystemExit, match=r"load average 3\.20 > 0\.5.*--allow-load"):
        main.main()


def test_machine_records_load_and_flags(tiny):
    m = tiny["machine"]
    assert len(m["load_average"]) == 3 and isinstance(m["flags"], list)


def test_detect_both_variants_find_the_same_photos(tiny):
    c = tiny["detect"]
    assert _finite(c["raw_forward_images_per_s"], c["seed_images_per_s"], c["ours_images_per_s"],
                   c["fraction_of_raw"], c["speedup"])
    assert c["images"] == 2
    # both backends and both resize modes, interleaved, each with its own median and spread
    assert {"raw opencv", "raw torch", "ours opencv stretch", "ours opencv letterbox", "ours torch stretch",
            "ours torch letterbox", "seed loop"} <= set(c["variants"])
    assert all(_finite(v["median"], v["spread"]) for v in c["variants"].values())


def test_memory_probe_reads_peak_rss(tiny):
    e = tiny["memory"]
    assert e["images"] == 2000 and e["steps"] == 1
    # the generated set alone is 2000 x 3 x 32 x 32 bytes; the peak holds it, the model and a step
    assert e["peak_rss_mb"] >= e["rss_after_model_mb"] >= e["rss_after_data_mb"] > 0
    assert math.isclose(e["dataset_mb"], 2000 * 3 * 32 * 32 / 2**20)


def test_table_and_markdown_block(tiny, tmp_path: Path):
    rows = table_rows(tiny)
    # a: 3, b: 3, c: 6 (ours vs seed, the bare network, the 4 other backend / resize / shard variants), e: 1 (no d)
    assert len(rows) == 13 and all(len(r) == 7 for r in rows)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## Notes\nkept\n")
    write_markdown(md, report(tiny))
    text = md.read_text()
    assert "old" not in text and "intro" in text and "## Notes\nkept" in text
    assert text.count(BEGIN) == 1 and "| a. feature extractor" in text and "peak RSS MiB" in text


def test_gpu_profile_runs_on_cpu_at_a_tiny_size(tmp_path):
    """`--profile gpu`'s part, on the CPU with tiny sizes: device-resident generated data, no downloads."""
    res = run("tiny", ["gpu_throughput"], tmp_path)
    g = res["gpu_throughput"]
    assert (g["backbone"], g["amp"], g["n_images"], g["image_size"]) == ("resnet18", "bfloat16", 64, 32)
    assert g["feature_dim"] == 512 and g["measured_images"] == 16
    assert _finite(g["fe_images_per_s"], g["ft_images_per_s"], g["projected_seed_ft_s"], g["ft_loss"])
    # 5 epochs of 50,000 at the measured fine-tune rate, plus a 10,000-image test pass
    assert g["projected_seed_ft_s"] == pytest.approx(250_000 / g["ft_images_per_s"] + 10_000 / g["fe_images_per_s"])
    assert not (tmp_path / "backbone").exists()
    rows = table_rows(res)
    assert len(rows) == 2 and "projected seed experiment" in rows[1][1]
