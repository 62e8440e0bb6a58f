"""Prefect flow for the ``download`` stage."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from cvpipe.params import load_params
from flows.tracking import stage_run
from tasks.download import download

download_task = task(download, name="download", retries=0)


@flow(name="download", flow_run_name="download", log_prints=True)
def download_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """Fetch and verify the dataset, classifier weights, detector files and sample photos."""
    p = load_params(params_file, overrides)
    with stage_run(p, "download") as run:
        facts = download_task(p)
        run.set_tags({k: v for k, v in facts.items() if v is not None})
    return facts
