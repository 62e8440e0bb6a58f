"""The output folder of the ``detect`` stage, replaced as one set.

A run writes every output into a staging folder next to ``paths.detect`` and swaps it in only
when every file is written, so a reader never sees files of two runs, and a failed run (a bad
shard, a full disk, a kill) leaves the previous set as it was. Because the folder is replaced as a
whole, the stage refuses one holding anything it did not write, and inputs that lie inside it; the
leftovers of a killed run are repaired by the next.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from cvpipe.errors import UserError
from cvpipe.io import atomic_write_bytes
from cvpipe.layout import ANNOTATED_DIR, DETECTIONS
from cvpipe.params import ParamsError
from tasks.detect_inputs import InputImage
from tasks.detect_outputs import OUTPUT_FILES

DVC_GITIGNORE = ".gitignore"  # DVC lists the outputs it tracks in this folder's .gitignore
STAGING, ASIDE = "staging", "old"  # sibling folders ".<name>.staging-<hex>" and ".<name>.old-<hex>"
#: a temporary file left by cvpipe.io.atomic_path (".<name>.<random>.tmp") when a run was killed
ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


class OutputConflict(ParamsError):
    """``paths.detect`` cannot be replaced without loss: it holds entries this stage did not
    write, or inputs lie inside it."""


class DiskFull(OSError, UserError):
    """The disk filled up while the outputs were staged; the previous outputs are intact.

    An ``OSError`` with ``errno.ENOSPC``, so code that recognises a full disk still does; its
    text is the message alone, without the ``[Errno 28]`` prefix.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def _listing(names: list[str], most: int = 5) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _atomic_leftover(name: str) -> str | None:
    """The file name a killed atomic write was for (``.<name>.<random>.tmp``); None for other names."""
    m = ATOMIC_TMP.match(name)
    return m["name"] if m else None


def annotated_names(out_dir: Path) -> set[str]:
    """The annotated-image file names that ``out_dir/detections.jsonl`` refers to; empty when
    the file is missing or unreadable."""
    names = set()
    try:
        with open(out_dir / DETECTIONS, encoding="utf-8") as fh:
            for line in filter(str.strip, fh):
                rec = json.loads(line)
                annotated = rec.get("annotated") if isinstance(rec, dict) else None
                if isinstance(annotated, str) and annotated.startswith(f"{ANNOTATED_DIR}/"):
                    names.add(annotated.removeprefix(f"{ANNOTATED_DIR}/"))
    except (OSError, ValueError):  # missing, unreadable or not JSON lines: it vouches for nothing
        return set()
    return names


def foreign_entries(folder: Path, manifest: bool = True) -> list[str]:
    """The entries of an output folder that this stage did not write, relative to it
    (folders end with ``/``).

    Ours are the output files, ``images/`` holding ``.jpg`` files, DVC's ``.gitignore`` and
    the temporary files of a killed atomic write. With ``manifest``, an image must also be
    named in ``detections.jsonl``: a user's photo in ``images/`` is not ours.
    """
    def label(entry: Path, prefix: str = "") -> str:
        return f"{prefix}{entry.name}/" if entry.is_dir() else f"{prefix}{entry.name}"

    foreign = []
    images = folder / ANNOTATED_DIR
    own_images = images.is_dir() and not images.is_symlink()
    for entry in sorted(folder.iterdir()):
        name = _atomic_leftover(entry.name) or entry.name
        ours = (entry == images and own_images) or (entry.is_file() and name in (*OUTPUT_FILES, DVC_GITIGNORE))
        if not ours:
            foreign.append(label(entry))
    if own_images:
        listed = annotated_names(folder) if manifest else None
        for entry in sorted(images.iterdir()):
            annotated = entry.suffix == ".jpg" and (listed is None or entry.name in listed)
            if not (entry.is_file() and (annotated or _atomic_leftover(entry.name) is not None)):
                foreign.append(label(entry, f"{ANNOTATED_DIR}/"))
    return foreign


