"""The preprocess stage: splits, stratification, determinism, and every dataset reader."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from cvpipe import layout
from cvpipe.io import read_json
from cvpipe.params import load_params
from tasks import download as dl
from tasks import preprocess as pp
from tasks.splits import load_split
from tests.helpers import make_cifar10_archive, write_params


def test_digits_splits_are_stratified_sized_and_deterministic(tmp_path):
    p = load_params(write_params(tmp_path))
    dl.export_digits(p.paths.raw)
    ds1, ds2 = pp.build_dataset(p), pp.build_dataset(p)
    n = {s: len(y) for s, (_, y) in ds1.splits.items()}
    assert sum(n.values()) == 1797
    assert n["test"] == int(np.ceil(1797 * p.preprocess.test_fraction))
    assert n["val"] == int(np.ceil((1797 - n["test"]) * p.preprocess.val_fraction))
    for s in layout.SPLITS:
        np.testing.assert_array_equal(ds1.splits[s][0], ds2.splits[s][0])
        np.testing.assert_array_equal(ds1.splits[s][1], ds2.splits[s][1])
        x, y = ds1.splits[s]
        assert x.dtype == np.uint8 and x.shape[1:] == (1, 8, 8) and y.dtype == np.int64
        frac = np.bincount(y, minlength=10) / len(y)
        assert np.abs(frac - 0.1).max() < 0.03, (s, frac)
    other = pp.build_dataset(load_params(write_params(tmp_path, {"seed": 7})))
    assert not np.array_equal(other.splits["val"][1], ds1.splits["val"][1])


def test_stage_writes_arrays_and_card(tmp_path):
    p = load_params(write_params(tmp_path))
    dl.export_digits(p.paths.raw)
    card = pp.preprocess(p)
    on_disk = read_json(p.paths.processed / layout.CARD)
    assert on_disk == card
    assert card["classes"] == [str(i) for i in range(10)]
    assert card["counts"] == {"train": 1293, "val": 144, "test": 360}
    x, y = load_split(p.paths.processed, "val")
    assert x.shape == (144, 1, 8, 8) and on_disk["class_counts"]["val"] == np.bincount(y).tolist()
    from cvpipe.io import array_hash

    assert card["sha256"]["val"] == array_hash(x, y)


def test_cifar10_from_binary_archive(tmp_path):
    p = load_params(write_params(tmp_path, {"data.dataset": "cifar10"}))
    p.paths.raw.mkdir(parents=True)
    tx, ty, vx, vy = make_cifar10_archive(p.paths.raw / layout.CIFAR10_ARCHIVE, per_batch=40)
    ds = pp.build_dataset(p)
    assert len(ds.splits["train"][1]) + len(ds.splits["val"][1]) == 200
    np.testing.assert_array_equal(ds.splits["test"][0], vx)
    assert ds.classes[0] == "airplane"
    # Every validation image is one of the training images, unchanged.
    train_rows = {r.tobytes() for r in tx}
    assert all(r.tobytes() in train_rows for r in ds.splits["val"][0])


def test_truncated_cifar_member_is_reported(tmp_path):
    import io
    import tarfile

    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        info.size = 100
        tar.addfile(info, io.BytesIO(b"x" * 100))
    with pytest.raises(ValueError, match="not a multiple"):
        pp.read_cifar10_binary(path)


def _imagefolder(root, counts):
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = np.full((20, 24, 3), 40 if cls == "apple" else 200, np.uint8)
            img += rng.integers(0, 20, img.shape, dtype=np.uint8)
            cv2.imwrite(str(root / cls / f"{i}.png"), img)


def test_imagefolder_reads_converts_and_resizes(tmp_path):
    root = tmp_path / "imagefolder"
    _imagefolder(root, {"apple": 10, "banana": 10})
    # Unusual but valid formats are converted: grayscale, RGBA, 16-bit.
    cv2.imwrite(str(root / "apple" / "gray.png"), np.full((30, 30), 40, np.uint8))
    cv2.imwrite(str(root / "apple" / "rgba.png"), np.full((30, 30, 4), 40, np.uint8))
    cv2.imwrite(str(root / "banana" / "deep.png"), np.full((30, 30, 3), 200 * 257, np.uint16))
    p = load_params(write_params(tmp_path, {"data.dataset": "imagefolder", "preprocess.image_size": 16}))
    x, y, classes = pp.read_imagefolder(root, 16)
    assert classes == ["apple", "banana"]
    assert x.shape == (23, 3, 16, 16) and np.bincount(y).tolist() == [12, 11]
    assert x[y == 0].mean() < 80 and x[y == 1].mean() > 180
    card = pp.preprocess(p)
    assert sum(card["counts"].values()) == 23 and card["image_shape"] == [3, 16, 16]


def test_imagefolder_with_an_empty_class_folder_fails_clearly(tmp_path):
    root = tmp_path / "imagefolder"
    _imagefolder(root, {"apple": 3})
    (root / "pear").mkdir()
    with pytest.raises(ValueError, match="class folder 'pear' has no images"):
        pp.read_imagefolder(root, 16)


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"hello, not an image", "not a decodable image"),
                                              (b"\xff\xd8\xff\xe0" + b"\0" * 20, "not a decodable image")])
def test_unreadable_images_are_named(tmp_path, content, reason):
    root = tmp_path / "imagefolder"
    _imagefolder(root, {"apple": 2})
    (root / "apple" / "broken.jpg").write_bytes(content)
    with pytest.raises(ValueError, match=rf"broken\.jpg: {reason}"):
        pp.read_imagefolder(root, 16)


# --------------------------------------------------------------------------- imagefolder layout and sizes


def _imagefolder_params(tmp_path, **pre):
    return load_params(write_params(tmp_path, {"data.dataset": "imagefolder", "preprocess.image_size": 16,
                                               **{f"preprocess.{k}": v for k, v in pre.items()}}))


def test_imagefolder_with_one_class_is_refused(tmp_path):
    _imagefolder(tmp_path / "imagefolder", {"apple": 30})
    with pytest.raises(pp.DatasetError, match=r"1 class \('apple'\); a classifier needs at least 2 classes"):
        pp.build_dataset(_imagefolder_params(tmp_path))


@pytest.mark.parametrize("nested, n_images", [("x.jpg", 0), ("more/deeper", 3)])
def test_imagefolder_sub_folders_in_a_class_are_refused_with_their_image_count(tmp_path, nested, n_images):
    root = tmp_path / "imagefolder"
    _imagefolder(root, {"apple": 10, "banana": 10})
    (root / "banana" / nested).mkdir(parents=True)
    for i in range(n_images):
        cv2.imwrite(str(root / "banana" / nested / f"{i}.png"), np.zeros((8, 8, 3), np.uint8))
    top = nested.split("/")[0]
    with pytest.raises(pp.DatasetError, match=rf"class folder 'banana' holds a sub-folder '{re.escape(top)}' "
                                             rf"with {n_images} image\(s\)"):
        pp.read_imagefolder(root, 16)


def test_imagefolder_images_outside_class_folders_are_refused(tmp_path):
    root = tmp_path / "imagefolder"
    _imagefolder(root, {"apple": 3, "banana": 3})
    cv2.imwrite(str(root / "stray.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(pp.DatasetError, match=r"1 image\(s\) directly in the folder \(first: 'stray.png'\)"):
        pp.read_imagefolder(root, 16)


def test_imagefolder_hidden_entries_and_other_files_are_ignored(tmp_path):
    root = tmp_path / "imagefolder"
    _imagefolder(root, {"apple": 3, "banana": 3})
    (root / "apple" / ".thumbs").mkdir()
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    files, y, classes = pp.list_imagefolder(root)
    assert classes == ["apple", "banana"] and len(files) == 6 and y.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_too_small_for_the_splits_says_how_many_are_needed(tmp_path, monkeypatch):
    """Checked on the labels, before any image is decoded; the number given is exact: one image
    less per class fails, that many succeed with every class in train, val and test."""
    p = _imagefolder_params(tmp_path)
    need = pp.min_images_per_class(2, [p.preprocess.test_fraction, p.preprocess.val_fraction], p.seed)
    assert need is not None and need > 2
    root = tmp_path / "imagefolder"
    _imagefolder(root, {"apple": need - 1, "banana": need - 1})

    def no_decoding(path, *args, **kw):
        raise AssertionError("an image was decoded before the split sizes were checked")

    with monkeypatch.context() as m:
        m.setattr(pp, "read_image", no_decoding)
        with pytest.raises(pp.DatasetError) as info:
            pp.build_dataset(p)
    assert str(info.value) == (
        f"imagefolder {p.data.imagefolder}: too few images for the splits (preprocess.test_fraction=0.2, "
        f"preprocess.val_fraction=0.1): each of the 2 classes needs at least {need} images; "
        f"'apple' has {need - 1}, 'banana' has {need - 1}")

    for cls, value in (("apple", 40), ("banana", 200)):
        cv2.imwrite(str(root / cls / "extra.png"), np.full((20, 24, 3), value, np.uint8))
    ds = pp.build_dataset(p)
    for s in layout.SPLITS:
        assert set(ds.splits[s][1].tolist()) == {0, 1}, s


def test_stage_outputs_get_the_usual_file_mode(tmp_path):
    """The arrays and the card are 0644 under umask 022 (0666 & ~umask, as any new file), not 0600."""
    import os

    p = load_params(write_params(tmp_path))
    dl.export_digits(p.paths.raw)
    old = os.umask(0o022)
    try:
        pp.preprocess(p)
    finally:
        os.umask(old)
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in p.paths.processed.iterdir()}
    assert modes == {name: "0o644" for name in ("train.npz", "val.npz", "test.npz", layout.CARD)}, modes
