"""The ``cvpipe`` command line: one command per stage, plus the whole pipeline.

Every command reads params.yaml (``--params``) and accepts ``--set key=value``
overrides (dotted keys, YAML values), validated before any work starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(
    help="Reproducible transfer learning and batch object detection: "
    "download -> preprocess -> train -> evaluate, and download -> detect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameters file.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-S", help="Override a parameter for this run: KEY=VALUE (dotted key, YAML value). Repeatable."),
]


def _prepare_env() -> None:
    """Keep Prefect's state inside the project unless the user chose otherwise."""
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # The temporary server's telemetry service phones home (unreachable offline) and races the
    # first start-up's database writes ("database is locked"); it has no use here.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A fresh PREFECT_HOME runs all database migrations on first start: 20 s (the default) is not
    # enough on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")


def _overrides(items: list[str] | None) -> dict[str, Any]:
    from cvpipe.params import parse_value

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        out[key.strip()] = parse_value(value)
    return out


def _check(params: Path, overrides: dict[str, Any]) -> None:
    """Validate parameters before starting Prefect, so a typo fails in a second, not after server start-up."""
    from cvpipe.params import ParamsError, load_params

    try:
        load_params(params, overrides)
    except ParamsError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _run(flow_fn, params: Path, overrides: dict[str, Any], **kwargs) -> Any:
    from cvpipe.errors import user_facing

    try:
        return flow_fn(params_file=str(params), overrides=overrides or None, **kwargs)
    except Exception as err:
        msg = user_facing(err)
        if msg is None:
            raise
        typer.secho(msg, fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@app.callback()
def main() -> None:
    """Run `cvpipe COMMAND --help` for the options of each command."""
    _prepare_env()


@app.command()
def download(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Fetch and verify the dataset, classifier weights, detector files and sample photos."""
    ov = _overrides(set_)
    _check(params, ov)
    from flows.download import download_flow

    facts = _run(download_flow, params, ov)
    typer.echo(f"download: {facts}")


@app.command()
def preprocess(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Turn the raw dataset into uint8 train/val/test arrays and a dataset card."""
    ov = _overrides(set_)
    _check(params, ov)
    from flows.preprocess import preprocess_flow

    card = _run(preprocess_flow, params, ov)
    typer.echo(f"preprocess: {card['dataset']}: {card['counts']} ({len(card['classes'])} classes)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
