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


#: Prefect's own settings for flow-run heartbeats; when the user sets one, every flow run sends them.
HEARTBEAT_VARS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


def heartbeat_configured() -> bool:
    """Whether the user chose a flow-run heartbeat frequency: in the environment, or in a Prefect
    profile or settings file (a value other than Prefect's default)."""
    if any(v in os.environ for v in HEARTBEAT_VARS):
        return True
    from prefect.settings import get_current_settings
    from prefect.settings.models.flows import FlowsSettings

    default = FlowsSettings.model_fields["heartbeat_frequency"].default
    return get_current_settings().flows.heartbeat_frequency not in (default, None)


@contextlib.contextmanager
def without_heartbeat() -> Iterator[None]:
    """Flow runs started inside this block send no heartbeat, unless the user configured one.

    A flow run's heartbeat is an event every few minutes (Prefect 3.9: 180 s by default) that an
    automation the user creates can watch to mark runs whose process died as crashed; Prefect's
    documentation for that automation has the user set ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, and
    then every run sends them. Otherwise nothing reads them. The price is paid when the flow ends:
    Prefect joins the heartbeat thread, which sleeps in 1-second steps, so a synchronous flow run
    ends up to a second late (0.3 to 1.1 s measured on a one-second flow).
    """
    if heartbeat_configured():
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@contextlib.contextmanager
def subflows() -> Iterator[None]:
    """Flows called inside this block are subflows: they send no heartbeat of their own (their
    parent's process sends its run's, when heartbeats are configured: :func:`without_heartbeat`)."""
    with without_heartbeat():
        yield
