"""Prefect flows: one per stage (``flows.<stage>.<stage>_flow``), the whole DAG, the sweep."""

from __future__ import annotations

import importlib
from typing import Any

from cvpipe.layout import STAGES


def stage_flow(stage: str) -> tuple[Any, dict[str, Any]]:
    """The stage's own flow and its extra arguments, from the DVC stage name ("train@fine_tune").

    The flow's module is imported here, when it is about to run: the import takes seconds.
    """
    name, _, item = stage.partition("@")
    if name not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    fn = getattr(importlib.import_module(f"flows.{name}"), f"{name}_flow")
    return fn, ({"mode": item} if name == "train" else {})
