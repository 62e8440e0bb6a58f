"""Prefect flows: one per stage (``flows.<stage>.<stage>_flow``), the whole DAG, the sweep."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
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


#: Prefect's own settings for flow-run heartbeats; when the user sets one, it applies to subflows too.
HEARTBEAT_VARS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextlib.contextmanager
def subflows() -> Iterator[None]:
    """Flows called inside this block are subflows: they send no heartbeat of their own.

    A flow run's heartbeat tells the server its process is alive; a subflow runs in its parent's
    process, whose run already sends one. Each heartbeat thread costs up to a second when its flow
    ends (Prefect joins it), which is what a subflow costs: the pipeline runs eight of them.
    """
    if any(v in os.environ for v in HEARTBEAT_VARS):
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