def check_inputs_outside(items: list[InputImage], out_dir: Path) -> None:
    """Refuse inputs inside ``out_dir``: each run replaces that folder, inputs included.

    Raises:
        OutputConflict: naming the output folder and the first inputs inside it.
    """
    roots = {Path(os.path.abspath(out_dir)), Path(os.path.realpath(out_dir))}
    inside = [it.path for it in items
              if any(Path(f).is_relative_to(r) for f in (os.path.abspath(it.path), it.file) for r in roots)]
    if inside:
        raise OutputConflict(
            f"detect.input: {len(inside)} of the {len(items)} inputs lie inside the output folder paths.detect "
            f"{out_dir} ({_listing(inside, 3)}), which each run replaces as a whole; copy them elsewhere or set "
            "paths.detect to another folder")


def check_output_folder(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that the stage cannot replace without losing someone's files.

    Raises:
        OutputConflict: ``out_dir`` is not a folder, or holds entries this stage did not write (named).
    """
    if not os.path.lexists(out_dir):
        return
    if not Path(out_dir).is_dir():
        raise OutputConflict(f"paths.detect {out_dir} is not a folder: set paths.detect to a folder of its own")
    foreign = foreign_entries(Path(out_dir))
    if foreign:
        raise OutputConflict(
            f"paths.detect {out_dir} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} this stage "
            f"did not write ({_listing(foreign)}); each detect run replaces that folder as a whole, so move them "
            "out or set paths.detect to a folder of its own")


def _sibling(out: Path, kind: str) -> Path:
    """A fresh name ``.<name>.<kind>-<hex>`` next to ``out`` (same file system, so renames are atomic)."""
    return out.parent / f".{out.name}.{kind}-{secrets.token_hex(4)}"


def _leftovers(out: Path, kind: str) -> list[Path]:
    """The existing ``.<name>.<kind>-*`` folders next to ``out``."""
    prefix = f".{out.name}.{kind}-"
    if not out.parent.is_dir():
        return []
    return sorted(e for e in out.parent.iterdir() if e.name.startswith(prefix) and e.is_dir() and not e.is_symlink())


def recover_outputs(out_dir: Path, keep: Path | None = None) -> None:
    """Repair what a run killed while staging or publishing left behind.

    When ``out_dir`` is missing but a previous set was put aside (a kill between the two
    renames of :func:`publish_outputs`), that set is restored. Leftover staging and put-aside
    folders are then removed, except ``keep`` and any holding something this stage did not write.
    """
    out = Path(os.path.realpath(out_dir))
    asides = _leftovers(out, ASIDE)
    if asides and not os.path.lexists(out):
        newest = max(asides, key=lambda d: d.stat().st_mtime)
        os.rename(newest, out)
        asides.remove(newest)
    for folder in (*_leftovers(out, STAGING), *asides):
        if (keep is None or folder.name != keep.name) and not foreign_entries(folder, manifest=False):
            shutil.rmtree(folder)


def publish_outputs(staging: Path, out_dir: Path) -> None:
    """Swap the complete set in ``staging`` in as ``out_dir``, then remove the previous set.

    DVC's ``.gitignore`` of the previous set is carried over. A kill between the two renames
    leaves ``out_dir`` missing and the previous set aside, which :func:`recover_outputs` restores.

    Raises:
        OutputConflict: ``out_dir`` gained entries this stage did not write while the run went on.
    """
    check_output_folder(out_dir)
    out = Path(os.path.realpath(out_dir))
    if (out / DVC_GITIGNORE).is_file():
        atomic_write_bytes(staging / DVC_GITIGNORE, (out / DVC_GITIGNORE).read_bytes())
    aside = None
    if os.path.lexists(out):
        aside = _sibling(out, ASIDE)
        os.rename(out, aside)
    try:
        os.rename(staging, out)
    except OSError:
        if aside is not None:
            os.rename(aside, out)
        raise
    if aside is not None:
        # what cannot be removed now (a busy file on a network disk) goes in the next run's recovery
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_outputs(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh staging folder next to ``out_dir`` (:func:`tasks.detect.plan` creates it);
    publish it when the block ends normally, remove it when the block fails, so the previous set stays.

    Raises:
        DiskFull: the disk filled up (ENOSPC) while the set was written.
    """
    staging = _sibling(Path(os.path.realpath(out_dir)), STAGING)
    try:
        yield staging
        publish_outputs(staging, out_dir)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFull(errno.ENOSPC, f"disk full while writing detection outputs to {out_dir}; "
                           "the previous outputs are intact", str(out_dir)) from err
        raise
    finally:
        if staging.is_dir():  # not published: this run's partial set goes
            shutil.rmtree(staging)
