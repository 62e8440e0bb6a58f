"""The inputs of the ``detect`` stage: the images ``detect.input`` names (a folder, a ``.txt``
list or a glob), numbered and given unique annotated-image names, and split into shards.

Inputs that lie inside ``paths.detect`` are refused by :func:`tasks.detect_staging.check_inputs_outside`
(the output folder is replaced as a whole).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tasks.images import IMAGE_SUFFIXES


class InputImage(NamedTuple):
    """One input: ``image_id`` (1-based position in the input list), ``path`` as listed
    (written to the outputs), ``file`` (absolute, what a worker opens) and ``out_name``
    (its annotated JPEG's file name, unique within the run)."""

    image_id: int
    path: str
    file: str
    out_name: str


def list_inputs(spec: str) -> list[Path]:
    """The images named by ``detect.input``.

    An entry named like an image that is not a readable file (a directory called
    ``x.jpg``, a symbolic link loop, a dangling link) is still an input, so it becomes a
    failure with its reason instead of vanishing without a record.

    Args:
        spec: a folder (its entries with an image suffix, sorted, not recursive), a ``.txt``
            file (one path per line; blank lines and ``#`` comments skipped; relative paths
            are relative to the list file's folder; every listed path is an input, so a
            missing one becomes a failure), or a glob (``**`` recursive; the files it
            matches and the other entries with an image suffix; a plain file path is a glob
            that matches itself).

    Raises:
        FileNotFoundError: nothing matches ``spec``.
    """
    src = Path(spec)
    if src.is_dir():
        paths = sorted(f for f in src.iterdir() if not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
    elif src.suffix.lower() == ".txt" and src.is_file():
        lines = (ln.strip() for ln in src.read_text().splitlines())
        paths = [src.parent / ln for ln in lines if ln and not ln.startswith("#")]
    else:
        paths = [Path(f) for f in sorted(glob.glob(spec, recursive=True))
                 if Path(f).is_file() or Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise FileNotFoundError(f"detect.input {spec!r}: no images found (expected a folder, a .txt list or a glob)")
    return paths


def plan_inputs(paths: list[Path]) -> list[InputImage]:
    """Number the inputs and give each an annotated-image name unique within the run.

    The name is ``<stem>.jpg``; when an earlier input already took it, ``<stem>_<image_id>.jpg``,
    then ``<stem>_<image_id>_2.jpg``... (``x/a_3.jpg``, ``x/a.jpg``, ``y/a.jpg`` give ``a_3.jpg``,
    ``a.jpg``, ``a_3_2.jpg``). Names are compared case-insensitively, as a macOS or Windows
    disk would. Paths are made absolute without failing: a symbolic link loop stays an
    input, and reading it is what fails.
    """
    seen: set[str] = set()
    items = []
    for i, path in enumerate(paths, start=1):
        name, k = f"{path.stem}.jpg", 1
        while name.casefold() in seen:
            name = f"{path.stem}_{i}.jpg" if k == 1 else f"{path.stem}_{i}_{k}.jpg"
            k += 1
        seen.add(name.casefold())
        # os.path.realpath, unlike Path.resolve, returns a looping link unresolved instead of raising
        items.append(InputImage(i, str(path), os.path.realpath(path), name))
    return items


def split_shards(items: list, n: int) -> list[list]:
    """Split ``items`` into at most ``n`` contiguous, non-empty shards of near-equal size."""
    n = max(1, min(n, len(items)))
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
