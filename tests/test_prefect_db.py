"""The migrated Prefect database a new Prefect home starts from (:mod:`cvpipe.prefect_db`)."""

from __future__ import annotations

import gzip
import sqlite3
from pathlib import Path

import pytest

from cvpipe import prefect_db


def _schema(db: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """Every table, index, trigger and view of a SQLite database: (type, name, its SQL's lines), sorted.

    A table's lines are sorted: Alembic's batch migrations rebuild SQLite tables with their
    constraints in no fixed order, so two migrations of the same revision list them differently.
    """
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT type, name, COALESCE(sql, '') FROM sqlite_master").fetchall()
    finally:
        con.close()
    return sorted((kind, name, tuple(sorted(line.strip().rstrip(",").strip() for line in sql.splitlines())))
                  for kind, name, sql in rows)


def _sqlite_head() -> str:
    """The newest Alembic revision of the installed Prefect's SQLite migrations."""
    import prefect.server.database as database
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    base = Path(database.__file__).parent
    cfg = Config(base / "alembic.ini")
    cfg.set_main_option("version_locations", str(base / "_migrations" / "versions" / "sqlite"))
    heads = ScriptDirectory.from_config(cfg).get_heads()
    assert len(heads) == 1, heads
    return heads[0]


def test_the_installed_prefect_has_a_template_at_its_newest_migration(tmp_path):
    version = prefect_db.installed_version()
    template = prefect_db.template_path(version)
    assert template.is_file(), f"no template for Prefect {version}: run python -m cvpipe.prefect_db build"
    assert [p.name for p in prefect_db.TEMPLATE_DIR.glob("prefect-*.db.gz")] == [template.name]
    db = tmp_path / "prefect.db"
    assert prefect_db.seed(db, env={}) == template.name
    assert prefect_db.revision(db) == _sqlite_head()
    con = sqlite3.connect(db)
    try:  # an empty database: no flow, run, block or event of anyone's
        for table in ("flow", "flow_run", "task_run", "block_document", "events", "artifact"):
            assert con.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,), table
    finally:
        con.close()


def test_the_template_is_used_only_for_a_new_default_database_of_its_version(tmp_path, monkeypatch):
    db = tmp_path / "prefect.db"
    # the user's own database server: nothing is written
    assert prefect_db.seed(db, env={"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://db/prefect"}) is None
    assert prefect_db.seed(db, env={"PREFECT_SERVER_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:///x.db"}) is None
    assert not db.exists()
    # an existing database (or one whose data is still in its write-ahead log) is never replaced
    db.write_bytes(b"the user's runs")
    assert prefect_db.seed(db, env={}) is None
    assert db.read_bytes() == b"the user's runs"
    db.unlink()
    Path(f"{db}-wal").write_bytes(b"pages")
    assert prefect_db.seed(db, env={}) is None and not db.exists()
    Path(f"{db}-wal").unlink()
    # another Prefect version: the server migrates as it would without a template
    monkeypatch.setattr(prefect_db, "installed_version", lambda: "0.0.0")
    assert prefect_db.seed(db, env={}) is None and not db.exists()


@pytest.mark.parametrize("content", ["truncated", "not a database"])
def test_a_damaged_template_writes_nothing(tmp_path, monkeypatch, content):
    version = prefect_db.installed_version()
    real = prefect_db.template_path(version).read_bytes()
    monkeypatch.setattr(prefect_db, "TEMPLATE_DIR", tmp_path / "data")
    (tmp_path / "data").mkdir()
    bad = real[: len(real) // 2] if content == "truncated" else gzip.compress(b"SQLite format 3\0" + bytes(4096))
    prefect_db.template_path(version).write_bytes(bad)
    db = tmp_path / "home" / "prefect.db"
    db.parent.mkdir()
    assert prefect_db.seed(db, env={}) is None
    assert list(db.parent.iterdir()) == []


@pytest.mark.slow
def test_the_template_has_the_schema_prefect_migrations_build(tmp_path):
    """The same tables, indexes, triggers and views, column for column, as a database the installed
    Prefect migrates from nothing (``prefect server database upgrade``)."""
    fresh = tmp_path / "fresh.db"
    prefect_db.migrate_new(fresh)
    seeded = tmp_path / "seeded.db"
    assert prefect_db.seed(seeded, env={})
    assert prefect_db.revision(seeded) == prefect_db.revision(fresh)
    assert _schema(seeded) == _schema(fresh)
