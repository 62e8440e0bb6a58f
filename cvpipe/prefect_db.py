"""A new Prefect home's database, copied from a migrated template instead of built by 100+ migrations.

On a new SQLite database, Prefect's server runs every Alembic migration, then registers Prefect's
block types, before it answers. On the bench machine (2 cores, ``cvpipe server start``) its first
start took 8.6 to 9.4 s, a start on an existing database 3.7 to 3.9 s. Every fresh clone and every
new ``PREFECT_HOME`` pays that first start, on its first command's path.

The package ships the empty database that ``prefect server database upgrade`` writes for the
pinned Prefect version, with the block types a server's first start registers in it
(``cvpipe/data/prefect-<version>.db.gz``). A new project database starts as a copy of it when
all of these hold:

- the installed Prefect is the template's version (read from the package metadata, no import);
- the server uses Prefect's default SQLite file in its home (no ``*DATABASE_CONNECTION_URL`` set);
- no database (nor its ``-wal`` or ``-journal``) exists yet.

Otherwise nothing is copied and the server migrates as before. The start on a copy skips what
the copy already holds (:data:`FIRST_START`: the migration check and the block registration,
unless the user set those settings); every later start checks both, as Prefect always does.
Tests hold the template to what Prefect builds: the newest migration, the schema of a database
migrated from nothing, and the block types a server registers.

After changing Prefect's pin, rebuild the template (a test fails until it matches):
``python -m cvpipe.prefect_db build``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cvpipe import db_template
from cvpipe.db_template import TEMPLATE_DIR
#: Environment variables that point Prefect's server at a database of the user's choosing.
CONNECTION_URL_VARS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


#: The server's settings for its first start on a copy of the template: what the copy holds already.
FIRST_START = {"PREFECT_API_DATABASE_MIGRATE_ON_START": "false", "PREFECT_API_BLOCKS_REGISTER_ON_START": "false"}
#: The user's own names for those settings (any of them set: theirs applies).
FIRST_START_USER_VARS = (*FIRST_START, "PREFECT_SERVER_DATABASE_MIGRATE_ON_START",
                         "PREFECT_SERVER_REGISTER_BLOCKS_ON_START")


def first_start_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a server's first start on a copy of the template (see :data:`FIRST_START`)."""
    if any(v in env for v in FIRST_START_USER_VARS):
        return env
    return {**env, **FIRST_START}


def installed_version() -> str | None:
    return db_template.installed_version("prefect")


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
    version = installed_version()
    if version is None:
        return None
    template = template_path(version)
    return template.name if db_template.copy_template(template, db) else None


revision = db_template.revision


def _env(home: str, db: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": home, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}"})
    return env


def migrate_new(db: Path, timeout_s: float = 600) -> None:
    """Create ``db`` with the installed Prefect's migrations (``prefect server database upgrade``)."""
    with tempfile.TemporaryDirectory(prefix="cvpipe-prefect-db-") as home:
        r = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                           env=_env(home, db), capture_output=True, text=True, timeout=timeout_s)
        if r.returncode:
            raise RuntimeError(f"prefect server database upgrade failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


#: What a server's first start adds to its new database (``add_block_types`` in Prefect's app).
REGISTER_BLOCKS = """
import asyncio

import prefect.plugins
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration


async def main():
    prefect.plugins.load_prefect_collections()
    session = await provide_database_interface().session()
    async with session:
        await run_block_auto_registration(session=session)


asyncio.run(main())
"""


def register_blocks(db: Path, timeout_s: float = 600) -> None:
    """Register Prefect's block types in ``db`` as a server's first start does."""
    with tempfile.TemporaryDirectory(prefix="cvpipe-prefect-db-") as home:
        r = subprocess.run([sys.executable, "-c", REGISTER_BLOCKS], env=_env(home, db), capture_output=True,
                           text=True, timeout=timeout_s)
    if r.returncode:
        raise RuntimeError(f"registering Prefect's block types failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


def build(dest_dir: Path = TEMPLATE_DIR) -> Path:
    """Write the template for the installed Prefect into ``dest_dir``; returns its path."""
    version = installed_version()
    if version is None:
        raise RuntimeError("Prefect is not installed")
    with tempfile.TemporaryDirectory(prefix="cvpipe-prefect-db-") as tmp:
        db = Path(tmp) / "prefect.db"
        migrate_new(db)
        register_blocks(db)
        return db_template.pack(db, dest_dir / template_path(version).name)


def main(argv: list[str] | None = None) -> int:
    return db_template.build_command("cvpipe.prefect_db", "prefect", build, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
