"""Packaged SQLite templates: an empty, migrated database that a new store starts as a copy of.

Prefect's server (:mod:`cvpipe.prefect_db`) and MLflow's tracking store (:mod:`cvpipe.mlflow_db`)
each build a new SQLite database by running every Alembic migration they have, which costs seconds
on the first command of a fresh clone. The package ships the result for the pinned version of each,
gzipped; this module writes a copy (never over an existing database), reads the Alembic revision a
database records, and packs a template reproducibly.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent / "data"


def installed_version(dist: str) -> str | None:
    """The installed version of the distribution ``dist`` (package metadata, no import)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def revision(db: Path) -> str | None:
    """The Alembic revision a database records (None when it records none or is no database)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        con.close()
    return row[0] if row else None


def fresh(db: Path) -> bool:
    """No database at ``db`` yet: neither the file nor its write-ahead log or rollback journal."""
    return not any(Path(f"{db}{suffix}").exists() for suffix in ("", "-wal", "-journal"))


def copy_template(template: Path, db: Path) -> bool:
    """Write ``db`` as a copy of the gzipped ``template`` unless a database is there already; True when
    written. A template that is damaged or records no Alembic revision writes nothing."""
    if not template.is_file() or not fresh(db):
        return False
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(template, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        if revision(tmp) is None:
            tmp.unlink()
            return False
        if not fresh(db):  # another process made one meanwhile: theirs stays
            tmp.unlink()
            return False
        os.replace(tmp, db)
    except (OSError, EOFError, gzip.BadGzipFile, sqlite3.Error):
        tmp.unlink(missing_ok=True)
        return False
    return True


def pack(db: Path, out: Path) -> Path:
    """Compact ``db`` (no journal, vacuumed) and gzip it to ``out`` with no time or file name inside."""
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA journal_mode=DELETE")
        con.execute("VACUUM")
    finally:
        con.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(db, "rb") as src, open(out, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            shutil.copyfileobj(src, gz)
    for old in out.parent.glob(out.name.split("-")[0] + "-*.db.gz"):
        if old != out:
            old.unlink()
    return out


def build_command(module: str, name: str, build: Callable[[], Path], args: list[str]) -> int:
    """``python -m <module> build``: rebuild the template of ``name`` for the installed version."""
    if args != ["build"]:
        print(f"usage: python -m {module} build   (writes cvpipe/data/{name}-<version>.db.gz)", file=sys.stderr)
        return 2
    print(build())
    return 0
