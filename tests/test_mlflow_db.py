"""The migrated MLflow tracking database a new project store starts from (:mod:`cvpipe.mlflow_db`)."""

from __future__ import annotations

import gzip
import sqlite3
import time
from pathlib import Path

import pytest

from cvpipe import mlflow_db
from tests.helpers import sqlite_schema, write_params


def _uri(db: Path) -> str:
    return f"sqlite:///{db}"


def test_the_installed_mlflow_has_a_template_at_its_newest_migration(tmp_path):
    from mlflow.store.db.utils import _get_latest_schema_revision

    version = mlflow_db.installed_version()
    template = mlflow_db.template_path(version)
    assert template.is_file(), f"no template for MLflow {version}: run python -m cvpipe.mlflow_db build"
    assert [p.name for p in mlflow_db.TEMPLATE_DIR.glob("mlflow-*.db.gz")] == [template.name]
    db = tmp_path / "mlflow.db"
    assert mlflow_db.seed(_uri(db), env={}) == template.name
    assert mlflow_db.revision(db) == _get_latest_schema_revision()
    con = sqlite3.connect(db)
    try:  # empty: not even MLflow's Default experiment, which would name the build's folder and time
        for table in ("experiments", "runs", "metrics", "params", "registered_models", "model_versions"):
            assert con.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,), table
    finally:
        con.close()


def test_a_new_project_store_opens_from_the_template_with_its_own_default_experiment(tmp_path, monkeypatch):
    from cvpipe.params import load_params
    from flows.tracking import configure

    monkeypatch.chdir(tmp_path)
    seeded = []
    real_seed = mlflow_db.seed
    monkeypatch.setattr(mlflow_db, "seed", lambda uri, env=None: seeded.append(real_seed(uri, env)) or seeded[-1])
    p = load_params(write_params(tmp_path))
    before = time.time() * 1000
    client, exp_id = configure(p)
    assert seeded == [mlflow_db.template_path(mlflow_db.installed_version()).name]
    # MLflow made the Default experiment of this store itself: this project's folder, created now
    default = client.get_experiment("0")
    assert default.name == "Default"
    assert Path(default.artifact_location) == tmp_path / "mlruns" / "0"
    assert before - 1000 <= default.creation_time <= time.time() * 1000
    # and the project's experiment, where its runs go, as on a store MLflow built itself
    exp = client.get_experiment(exp_id)
    assert exp.name == p.mlflow.experiment and exp_id != "0"
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "test_acc", 0.5)
    assert client.get_run(run.info.run_id).data.metrics == {"test_acc": 0.5}
    # a second open finds the database: nothing is copied again
    configure(p)
    assert seeded[1:] == [None]


def test_the_template_is_used_only_for_a_new_sqlite_store_of_its_version(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    assert mlflow_db.seed("http://127.0.0.1:5000", env={}) is None
    assert mlflow_db.seed("postgresql://db/mlflow", env={}) is None
    assert mlflow_db.seed("sqlite:///:memory:", env={}) is None
    assert mlflow_db.seed(_uri(db), env={"MLFLOW_ENABLE_WORKSPACES": "true"}) is None
    assert not db.exists()
    # an existing database (or one whose pages are still in its journal or write-ahead log) stays as it is
    db.write_bytes(b"the user's runs")
    assert mlflow_db.seed(_uri(db), env={}) is None
    assert db.read_bytes() == b"the user's runs"
    db.unlink()
    for suffix in ("-wal", "-journal"):
        Path(f"{db}{suffix}").write_bytes(b"pages")
        assert mlflow_db.seed(_uri(db), env={}) is None and not db.exists()
        Path(f"{db}{suffix}").unlink()
    # another MLflow version: MLflow builds its database as it would without a template
    monkeypatch.setattr(mlflow_db, "installed_version", lambda: "0.0.0")
    assert mlflow_db.seed(_uri(db), env={}) is None and not db.exists()


@pytest.mark.parametrize("content", ["truncated", "not a database"])
def test_a_damaged_template_writes_nothing(tmp_path, monkeypatch, content):
    version = mlflow_db.installed_version()
    real = mlflow_db.template_path(version).read_bytes()
    monkeypatch.setattr(mlflow_db, "TEMPLATE_DIR", tmp_path / "data")
    (tmp_path / "data").mkdir()
    bad = real[: len(real) // 2] if content == "truncated" else gzip.compress(b"SQLite format 3\0" + bytes(4096))
    mlflow_db.template_path(version).write_bytes(bad)
    store = tmp_path / "mlruns"
    store.mkdir()
    assert mlflow_db.seed(_uri(store / "mlflow.db"), env={}) is None
    assert list(store.iterdir()) == []


@pytest.mark.slow
def test_the_template_has_the_schema_mlflow_builds(tmp_path):
    """The same tables, indexes, triggers and views, column for column, as a store the installed MLflow
    creates from nothing."""
    fresh = tmp_path / "fresh.db"
    mlflow_db.create_new(fresh)
    seeded = tmp_path / "seeded.db"
    assert mlflow_db.seed(_uri(seeded), env={})
    assert mlflow_db.revision(seeded) == mlflow_db.revision(fresh)
    assert sqlite_schema(seeded) == sqlite_schema(fresh)
