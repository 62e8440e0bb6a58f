"""Prefect flow for the ``preprocess`` stage."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from cvpipe.layout import CARD
from cvpipe.params import load_params
from flows.tracking import stage_run
from tasks.preprocess import preprocess

preprocess_task = task(preprocess, name="preprocess")


@flow(name="preprocess", flow_run_name="preprocess", log_prints=True)
def preprocess_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """Turn the raw dataset into uint8 train / val / test arrays and a dataset card."""
    p = load_params(params_file, overrides)
    with stage_run(p, "preprocess") as run:
        card = preprocess_task(p)
        run.log_metrics({f"n_{s}": n for s, n in card["counts"].items()})
        run.set_tags({"data_hash": card["data_hash"], "num_classes": len(card["classes"])})
        run.log_artifact(p.paths.processed / CARD)
    return card
