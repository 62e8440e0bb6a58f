"""A new MLflow tracking database, copied from a migrated template instead of built by 50+ migrations.

MLflow creates a new SQLite tracking store by running every Alembic migration it has. On the
bench machine (2 cores, load 0.45) opening a new store took 1.13 to 1.20 s, a copy of the template
0.45 to 0.49 s (in a fresh process, MLflow imported; 3 rounds each, interleaved). Every fresh
clone pays that on its first command, on the path before its first stage.

The package ships the empty database MLflow writes for the pinned MLflow version
(``cvpipe/data/mlflow-<version>.db.gz``), less MLflow's ``Default`` experiment: MLflow creates
that one itself when it opens the copy (with this project's artifact folder and the time of
creation), as it does for a new database. The store (``mlflow.tracking_uri``) starts as a copy
of it when all of these hold:

- the installed MLflow is the template's version (read from the package metadata, no import);
- the store is a ``sqlite:///`` file and no database (nor its ``-wal`` or ``-journal``) exists yet;
- MLflow's workspaces are off (``MLFLOW_ENABLE_WORKSPACES`` unset), as for every project store.

Otherwise nothing is copied and MLflow creates its database as before. MLflow checks the
schema's revision at every open, so a copy is never trusted as the schema.

After changing MLflow's pin, rebuild the template (a test fails until it matches):
``python -m cvpipe.mlflow_db build``.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from cvpipe import db_template
from cvpipe.db_template import TEMPLATE_DIR

SQLITE_PREFIX = "sqlite:///"


def installed_version() -> str | None:
    return db_template.installed_version("mlflow")


def template_path(version: str) -> Path:
    return TEMPLATE_DIR / f"mlflow-{version}.db.gz"


def seed(uri: str, env: dict[str, str] | None = None) -> str | None:
    """Write the database of the tracking URI ``uri`` (``sqlite:////abs/path.db``) from the template
    when the conditions in the module docstring hold.

    Returns:
        The template's name when the database was written, else None.
    """
    env = os.environ if env is None else env
    if not uri.startswith(SQLITE_PREFIX) or env.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true"):
        return None
    path = uri[len(SQLITE_PREFIX):].partition("?")[0]
    if not path or path == ":memory:":
        return None
    version = installed_version()
    if version is None:
        return None
    template = template_path(version)
    return template.name if db_template.copy_template(template, Path(path)) else None


revision = db_template.revision


def create_new(db: Path, timeout_s: float = 600) -> None:
    """Create ``db`` as the installed MLflow does when a client first opens a new SQLite store."""
    code = ("import sys; from mlflow.tracking import MlflowClient; "
            "MlflowClient(sys.argv[1]).search_experiments(max_results=1)")
    with tempfile.TemporaryDirectory(prefix="cvpipe-mlflow-db-") as cwd:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        r = subprocess.run([sys.executable, "-c", code, f"{SQLITE_PREFIX}{db}"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=timeout_s)
    if r.returncode:
        raise RuntimeError(f"creating an MLflow store failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


def build(dest_dir: Path = TEMPLATE_DIR) -> Path:
    """Write the template for the installed MLflow into ``dest_dir``; returns its path."""
    version = installed_version()
    if version is None:
        raise RuntimeError("MLflow is not installed")
    with tempfile.TemporaryDirectory(prefix="cvpipe-mlflow-db-") as tmp:
        db = Path(tmp) / "mlflow.db"
        create_new(db)
        con = sqlite3.connect(db)
        try:  # the Default experiment names the build folder and time: MLflow makes the project's own
            with con:
                con.execute("DELETE FROM experiments WHERE experiment_id = 0")
        finally:
            con.close()
        return db_template.pack(db, dest_dir / template_path(version).name)


def main(argv: list[str] | None = None) -> int:
    return db_template.build_command("cvpipe.mlflow_db", "mlflow", build, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
