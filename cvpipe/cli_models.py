"""The ``cvpipe`` commands that use trained models and past runs: ``compare``, ``predict`` and
``serve-model`` (they only read: no project lock)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cvpipe.cli_support import ParamsOpt, check_params, fail

app = typer.Typer()


@app.command()
def compare(
    limit: Annotated[int, typer.Option(help="Newest N training runs.")] = 20,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Table of the MLflow training runs (mode, backbone, key params, accuracies, duration, data hash) and a plot."""
    if limit < 1:
        fail(f"error: --limit must be at least 1 (the newest N runs), got {limit}", 2)
    check_params(params, {})
    from cvpipe.compare import collect_runs, format_table, plot_comparison, to_csv
    from cvpipe.io import atomic_write_text
    from cvpipe.params import load_params

    p = load_params(params)
    rows = collect_runs(p, limit)
    if not rows:
        typer.echo("no finished training runs in MLflow yet: run `cvpipe run` or `cvpipe train` first")
        raise typer.Exit(1)
    typer.echo(format_table(rows))
    out = p.paths.compare
    atomic_write_text(out / "runs.csv", to_csv(rows))
    plot_comparison(rows, out / "runs.png")
    typer.echo(f"\nwrote {out / 'runs.csv'} and {out / 'runs.png'}")


TrustOpt = Annotated[bool, typer.Option(
    "--trust-model-code",
    help="Also load a model whose MLmodel would run code (code_paths, a pickled python_model, a loader "
         "outside cvpipe): only for a tracking store you trust.")]


def _load_model(p, alias: str, trust_model_code: bool):
    """The registered model at ``alias`` (:func:`cvpipe.predict.load_registered`), or one error line."""
    from mlflow.exceptions import MlflowException

    from cvpipe.errors import UserError, user_facing
    from cvpipe.predict import load_registered

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a progress bar for a few KB
    try:
        return load_registered(p, alias, trust_model_code=trust_model_code)
    except UserError as err:
        fail(user_facing(err), 1)
    except MlflowException as err:
        fail(f"error: cannot load models:/{p.mlflow.registered_model}@{alias}: {err.message.splitlines()[0]}; "
              "run `cvpipe run` (or train + evaluate) first: evaluate registers the best model", 1)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to classify.", exists=True, dir_okay=False)],
    top: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many classes to print per image.")] = 3,
    alias: Annotated[str, typer.Option(help="Registered-model alias to load.")] = "champion",
    trust_model_code: TrustOpt = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Classify images with the registered model `models:/<mlflow.registered_model>@champion`.

    Prints which model version answers (its training mode, backbone, dataset and classes), then
    the top-k classes of each image. A file that is not a readable image is one `error:` line
    (exit code 1); the other files are still classified. The model is loaded as data (a card and
    pickle-free weights) by the installed cvpipe package; nothing from the tracking store is
    executed unless --trust-model-code.
    """
    check_params(params, {})
    from cvpipe.params import load_params
    from cvpipe.predict import classify

    p = load_params(params)
    loaded = _load_model(p, alias, trust_model_code)
    typer.echo(loaded.describe())
    failed = 0
    for r in classify(loaded, list(images), top):
        if "error" in r:
            failed += 1
            typer.secho(f"error: {r['path']}: {r['error']}", fg=typer.colors.RED, err=True)
            continue
        typer.echo(r["path"])
        for name, prob in r["top"]:
            typer.echo(f"  {prob:7.2%}  {name}")
    if failed:
        raise typer.Exit(1)


@app.command("serve-model")
def serve_model(
    alias: Annotated[str, typer.Option(help="Registered-model alias to serve.")] = "champion",
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 5001,
    trust_model_code: TrustOpt = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serve the registered model as an HTTP API (MLflow's scoring protocol) until Ctrl-C.

    POST /invocations with base64-encoded image files or image arrays, e.g.
    {"inputs": {"image": ["<base64 PNG or JPEG>"]}, "params": {"k": 3}}; each image gets its most
    probable class (label, probability), the top k, the logits and the probabilities. A request
    the model cannot take is a 400 with a one-line message. The tracking store and the model come
    from params.yaml; it runs from the project's virtualenv, activated or not.
    """
    check_params(params, {})
    from cvpipe.errors import user_facing
    from cvpipe.params import load_params
    from cvpipe.serving import PortUnavailable, check_port, serve

    try:
        check_port(host, port)
    except PortUnavailable as err:
        fail(user_facing(err), 1)
    p = load_params(params)
    loaded = _load_model(p, alias, trust_model_code)
    serve(loaded, host, port, say=typer.echo)


