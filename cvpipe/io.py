"""File helpers shared by every stage: atomic writes, hashing, safe archive extraction.

Every file the pipeline produces is written to a temporary file in the same
folder and renamed into place, so a killed process never leaves a half-written
file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file is created with the usual mode (0666 less the umask, as ``open`` does),
    not ``mkstemp``'s 0600: the outputs are data the user shares and versions.
    On an exception the temporary file is removed and ``path`` is left untouched.

    Raises:
        OSError: ``errno.ENOSPC`` (or ``EDQUOT``) naming ``path`` when the disk filled up while writing it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temporary(path, suffix)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as err:
        if _disk_full(err, path.parent):
            code = err.errno if isinstance(err, OSError) else errno.ENOSPC
            raise OSError(code, os.strerror(code), str(path)) from err
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def _create_temporary(path: Path, suffix: str) -> Path:
    """Create ``.<name>.<random>.tmp<suffix>`` next to ``path`` (mode 0666 & ~umask), closed."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def _disk_full(err: BaseException, folder: Path) -> bool:
    """True when ``err`` comes from a full disk: ENOSPC / EDQUOT, or a writer that lost the errno
    (torch.save raises a RuntimeError) while the file system has no space left."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(err, RuntimeError):
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Save arrays to an uncompressed .npz atomically (loadable without pickle)."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array of an .npz with pickle disabled."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def file_hash(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def array_hash(*arrays: np.ndarray) -> str:
    """sha256 over the bytes, dtypes and shapes of arrays (content hash for caches and cards)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class ChecksumError(ValueError):
    """A file's digest does not match the expected one."""


class CorruptFile(ValueError):
    """A file exists but cannot be read as what it should be (truncated, or another format)."""


def verify_file(path: str | Path, expected: str, algorithm: str = "sha256", name: str | None = None) -> None:
    """Raise :class:`ChecksumError` when ``path``'s digest differs from ``expected``."""
    actual = file_hash(path, algorithm)
    if actual != expected.lower():
        raise ChecksumError(
            f"{name or Path(path).name}: {algorithm} mismatch for {path}: expected {expected}, got {actual}"
        )


def safe_extract(archive: str | Path, dest: str | Path, members: list[str] | None = None) -> list[Path]:
    """Extract a tar archive with the ``data`` filter (no absolute paths, no ``..``, no links out).

    Args:
        archive: a .tar / .tar.gz file.
        dest: destination folder.
        members: names to extract; all when None.

    Returns:
        The extracted paths.

    Raises:
        tarfile.FilterError: a member would escape ``dest`` or is otherwise unsafe.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(archive) as tar:
        chosen = tar.getmembers() if members is None else [tar.getmember(m) for m in members]
        for m in chosen:
            tar.extract(m, dest, filter="data")
            out.append(dest / m.name)
    return out
