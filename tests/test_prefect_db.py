"""The migrated Prefect database a new Prefect home starts from (:mod:`cvpipe.prefect_db`)."""

from __future__ import annotations

import gzip
import sqlite3
from pathlib import Path

import pytest

from cvpipe import prefect_db
from tests.helpers import sqlite_schema


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
    assert sqlite_schema(seeded) == sqlite_schema(fresh)


def _post(url: str, body: dict) -> list[dict]:
    import json
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with opener.open(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_a_server_on_the_template_offers_the_block_types_of_prefects_own_first_start(tmp_path, monkeypatch):
    """The first start on a copy skips block registration: the copy must hold what Prefect would have
    registered. Compared with a server whose new database Prefect builds itself (named by URL, so
    nothing is copied), through the API."""
    from cvpipe import prefect_server

    monkeypatch.setenv("CVPIPE_PREFECT_STARTUP_TIMEOUT", "300")
    catalog = {}
    for kind in ("copy", "prefect's own"):
        home = tmp_path / kind.replace(" ", "_").replace("'", "") / ".prefect"
        if kind == "prefect's own":
            monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{home / 'own.db'}")
        try:
            state = prefect_server.start(home=home, say=lambda line: None)
            log = prefect_server.log_path(home).read_text()
            assert ("copied from prefect-" in log) == (kind == "copy"), log
            types = _post(f"{state.url}/block_types/filter", {})
            schemas = _post(f"{state.url}/block_schemas/filter", {})
        finally:
            prefect_server.stop(home)
        catalog[kind] = (sorted(t["slug"] for t in types), sorted(s["checksum"] for s in schemas))
    assert catalog["copy"][0] and catalog["copy"] == catalog["prefect's own"]


def test_the_first_start_on_a_copy_skips_what_the_copy_holds_unless_the_user_chose():
    env = prefect_db.first_start_env({"PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin", "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
                   "PREFECT_API_BLOCKS_REGISTER_ON_START": "false"}
    for var in prefect_db.FIRST_START_USER_VARS:  # the user's own setting, under any of its names, applies
        assert prefect_db.first_start_env({var: "true"}) == {var: "true"}
