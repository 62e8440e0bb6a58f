"""The sample photos of ``download``: scikit-image's bundled photos (and, for ``digits``, one digit)
written as an offline input set for ``detect`` and ``cvpipe predict``.

``paths.samples`` may be a folder the user also keeps other files in: the files written are
recorded in ``samples_manifest.json`` (with their writer), and only recorded files are ever
replaced or removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from cvpipe.errors import UserError
from cvpipe.io import atomic_path, file_hash, load_npz, write_json
from cvpipe.layout import SAMPLES_MANIFEST

log = logging.getLogger(__name__)

SAMPLES_WRITER = "cvpipe download"  # the manifest's ``written_by``


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
