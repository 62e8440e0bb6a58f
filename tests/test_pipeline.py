"""The whole-DAG flow: schedules, DVC agreement and the quickstart."""

from __future__ import annotations

import pytest


def test_serve_creates_a_deployment_with_its_cron_schedule(prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline_deployment

    deployment = pipeline_deployment("nightly-test", "15 3 * * 1-5", "params.yaml", "Europe/Paris")
    deployment_id = deployment.apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    d = asyncio.run(read())
    assert d.name == "nightly-test"
    assert d.parameters == {"params_file": "params.yaml", "force": False}
    assert len(d.schedules) == 1
    sched = d.schedules[0].schedule
    assert sched.cron == "15 3 * * 1-5" and sched.timezone == "Europe/Paris"


def test_bad_cron_is_rejected():
    from flows.pipeline import pipeline_deployment

    with pytest.raises(ValueError):
        pipeline_deployment("x", "not a cron", "params.yaml")
