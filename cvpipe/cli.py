"""The ``cvpipe`` command line: one command per stage, plus the whole pipeline.

Every command reads params.yaml (``--params``) and accepts ``--set key=value``
overrides (dotted keys, YAML values), validated before any work starts and before the
heavy imports (Prefect, MLflow, torch), so a typo fails in a fraction of a second.

Commands that run stages or write params.yaml (download, preprocess, train, evaluate,
detect, run, sweep) hold the project lock (:mod:`cvpipe.lock`) while they work: a second
one in the same project exits at once with one line naming the running one. ``compare``,
``predict`` and ``serve-model`` only read: they take no lock; ``serve`` waits for its schedule, and each
scheduled run takes the lock (inside the pipeline flow).
An error the user can act on is printed as one ``error: ...`` line (exit code 1, or 2 for
invalid parameters), never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

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


def _fail(message: str, code: int) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _overrides(items: list[str] | None) -> dict[str, Any]:
    from cvpipe.errors import one_line
    from cvpipe.params import ParamsError, parse_value

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            out[key.strip()] = parse_value(value)
        except ParamsError as err:
            _fail(f"error: --set {key.strip()}: {one_line(str(err))}", 2)
    return out


def _blame(params: Path, overrides: dict[str, Any]) -> str:
    """What to name in an invalid-parameters message: the ``--set`` keys that caused it, the file, or both."""
    from pydantic import ValidationError

    from cvpipe.params import Params, ParamsError, apply_overrides, read_raw

    try:
        Params.model_validate(apply_overrides(read_raw(params), overrides))
        return str(params)
    except (ValidationError, ParamsError) as err:
        bad = [".".join(str(p) for p in e["loc"]) for e in err.errors()] if isinstance(err, ValidationError) else []

    def covers(key: str, loc: str) -> bool:  # a model-level error is reported on the section ("train")
        return loc == key or loc.startswith(key + ".") or key.startswith(loc + ".")

    blamed = [k for k in overrides if any(covers(k, loc) for loc in bad)]
    if not blamed:
        return str(params)
    sets = ", ".join(f"--set {k}" for k in blamed)
    return sets if all(any(covers(k, loc) for k in blamed) for loc in bad) else f"{params} and {sets}"


def _check(params: Path, overrides: dict[str, Any]) -> None:
    """Validate parameters before starting Prefect, so a typo fails in a second, not after server start-up."""
    from cvpipe.errors import one_line
    from cvpipe.params import ParamsError, apply_overrides, load_params, read_raw, validate

    try:
        load_params(params, overrides)
    except ParamsError as err:
        message = str(err)
        source = _blame(params, overrides) if overrides else str(params)
        if source != str(params):
            try:
                validate(apply_overrides(read_raw(params), overrides), source)
            except ParamsError as blamed:
                message = str(blamed)
        _fail(f"error: {one_line(message)}", 2)
    # A tracking server that does not answer fails here, in seconds, before any work.
    from flows.tracking import TrackingError, check_tracking

    try:
        check_tracking(load_params(params, overrides))
    except TrackingError as err:
        _fail(f"error: {one_line(str(err))}", 1)


@contextlib.contextmanager
def _project_lock(wait: bool = False) -> Iterator[None]:
    """Hold the project lock (see :mod:`cvpipe.lock`) or exit with one line naming its holder."""
    from cvpipe.lock import ProjectBusy, ProjectLock

    def waiting(holder) -> None:
        typer.echo(f"waiting for another cvpipe command in this project: {holder.describe()}", err=True)

    try:
        lock = ProjectLock(Path.cwd()).acquire(wait=wait, on_wait=waiting)
    except ProjectBusy as err:
        _fail(f"error: {err}", 1)
    try:
        yield
    finally:
        lock.release()


def _flow(stage: str):
    """A stage's flow, imported only when it is about to run (the import takes seconds)."""
    import importlib

    return getattr(importlib.import_module(f"flows.{stage}"), f"{stage}_flow")


