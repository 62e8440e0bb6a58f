"""``cvpipe server start|status|stop``: the project's persistent Prefect server
(:mod:`cvpipe.prefect_server`) and its preload process (:mod:`cvpipe.preload`)."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from cvpipe.cli_support import fail

app = typer.Typer(
    help="The project's persistent Prefect server (run history and the Prefect UI; 127.0.0.1, database "
         "in .prefect/) and its preload process (keeps the libraries loaded, so a stage command does not "
         "import them again). Commands that run flows start both when needed.",
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

    if not _user_server_note():
        try:
            state = start(port=port, say=lambda line: typer.echo(line, err=True))
        except ServerError as err:
            fail(str(err), 1)
        typer.echo(f"Prefect server: {state.ui_url} (pid {state.pid}; API {state.url}; log {log_path()})")
    _preload_start()


def _preload_start() -> None:
    from cvpipe import preload

    if not preload.enabled():
        typer.echo(f"preload process: off ({preload.MODE_VAR}=off)")
        return
    root = preload.project_root()
    if preload.start(root, say=lambda line: typer.echo(line, err=True)):
        _preload_status(root)


def _preload_status(root) -> bool:
    from cvpipe import preload

    info = preload.status(root)
    if info is None:
        typer.echo("preload process: not running (the next stage command starts it)")
        return False
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
    typer.echo(f"preload process: pid {info['pid']}, since {since}, {info['served']} command(s) run, "
               f"{info['running']} running (log {preload.log_path(root)})")
    return True


@app.command("status")
def server_status() -> None:
    """Whether the project's Prefect server runs, and its URL (exit code 1 when it does not)."""
    from cvpipe.prefect_server import log_path, prefect_home, status

    from cvpipe import preload

    root = preload.project_root()
    if _user_server_note():
        _preload_status(root)
        return
    state, why = status()
    if why is None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started))
        typer.echo(f"Prefect server: {state.ui_url} (pid {state.pid}, since {since}; API {state.url}; "
                   f"database in {prefect_home()}; log {log_path()})")
        _preload_status(root)
        return
    typer.echo(f"Prefect server: not running ({why}); the next command that runs a flow, or "
               "`cvpipe server start`, starts it")
    _preload_status(root)
    raise typer.Exit(1)


@app.command("stop")
def server_stop() -> None:
    """Stop the project's Prefect server (its run history stays in .prefect/) and its preload process."""
    from cvpipe import preload
    from cvpipe.prefect_server import ServerError, stop

    info = preload.stop(preload.project_root())
    said = "preload process stopped (pid {pid})".format(**info) if info else "preload process: none running"
    if not _user_server_note():
        try:
            state = stop()
        except ServerError as err:
            typer.echo(said)
            fail(str(err), 1)
        typer.echo(f"Prefect server stopped (pid {state.pid}, {state.ui_url})" if state else
                   "Prefect server: none running")
    typer.echo(said)
