"""The project's Prefect server process: Prefect's own server app, with busy-database answers retried
inside the server instead of by the client two seconds later.

Prefect's server answers 503 when a request's SQLite transaction failed with ``database is locked``:
two writers met (in the pipeline: a subflow's start, inserting its task run, while the server's
own services record the other stages' task-run states). The transaction was rolled back, and the
client sends the same request again after its exponential back-off: 2 s, then 4 s, ... (Prefect's
known SQLite behaviour, PrefectHQ/prefect#18934). On the bench machine about one pipeline run in
two lost those 2 s at the start of a stage on its critical path, some runs twice.

:class:`RetryBusy` sends such a request to the app again after 0.05, 0.1, 0.2 and 0.4 s (with
jitter), as the client would, only sooner; a collision of two writers lasts milliseconds. When
every attempt is answered 503, the client gets that 503 and applies its own back-off as before,
so nothing is given up. Only ``/api`` HTTP requests are replayed, only for a 503 that asks for no
particular wait (no ``Retry-After``, no ``Prefect-Maintenance``), and the request body is kept
(Prefect's API bodies are small JSON) so each attempt reads the same request.

``python -m cvpipe.prefect_app --host H --port P`` runs what ``prefect server start`` runs in its
foreground (``create_app(final=True)`` under uvicorn, the same settings), wrapped in
:class:`RetryBusy`. :mod:`cvpipe.prefect_server` starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

#: Pauses (s) before each further attempt at a request the app answered 503 (busy database).
PAUSES_S = (0.05, 0.1, 0.2, 0.4)


class RetryBusy:
    """ASGI middleware: run an ``/api`` request again, after a short pause, while the app answers it
    503 without asking for a wait (see the module docstring); the last answer goes to the client."""

    def __init__(self, app: ASGIApp, pauses: Sequence[float] = PAUSES_S, prefix: str = "/api"):
        self.app, self.pauses, self.prefix = app, tuple(pauses), prefix
        self.replayed = 0  # requests that were answered 503 at least once (for tests and the log)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before its body arrived
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        for attempt in range(len(self.pauses) + 1):
            last = attempt == len(self.pauses)
            if await self._attempt(scope, body, receive, send, deliver_503=last):
                return
            if attempt == 0:
                self.replayed += 1
            await asyncio.sleep(self.pauses[attempt] * random.uniform(0.75, 1.25))

    async def _attempt(self, scope, body: bytes, receive: Receive, send: Send, deliver_503: bool) -> bool:
        """One attempt; True when its answer went to the client, False when it was a 503 to retry."""
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        answer: dict[str, bool] = {}

        async def replay() -> Message:  # the body once, then the connection's own events (disconnect)
            return pending.pop() if pending else await receive()

        async def forward(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["sent"] = deliver_503 or not _busy(message)
            if answer.get("sent"):
                await send(message)

        try:  # on a copy: routing rewrites the scope's path in place (Starlette's Mount)
            await self.app(dict(scope), replay, forward)
        except Exception:
            # Starlette raises the handled error again after its 503 went out (for the server's log,
            # where Prefect filters busy-database errors out): for an answer held back, that is all.
            if answer.get("sent", True):
                raise
        return answer.get("sent", True)


def _busy(start: Message) -> bool:
    """A 503 that asks for no particular wait: Prefect's answer to a busy database."""
    if start.get("status") != 503:
        return False
    names = {bytes(k).lower() for k, _ in start.get("headers", [])}
    return not names & {b"retry-after", b"prefect-maintenance"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cvpipe.prefect_app", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    # Importing Prefect's server and building its app leaves about 300,000 objects the collector
    # tracks, nearly all kept: its 700 passes meanwhile freed about 6,800. Without them the server
    # answered in 4.2 to 4.6 s instead of 4.7 to 5.2 s (a new database, 2 cores, 4 starts each,
    # alternated). Frozen afterwards, they are left out of the long-running server's later passes.
    gc.disable()
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
        PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
        PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
        PREFECT_SERVER_LOGGING_LEVEL,
    )

    print(f"cvpipe: Prefect's server app with busy-database retries {PAUSES_S} s, on {args.host}:{args.port}",
          flush=True)
    app = RetryBusy(create_app(final=True))  # (it collects once, at its end)
    gc.freeze()
    gc.enable()
    uvicorn.run(app=app, host=args.host, port=args.port,
                timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
                ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
                ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
                log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower())


if __name__ == "__main__":
    main()
