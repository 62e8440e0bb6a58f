"""The benchmark's code on the tiny profile: it runs end to end and reports finite numbers, and it
measures what it says: the seed's loop and ours train on the same images, our feature extractor runs
the backbone once per image where the seed's runs it every epoch, the sides run interleaved after a
warm-up round, and a busy machine is refused unless ``--allow-load``.

Nothing here is timed against a target: CI does not benchmark (issue 6).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.__main__ import BEGIN, END, report, run, write_markdown
from bench.suite import PROFILES, table_rows

FAST_PARTS = ["feature_extractor", "fine_tune", "detect", "memory"]  # orchestration starts Prefect: ~1 min
TINY = PROFILES["tiny"]
#: The functions that run one side of parts a and b once, and the side each runs.
SIDES = {"_seed_fe": "seed", "_ours_fe": "ours", "_bare_forward": "bare",
         "_seed_ft": "seed", "_ours_ft": "ours", "_bare_step": "bare", "_ours_runtime": "amp probe"}


def _record_sides(mp: pytest.MonkeyPatch) -> list[dict]:
    """Wrap the sides of parts a and b; each call appends {"fn", "side", "forward_images", "trained_images",
    "steps"} in call order. ``forward_images``: images through the models the call builds (a forward
    pre-hook on each); ``trained_images`` and ``steps``: what its training loops were given."""
    import bench.suite as suite

    calls: list[dict] = []

    def wrap(name):
        real = getattr(suite, name)

        def side(*args, **kwargs):
            calls.append({"fn": name, "side": SIDES[name], "forward_images": 0, "trained_images": 0, "steps": 0})
            return real(*args, **kwargs)

        mp.setattr(suite, name, side)

    for name in SIDES:
        wrap(name)
    real_model, real_seed_train, real_epoch = suite._fresh_model, suite.seed_train, suite.train_one_epoch

    def fresh_model(*args, **kwargs):
        model, rec = real_model(*args, **kwargs), calls[-1]
        model.register_forward_pre_hook(lambda _, inputs: rec.update(forward_images=rec["forward_images"]
                                                                      + len(inputs[0])))
        return model

    def seed_train(*args, **kwargs):
        out = real_seed_train(*args, **kwargs)
        calls[-1].update(trained_images=calls[-1]["trained_images"] + out["images"],
                         steps=calls[-1]["steps"] + out["steps"])
        return out

    def train_one_epoch(model, opt, x, y, **kwargs):
        calls[-1].update(trained_images=calls[-1]["trained_images"] + len(x),
                         steps=calls[-1]["steps"] - (-len(x) // kwargs["batch_size"]))
        return real_epoch(model, opt, x, y, **kwargs)

    mp.setattr(suite, "_fresh_model", fresh_model)
    mp.setattr(suite, "seed_train", seed_train)
    mp.setattr(suite, "train_one_epoch", train_one_epoch)
    return calls


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, list[dict]]:
    with pytest.MonkeyPatch.context() as mp:
        calls = _record_sides(mp)
        return run("tiny", FAST_PARTS, tmp_path_factory.mktemp("bench")), calls


@pytest.fixture(scope="module")
def tiny(tiny_run) -> dict:
    """The results of the tiny profile's run."""
    return tiny_run[0]


@pytest.fixture(scope="module")
def calls(tiny_run) -> list[dict]:
    """The sides of parts a and b as the tiny run called them (:func:`_record_sides`)."""
    return tiny_run[1]


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


def test_allow_load_runs_on_a_busy_machine_and_a_quiet_one_needs_no_flag(monkeypatch, tmp_path):
    import bench.__main__ as main

    class Ran(Exception):
        pass

    ran = []

    def fake_run(profile, parts, work, device="cpu"):
        ran.append((profile, parts, device))
        raise Ran  # stop before anything is written

    monkeypatch.setattr(main, "run", fake_run)
    for load, flags in ((3.2, ["--allow-load"]), (0.5, []), (0.1, [])):
        monkeypatch.setattr(main.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        monkeypatch.setattr("sys.argv", ["bench", "--parts", "fine_tune", "--work", str(tmp_path), *flags])
        with pytest.raises(Ran):
            main.main()
    assert ran == [("cpu", ["fine_tune"], "cpu")] * 3


def test_a_and_b_run_seed_ours_and_the_limit_interleaved_after_a_warm_up_round(calls):
    """Each part resolves our runtime (amp auto's probe) once, then runs (seed, ours, limit) in an
    untimed warm-up round and ``pairs`` timed rounds."""
    rounds = TINY.pairs + 1
    assert [c["fn"] for c in calls] == (["_ours_runtime"] + ["_seed_fe", "_ours_fe", "_bare_forward"] * rounds
                                        + ["_ours_runtime"] + ["_seed_ft", "_ours_ft", "_bare_step"] * rounds)


def test_seed_and_ours_train_on_the_same_number_of_images(calls):
    def trained(fn, key="trained_images"):
        return [c[key] for c in calls if c["fn"] == fn]

    rounds = TINY.pairs + 1
    # a: every epoch over the training set, the seed on images and ours (the head) on their features
    assert trained("_seed_fe") == trained("_ours_fe") == [TINY.epochs * TINY.n_train] * rounds
    # b: the same steps of the same batch size
    assert trained("_seed_ft") == trained("_ours_ft") == [TINY.ft_steps * TINY.ft_batch_size] * rounds
    assert trained("_seed_ft", "steps") == trained("_ours_ft", "steps") == [TINY.ft_steps] * rounds


def test_ours_runs_the_backbone_once_per_image_and_the_seed_every_epoch(calls):
    n = TINY.n_train + TINY.n_test
    forwards = {fn: [c["forward_images"] for c in calls if c["fn"] == fn] for fn in ("_seed_fe", "_ours_fe",
                                                                                      "_bare_forward")}
    assert forwards["_ours_fe"] == [n] * (TINY.pairs + 1)  # the cache is emptied before each round
    assert forwards["_seed_fe"] == [TINY.epochs * TINY.n_train + TINY.n_test] * (TINY.pairs + 1)
    # the limit: the same images in whole batches, after one warm-up batch
    assert forwards["_bare_forward"] == [(-(-n // TINY.batch_size) + 1) * TINY.batch_size] * (TINY.pairs + 1)


def test_detection_variants_are_warmed_up_then_run_in_rotated_rounds():
    from bench.detect_speed import measure, ratios

    order = []
    seconds = {"raw opencv": iter([1.0, 1.0, 2.0, 1.0]), "ours opencv stretch": iter([2.0] * 4),
               "seed loop": iter([4.0] * 4)}

    def variant(name):
        def call() -> float:
            order.append(name)
            return next(seconds[name])
        return call

    res = ratios(measure({k: variant(k) for k in seconds}, n_images=8, repeats=3))
    a, b, c = seconds
    assert order == [a, b, c] + [a, b, c] + [b, c, a] + [c, a, b]  # the warm-up round, then rotated rounds
    raw, ours = res[a], res["ours opencv stretch"]
    assert raw["warmup_s"] == 1.0 and raw["images_per_s"] == [8.0, 4.0, 8.0]
    assert raw["median"] == 8.0 and raw["spread"] == 0.5
    assert ours["images_per_s"] == [4.0] * 3 and ours["of_raw"] == 0.5 and ours["vs_seed"] == 2.0


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