def _run(flow_fn, params: Path, **kwargs) -> Any:
    """Call a flow; errors with a clear remedy are printed as one message, not a traceback."""
    from cvpipe.errors import user_facing

    try:
        return flow_fn(params_file=str(params), **kwargs)
    except Exception as err:
        msg = user_facing(err)
        if msg is None:
            raise
        typer.secho(msg, fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _connect_prefect() -> str | None:
    """Point this process at the project's Prefect server, starting it if needed (before Prefect is
    imported); see :mod:`cvpipe.prefect_server`. Returns its API URL (None: Prefect's temporary server)."""
    from cvpipe.prefect_server import ServerError, connect

    try:
        return connect(say=lambda line: typer.echo(line, err=True))
    except ServerError as err:
        _fail(str(err), 1)


def _run_stage(stage: str, params: Path, set_: list[str] | None, **kwargs) -> Any:
    """Parse and validate ``--set`` overrides, take the project lock, then run one stage's flow."""
    ov = _overrides(set_)
    _check(params, ov)
    with _project_lock():
        _connect_prefect()
        return _run(_flow(stage), params, overrides=ov or None, **kwargs)


@app.callback()
def main() -> None:
    """Run `cvpipe COMMAND --help` for the options of each command."""
    from cvpipe.prefect_home import prepare_env, stop_orphaned_servers

    prepare_env(Path.cwd())
    stopped = stop_orphaned_servers(Path.cwd())
    if stopped:
        typer.echo(f"cvpipe: stopped {len(stopped)} Prefect temporary server(s) left running by a killed "
                   f"cvpipe command (pid {', '.join(map(str, stopped))})", err=True)


@app.command()
def download(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Fetch and verify the dataset, classifier weights, detector files and sample photos."""
    facts = _run_stage("download", params, set_)
    typer.echo(f"download: {facts}")


@app.command()
def preprocess(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Turn the raw dataset into uint8 train/val/test arrays and a dataset card."""
    card = _run_stage("preprocess", params, set_)
    typer.echo(f"preprocess: {card['dataset']}: {card['counts']} ({len(card['classes'])} classes)")


@app.command()
def train(
    mode: Annotated[str, typer.Option(help="Training mode: feature_extractor or fine_tune.")] = "feature_extractor",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Train the classifier in one mode: a frozen feature extractor with a new head, or fine-tuned."""
    from cvpipe.layout import MODES

    if mode not in MODES:
        raise typer.BadParameter(f"expected one of {', '.join(MODES)}", param_hint="--mode")
    metrics = _run_stage("train", params, set_, mode=mode)
    typer.echo(f"train[{mode}]: {_short(metrics)}")


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Test accuracy, per-class accuracy, confusion matrices and accuracy curves of the trained models."""
    metrics = _run_stage("evaluate", params, set_)
    typer.echo(f"evaluate: {_short(metrics)}")


@app.command()
def detect(
    input: Annotated[Optional[str], typer.Option("--input", "-i", help="A folder, a glob or a .txt list of image paths (default: detect.input).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Batch object detection with YOLOv3 (OpenCV DNN): JSONL, COCO JSON, CSV and annotated images."""
    summary = _run_stage("detect", params, set_, input=input)
    typer.echo(f"detect: {_short(summary)}")


@app.command()
def run(
    profile: Annotated[Optional[str], typer.Option(help="Apply profiles/<name>.yaml to params.yaml first (e.g. offline).")] = None,
    force: Annotated[bool, typer.Option(help="Run every stage, even those DVC reports up to date.")] = False,
    wait: Annotated[bool, typer.Option(help="If another cvpipe command is running in this project, wait for it instead of exiting.")] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run the whole DAG; stages DVC reports up to date are skipped, dvc.lock is updated after each stage.

    --profile and --set write their values into params.yaml (as `dvc exp run -S` does), so that
    `dvc repro` afterwards sees the parameters that ran. They are written only once this command
    holds the project lock, so a running command never sees params.yaml change under it.
    """
    from cvpipe.errors import one_line
    from cvpipe.params import ParamsError, write_overrides

    ov = {}
    if profile:
        ov.update(_profile(profile))
    ov.update(_overrides(set_))
    _check(params, ov)
    with _project_lock(wait):
        if ov:
            try:
                write_overrides(params, ov)
            except ParamsError as err:
                _fail(f"error: {one_line(str(err))}", 2)
            typer.echo(f"params: wrote {', '.join(f'{k}={v}' for k, v in ov.items())} into {params}")
            _check(params, {})
        api_url = _connect_prefect()
        from flows.pipeline import headline, pipeline_flow

        t0 = time.perf_counter()
        rows = _run(pipeline_flow, params, force=force)
        total = time.perf_counter() - t0
    typer.echo("")
    for r in rows:
        typer.echo(f"  {r['stage']:<26} {r['status']:<8} {r['seconds']:>7.1f} s   {headline(r)}".rstrip())
    typer.echo(f"  {'total (with start-up)':<26} {'':<8} {total:>7.1f} s")
    _where_to_look(params, api_url)


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help='Cron schedule, e.g. "0 2 * * *" (02:00 every night).')] = "0 2 * * *",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    timezone: Annotated[Optional[str], typer.Option(help="IANA time zone of the schedule (default UTC).")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serve the whole pipeline on a cron schedule (Prefect `serve`); runs until interrupted.

    Point PREFECT_API_URL at a running `prefect server start` to see the runs in Prefect's UI.
    Each scheduled run takes the project lock for its duration (a run due while another cvpipe
    command works in the project fails at once, naming it); serving itself holds no lock.
    """
    _check(params, {})
    api_url = _connect_prefect()
    from prefect import serve as prefect_serve

    from flows.pipeline import pipeline_deployment

    try:
        deployment = pipeline_deployment(name, cron, str(params), timezone)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--cron") from None
    typer.echo(f"serving pipeline/{name} on cron {cron!r}; Ctrl-C to stop")
    if api_url:
        typer.echo(f"runs in the Prefect UI: {api_url.removesuffix('/api')}")
    prefect_serve(deployment)


@app.command()
def compare(
    limit: Annotated[int, typer.Option(help="Newest N training runs.")] = 20,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Table of the MLflow training runs (mode, backbone, key params, accuracies, duration, data hash) and a plot."""
    if limit < 1:
        _fail(f"error: --limit must be at least 1 (the newest N runs), got {limit}", 2)
    _check(params, {})
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
        _fail(user_facing(err), 1)
    except MlflowException as err:
        _fail(f"error: cannot load models:/{p.mlflow.registered_model}@{alias}: {err.message.splitlines()[0]}; "
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
    _check(params, {})
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
    _check(params, {})
    from cvpipe.errors import user_facing
    from cvpipe.params import load_params
    from cvpipe.serving import PortUnavailable, check_port, serve

    try:
        check_port(host, port)
    except PortUnavailable as err:
        _fail(user_facing(err), 1)
    p = load_params(params)
    loaded = _load_model(p, alias, trust_model_code)
    serve(loaded, host, port, say=typer.echo)


@app.command()
def sweep(
    backbones: Annotated[str, typer.Option(help="Comma-separated train.backbone values, e.g. resnet18,vgg16,efficientnet_lite0.")],
    modes: Annotated[Optional[str], typer.Option(help="Comma-separated training modes (default: train.modes).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Compare backbones: for each, download its weights, train each mode, evaluate; then print the table.

    One Prefect flow `sweep` with a task per backbone (see flows/sweep.py). Each backbone and mode is
    an MLflow run `train-<mode>` tagged sweep=<id>, with test accuracy, parameters, images/s,
    latency per image and model size; a `sweep-<id>` run holds the comparison table. Outputs go
    under <paths.train>/sweep/, so the main pipeline's outputs are untouched. --set applies to
    every backbone. Evaluate registers each backbone's best model.

    The same comparison as DVC experiments (each a full `dvc repro` with its own parameters):
      dvc exp run --queue -S train.backbone=resnet18
      dvc exp run --queue -S train.backbone=vgg16 -S train.weights=none
      dvc exp run --run-all
      dvc exp show   (or: cvpipe compare)
    """
    from cvpipe.layout import MODES

    names = [b.strip() for b in backbones.split(",") if b.strip()]
    ov = _overrides(set_)
    if modes is not None:
        ov["train.modes"] = [m.strip() for m in modes.split(",") if m.strip()]
        bad = [m for m in ov["train.modes"] if m not in MODES]
        if bad or not ov["train.modes"]:
            raise typer.BadParameter(f"expected modes among {', '.join(MODES)}, got {modes!r}", param_hint="--modes")
    if not names:
        raise typer.BadParameter("give at least one backbone", param_hint="--backbones")
    _check(params, ov)
    for b in names:
        _check(params, {**ov, "train.backbone": b})
    with _project_lock():
        _connect_prefect()
        from cvpipe.compare import format_table, run_row
        from cvpipe.params import load_params
        from flows.sweep import backbone_overrides, sweep_flow
        from flows.tracking import configure
        from tasks.evaluate import model_run_id

        out = _run(sweep_flow, params, backbones=names, overrides=ov or None)
        base = load_params(params, ov)
        client, _ = configure(base)
        rows = [run_row(client.get_run(model_run_id(load_params(params, ovb), mode)))
                for ovb in backbone_overrides(base, ov, names).values() for mode in base.train.modes]
        typer.echo("")
        typer.echo(format_table(rows))
        typer.echo(f"\noutputs under {out['root']}; MLflow run sweep-{out['sweep_id']}; all runs: cvpipe compare")


server_app = typer.Typer(
    help="The project's persistent Prefect server: run history and the Prefect UI (127.0.0.1, database "
         "in .prefect/). Commands that run flows start it when needed.",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


def _user_server_note() -> bool:
    """Say so and return True when the user's own PREFECT_API_URL is in charge."""
    from cvpipe.prefect_server import healthy, user_api_url

    url = user_api_url()
    if url is None:
        return False
    answer = "answers" if healthy(url) else "does not answer"
    typer.echo(f"PREFECT_API_URL is set ({url}, {answer}): cvpipe uses it and starts or stops no server")
    return True


@server_app.command("start")
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
        _fail(str(err), 1)
    typer.echo(f"Prefect server: {state.ui_url} (pid {state.pid}; API {state.url}; log {log_path()})")


@server_app.command("status")
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


@server_app.command("stop")
def server_stop() -> None:
    """Stop the project's Prefect server (its run history stays in .prefect/)."""
    from cvpipe.prefect_server import ServerError, stop

    if _user_server_note():
        return
    try:
        state = stop()
    except ServerError as err:
        _fail(str(err), 1)
    typer.echo(f"Prefect server stopped (pid {state.pid}, {state.ui_url})" if state else
               "Prefect server: none running")


def _profile(name: str) -> dict[str, Any]:
    import yaml

    path = Path(__file__).resolve().parent.parent / "profiles" / f"{name}.yaml"
    local = Path("profiles") / f"{name}.yaml"
    path = local if local.is_file() else path
    if not path.is_file():
        raise typer.BadParameter(f"no profile {name!r} ({local} not found)", param_hint="--profile")
    return yaml.safe_load(path.read_text()) or {}


def _where_to_look(params: Path, prefect_api_url: str | None = None) -> None:
    from cvpipe.params import load_params
    from flows.tracking import tracking_uri, ui_runs_url

    p = load_params(params)
    uri = tracking_uri(p)
    typer.echo("\nWhere to look:")
    if prefect_api_url:
        typer.echo(f"  Prefect UI:      {prefect_api_url.removesuffix('/api')}   (every run; cvpipe server status|stop)")
    if uri.startswith(("http://", "https://")):
        typer.echo(f"  MLflow UI:       {ui_runs_url(p, uri)}")
    else:
        bin_dir = Path(sys.executable).parent  # the venv's mlflow: no activation needed
        with contextlib.suppress(ValueError):
            bin_dir = bin_dir.relative_to(Path.cwd())
        typer.echo(f"  MLflow UI:       {bin_dir}/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        typer.echo(f"                   then open {ui_runs_url(p, 'http://127.0.0.1:5000')}")
    typer.echo(f"  metrics:         dvc metrics show   (files under {p.paths.evaluate}/ and {p.paths.detect}/)")
    typer.echo(f"  curves:          dvc plots show     ({p.paths.evaluate}/accuracy.png)")
    typer.echo(f"  detections:      {p.paths.detect}/images/ and {p.paths.detect}/detections.jsonl")
    typer.echo("  compare runs:    cvpipe compare")


def _short(d: Any) -> str:
    if not isinstance(d, dict):
        return str(d)
    items = [(k, v) for k, v in d.items() if isinstance(v, (int, float, str))][:8]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
