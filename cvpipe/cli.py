"""The ``cvpipe`` command line: one command per stage, plus the whole pipeline.

The commands that use trained models (compare, predict, serve-model) are in
:mod:`cvpipe.cli_models`, ``cvpipe server ...`` in :mod:`cvpipe.cli_server`, what they share in
:mod:`cvpipe.cli_support`.

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

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cvpipe import cli_models, cli_server
from cvpipe.cli_support import (
    ParamsOpt,
    SetOpt,
    check_params,
    connect_prefect,
    flow_modules,
    fail,
    parse_overrides,
    profile_overrides,
    project_lock,
    run_flow,
    run_stage,
    short,
    where_to_look,
)

app = typer.Typer(
    help="Reproducible transfer learning and batch object detection: "
    "download -> preprocess -> train -> evaluate, and download -> detect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(cli_models.app)  # compare, predict, serve-model
app.add_typer(cli_server.app, name="server")


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
    facts = run_stage("download", params, set_)
    typer.echo(f"download: {facts}")


@app.command()
def preprocess(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Turn the raw dataset into uint8 train/val/test arrays and a dataset card."""
    card = run_stage("preprocess", params, set_)
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
    metrics = run_stage("train", params, set_, mode=mode)
    typer.echo(f"train[{mode}]: {short(metrics)}")


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Test accuracy, per-class accuracy, confusion matrices and accuracy curves of the trained models."""
    metrics = run_stage("evaluate", params, set_)
    typer.echo(f"evaluate: {short(metrics)}")


@app.command()
def detect(
    input: Annotated[Optional[str], typer.Option("--input", "-i", help="A folder, a glob or a .txt list of image paths (default: detect.input).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Batch object detection with YOLOv3 (OpenCV DNN): JSONL, COCO JSON, CSV and annotated images."""
    summary = run_stage("detect", params, set_, input=input)
    typer.echo(f"detect: {short(summary)}")


#: The stages of ``cvpipe run`` in the order they start: their flow modules are imported in this order.
PIPELINE_ORDER = ("download", "detect", "preprocess", "train", "evaluate")


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
        ov.update(profile_overrides(profile))
    ov.update(parse_overrides(set_))
    check_params(params, ov)
    with project_lock(wait):
        if ov:
            try:
                write_overrides(params, ov)
            except ParamsError as err:
                fail(f"error: {one_line(str(err))}", 2)
            typer.echo(f"params: wrote {', '.join(f'{k}={v}' for k, v in ov.items())} into {params}")
            check_params(params, {})
        api_url = connect_prefect(meanwhile=("flows.pipeline", "mlflow", "dvc.repo"), params=params,
                                  later=flow_modules(*PIPELINE_ORDER))
        from flows.pipeline import headline, pipeline_flow

        t0 = time.perf_counter()
        rows = run_flow(pipeline_flow, params, force=force)
        total = time.perf_counter() - t0
    typer.echo("")
    for r in rows:
        typer.echo(f"  {r['stage']:<26} {r['status']:<8} {r['seconds']:>7.1f} s   {headline(r)}".rstrip())
    typer.echo(f"  {'total (with start-up)':<26} {'':<8} {total:>7.1f} s")
    where_to_look(params, api_url)


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
    check_params(params, {})
    api_url = connect_prefect(meanwhile=("flows.pipeline",))
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
    under <paths.sweep>, so the main pipeline's outputs are untouched. --set applies to
    every backbone. Evaluate registers each backbone's best model.

    The same comparison as DVC experiments (each a full `dvc repro` with its own parameters):
      dvc exp run --queue -S train.backbone=resnet18
      dvc exp run --queue -S train.backbone=vgg16 -S train.weights=none
      dvc exp run --run-all
      dvc exp show   (or: cvpipe compare)
    """
    from cvpipe.layout import MODES

    names = [b.strip() for b in backbones.split(",") if b.strip()]
    ov = parse_overrides(set_)
    if modes is not None:
        ov["train.modes"] = [m.strip() for m in modes.split(",") if m.strip()]
        bad = [m for m in ov["train.modes"] if m not in MODES]
        if bad or not ov["train.modes"]:
            raise typer.BadParameter(f"expected modes among {', '.join(MODES)}, got {modes!r}", param_hint="--modes")
    if not names:
        raise typer.BadParameter("give at least one backbone", param_hint="--backbones")
    check_params(params, ov)
    for b in names:
        check_params(params, {**ov, "train.backbone": b})
    with project_lock():
        connect_prefect(meanwhile=("flows.sweep", *flow_modules(), "mlflow"))
        from cvpipe.compare import format_table, run_row
        from cvpipe.params import load_params
        from flows.sweep import backbone_overrides, sweep_flow
        from flows.tracking import configure
        from tasks.evaluate import model_run_id

        out = run_flow(sweep_flow, params, backbones=names, overrides=ov or None)
        base = load_params(params, ov)
        client, _ = configure(base)
        rows = [run_row(client.get_run(model_run_id(load_params(params, ovb), mode)))
                for ovb in backbone_overrides(base, ov, names).values() for mode in base.train.modes]
        typer.echo("")
        typer.echo(format_table(rows))
        typer.echo(f"\noutputs under {out['root']}; MLflow run sweep-{out['sweep_id']}; all runs: cvpipe compare")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
