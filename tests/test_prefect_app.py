"""The server-side retry of Prefect's busy-database answers (:class:`cvpipe.prefect_app.RetryBusy`).

The app under it is built as Prefect's is: a FastAPI API mounted under ``/api`` whose handler for
unexpected errors answers 503 for a retryable database error (Starlette then raises the error again,
for the server's log), as ``prefect.server.api.server`` does for SQLite's ``database is locked``.
"""

from __future__ import annotations

import asyncio
import sqlite3

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cvpipe import prefect_app


def _prefect_like(fail_times: int, status: int = 503, headers: dict | None = None):
    """An app whose POST /api/things/ fails ``fail_times`` times, then echoes its JSON body."""
    calls: list[dict] = []

    async def handler(request: Request, exc: Exception):
        return JSONResponse({"exception_message": "Service Unavailable"}, status_code=status, headers=headers)

    # as in Prefect's create_app: the handler of unexpected errors belongs to the mounted API app
    api = FastAPI(exception_handlers={Exception: handler})

    @api.post("/things/")
    async def things(request: Request):
        body = await request.json()
        calls.append(body)
        if len(calls) <= fail_times:
            raise sqlite3.OperationalError("database is locked")
        return {"echo": body, "calls": len(calls)}

    @api.get("/health")
    async def health():
        calls.append({})
        raise sqlite3.OperationalError("database is locked")

    root = FastAPI(exception_handlers={Exception: handler})
    root.mount("/api", api)

    @root.post("/elsewhere")
    async def elsewhere():
        calls.append({})
        raise sqlite3.OperationalError("database is locked")

    return root, calls


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch):
    monkeypatch.setattr(prefect_app, "PAUSES_S", (0.0, 0.0, 0.0, 0.0))


class _Client:
    """Requests to ``RetryBusy(app)`` in this process (ASGI, no socket)."""

    def __init__(self, app):
        self.app = prefect_app.RetryBusy(app, pauses=prefect_app.PAUSES_S)

    def _send(self, method: str, path: str, **kw) -> httpx.Response:
        async def go():
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                return await c.request(method, path, **kw)

        return asyncio.run(go())

    def post(self, path: str, **kw) -> httpx.Response:
        return self._send("POST", path, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return self._send("GET", path, **kw)


def _client(app) -> _Client:
    return _Client(app)


def test_a_busy_answer_is_retried_in_the_server_with_the_same_request():
    app, calls = _prefect_like(fail_times=2)
    client = _client(app)
    r = client.post("/api/things/", json={"name": "train-fine_tune", "n": 3})
    assert r.status_code == 200, r.text
    assert r.json() == {"echo": {"name": "train-fine_tune", "n": 3}, "calls": 3}
    assert calls == [{"name": "train-fine_tune", "n": 3}] * 3  # every attempt read the whole body
    assert client.app.replayed == 1


def test_when_every_attempt_is_busy_the_client_gets_the_503_and_backs_off_itself():
    app, calls = _prefect_like(fail_times=100)
    r = _client(app).post("/api/things/", json={"a": 1})
    assert r.status_code == 503 and r.json() == {"exception_message": "Service Unavailable"}
    assert len(calls) == len(prefect_app.PAUSES_S) + 1


@pytest.mark.parametrize("status, headers, path", [
    (500, None, "/api/things/"),  # an internal error is not a busy database
    (503, {"Retry-After": "3"}, "/api/things/"),  # the app asked for its own wait
    (503, {"Prefect-Maintenance": "true"}, "/api/things/"),
    (503, None, "/elsewhere"),  # outside the API
])
def test_only_busy_api_answers_are_retried(status, headers, path):
    app, calls = _prefect_like(fail_times=100, status=status, headers=headers)
    r = _client(app).post(path, json={"a": 1})
    assert r.status_code == status
    assert len(calls) == 1
    if headers:
        assert all(r.headers[k] == v for k, v in headers.items())


def test_a_get_is_retried_too_and_a_healthy_answer_passes_untouched():
    app, calls = _prefect_like(fail_times=0)
    client = _client(app)
    assert client.get("/api/health").status_code == 503 and len(calls) == len(prefect_app.PAUSES_S) + 1
    calls.clear()
    r = client.post("/api/things/", json={"b": 2})
    assert r.status_code == 200 and r.json()["calls"] == 1 and client.app.replayed == 1
