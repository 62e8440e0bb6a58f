"""``cvpipe server start|status|stop``: the project's persistent Prefect server
(:mod:`cvpipe.prefect_server`)."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from cvpipe.cli_support import fail

app = typer.Typer(
    help="The project's persistent Prefect server: run history and the Prefect UI (127.0.0.1, database "
         "in .prefect/). Commands that run flows start it when needed.",
    no_args_is_help=True,
)


def _user_server_note() -> bool:
    """Say so and return True when the user's own PREFECT_API_URL is in charge."""
    from cvpipe.prefect_server import healthy, user_api_url

    url = user_api_url()
    if url is None:
        return False
    answer = "answers" if healthy(url) else "does not answer"
    typer.echo(f"PREFECT_API_URL is set ({url}, {answer}): cvpipe uses it and starts or stops no server")
    return True


@app.command("start")
def server_start(
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port on 127.0.0.1 (default: "
                    "CVPIPE_PREFECT_PORT, else the last one if free, else any free port).")] = None,
) -> None:
    """Start the project's Prefect server unless it already runs; print where its UI is."""
    from cvpipe.prefect_server import ServerError, log_path, start

    if _user_server_note():
        return
    try:
        state = start(port=port, say=lambda line: typer.echo(line, err=True))
    except ServerError as err:
        fail(str(err), 1)
    typer.echo(f"Prefect server: {state.ui_url} (pid {state.pid}; API {state.url}; log {log_path()})")


@app.command("status")
def server_status() -> None:
    """Whether the project's Prefect server runs, and its URL (exit code 1 when it does not)."""
    from cvpipe.prefect_server import log_path, prefect_home, status

    if _user_server_note():
        return
    state, why = status()
    if why is None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started))
        typer.echo(f"Prefect server: {state.ui_url} (pid {state.pid}, since {since}; API {state.url}; "
                   f"database in {prefect_home()}; log {log_path()})")
        return
    typer.echo(f"Prefect server: not running ({why}); the next command that runs a flow, or "
               "`cvpipe server start`, starts it")
    raise typer.Exit(1)


@app.command("stop")
def server_stop() -> None:
    """Stop the project's Prefect server (its run history stays in .prefect/)."""
    from cvpipe.prefect_server import ServerError, stop

    if _user_server_note():
        return
    try:
        state = stop()
    except ServerError as err:
        fail(str(err), 1)
    typer.echo(f"Prefect server stopped (pid {state.pid}, {state.ui_url})" if state else
               "Prefect server: none running")


