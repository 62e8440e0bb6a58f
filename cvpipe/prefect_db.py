"""A new Prefect home's database, copied from a migrated template instead of built by 100+ migrations.

On a new SQLite database, Prefect's server runs every Alembic migration before it answers. On
the bench machine (2 cores, ``cvpipe server start``) its first start took 8.6 to 9.4 s, a start on
an existing database 3.7 to 3.9 s, and a start on a copy of a migrated one 4.6 to 4.8 s. Every
fresh clone and every new ``PREFECT_HOME`` pays that first start, on its first command's path.

The package ships the empty database that ``prefect server database upgrade`` writes for the
pinned Prefect version (``cvpipe/data/prefect-<version>.db.gz``, 16 KB). A new project
database starts as a copy of it when all of these hold:

- the installed Prefect is the template's version (read from the package metadata, no import);
- the server uses Prefect's default SQLite file in its home (no ``*DATABASE_CONNECTION_URL`` set);
- no database (nor its ``-wal``) exists yet.

Otherwise nothing is copied and the server migrates as before. The server still checks its
migrations at every start, so a copy is only ever a head start, never trusted as the schema.

After changing Prefect's pin, rebuild the template (a test fails until it matches):
``python -m cvpipe.prefect_db build``.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent / "data"
#: Environment variables that point Prefect's server at a database of the user's choosing.
CONNECTION_URL_VARS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("prefect")
    except importlib.metadata.PackageNotFoundError:
        return None


def template_path(version: str) -> Path:
    return TEMPLATE_DIR / f"prefect-{version}.db.gz"


def seed(db: Path, env: dict[str, str] | None = None) -> str | None:
    """Write ``db`` from the template when the conditions in the module docstring hold.

    Args:
        db: the database file the server will open (``<PREFECT_HOME>/prefect.db``).
        env: the server's environment (default: this process's).

    Returns:
        The template's name when ``db`` was written, else None.
    """
    env = os.environ if env is None else env
    if any(env.get(v) for v in CONNECTION_URL_VARS):
        return None
    if db.exists() or Path(f"{db}-wal").exists():
        return None
    version = installed_version()
    template = template_path(version) if version else None
    if template is None or not template.is_file():
        return None
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(template, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        if revision(tmp) is None:  # not a Prefect database: leave the server to build one
            tmp.unlink()
            return None
        os.replace(tmp, db)
    except (OSError, EOFError, gzip.BadGzipFile, sqlite3.Error):
        tmp.unlink(missing_ok=True)
        return None
    return template.name


def revision(db: Path) -> str | None:
    """The Alembic revision a Prefect database records (None when it records none)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        con.close()
    return row[0] if row else None


def migrate_new(db: Path, timeout_s: float = 600) -> None:
    """Create ``db`` with the installed Prefect's migrations (``prefect server database upgrade``)."""
    with tempfile.TemporaryDirectory(prefix="cvpipe-prefect-db-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({"PREFECT_HOME": home,
                    "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}"})
        r = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                           env=env, capture_output=True, text=True, timeout=timeout_s)
        if r.returncode:
            raise RuntimeError(f"prefect server database upgrade failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


def build(dest_dir: Path = TEMPLATE_DIR) -> Path:
    """Write the template for the installed Prefect into ``dest_dir``; returns its path."""
    version = installed_version()
    if version is None:
        raise RuntimeError("Prefect is not installed")
    with tempfile.TemporaryDirectory(prefix="cvpipe-prefect-db-") as tmp:
        db = Path(tmp) / "prefect.db"
        migrate_new(db)
        con = sqlite3.connect(db)
        con.execute("PRAGMA journal_mode=DELETE")
        con.execute("VACUUM")
        con.close()
        dest_dir.mkdir(parents=True, exist_ok=True)
        out = dest_dir / template_path(version).name
        with open(db, "rb") as src, open(out, "wb") as raw:
            # mtime=0 and no file name: no build time or path in the package
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
                shutil.copyfileobj(src, gz)
    for old in dest_dir.glob("prefect-*.db.gz"):
        if old != out:
            old.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["build"]:
        print("usage: python -m cvpipe.prefect_db build   (writes cvpipe/data/prefect-<version>.db.gz)",
              file=sys.stderr)
        return 2
    print(build())
    return 0


if __name__ == "__main__":
    sys.exit(main())
