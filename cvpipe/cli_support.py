"""What every ``cvpipe`` command shares: the ``--params``/``--set`` options, parameter checks that
fail in a fraction of a second, the project lock, connecting to Prefect, running a flow with
errors printed as one line, and the end-of-run summary (see :mod:`cvpipe.cli`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameters file.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-S", help="Override a parameter for this run: KEY=VALUE (dotted key, YAML value). Repeatable."),
]


def fail(message: str, code: int) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
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
            fail(f"error: --set {key.strip()}: {one_line(str(err))}", 2)
    return out


def blame(params: Path, overrides: dict[str, Any]) -> str:
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


def check_params(params: Path, overrides: dict[str, Any]) -> None:
    """Validate parameters before starting Prefect, so a typo fails in a second, not after server start-up."""
    from cvpipe.errors import one_line
    from cvpipe.params import (
        ParamsError,
        apply_overrides,
        load_params,
        read_raw,
        validate,
    )

    try:
        load_params(params, overrides)
    except ParamsError as err:
        message = str(err)
        source = blame(params, overrides) if overrides else str(params)
        if source != str(params):
            try:
                validate(apply_overrides(read_raw(params), overrides), source)
            except ParamsError as blamed:
                message = str(blamed)
        fail(f"error: {one_line(message)}", 2)
    # A tracking server that does not answer fails here, in seconds, before any work.
    from flows.tracking import TrackingError, check_tracking

    try:
        check_tracking(load_params(params, overrides))
    except TrackingError as err:
        fail(f"error: {one_line(str(err))}", 1)


@contextlib.contextmanager
def project_lock(wait: bool = False) -> Iterator[None]:
    """Hold the project lock (see :mod:`cvpipe.lock`) or exit with one line naming its holder."""
    from cvpipe.lock import ProjectBusy, ProjectLock

    def waiting(holder) -> None:
        typer.echo(f"waiting for another cvpipe command in this project: {holder.describe()}", err=True)

    try:
        lock = ProjectLock(Path.cwd()).acquire(wait=wait, on_wait=waiting)
    except ProjectBusy as err:
        fail(f"error: {err}", 1)
    try:
        yield
    finally:
        lock.release()


def stage_flow(stage: str):
    """A stage's flow, imported only when it is about to run (the import takes seconds)."""
    from flows import stage_flow as flow_of

    return flow_of(stage)[0]


def run_flow(flow_fn, params: Path, **kwargs) -> Any:
    """Call a flow; errors with a clear remedy are printed as one message, not a traceback.

    The flow run sends Prefect heartbeats only when the user configured them
    (:func:`flows.without_heartbeat`): otherwise nothing reads them, and the run would end up to a
    second late. Scheduled runs (`cvpipe serve`) run in Prefect's processes, with Prefect's settings.
    """
    from cvpipe.errors import user_facing
    from flows import without_heartbeat

    try:
        with without_heartbeat():
            return flow_fn(params_file=str(params), **kwargs)
    except Exception as err:
        msg = user_facing(err)
        if msg is None:
            raise
        typer.secho(msg, fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def connect_prefect(meanwhile: tuple[str, ...] = (), params: Path | None = None,
                    overrides: dict[str, Any] | None = None, later: tuple[str, ...] = ()) -> str | None:
    """Point this process at the project's Prefect server, starting it if needed; see
    :mod:`cvpipe.prefect_server`. Returns its API URL (None: Prefect's temporary server).

    A server's start (seconds, in another process) overlaps this process's own preparations, in
    this order: the modules named in ``meanwhile`` are imported (what the flow needs to start);
    with ``params``, if the server is still starting, the MLflow store is opened (a new one is
    written first; an error there is left for the stage to report in context); then the modules in
    ``later`` (the stages' flows, in the order the stages run) are imported by a background thread
    once the server answers, beside the first stages (a stage that needs one of them before it is
    loaded waits for it, as any import waits).
    """
    import importlib
    import threading

    from cvpipe.prefect_home import refresh_prefect
    from cvpipe.prefect_server import ServerError, connect

    outcome: dict[str, Any] = {}

    def connecting() -> None:
        try:
            outcome["url"] = connect(say=lambda line: typer.echo(line, err=True), refresh=False)
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread below
            outcome["error"] = err

    thread = threading.Thread(target=connecting, name="cvpipe-connect", daemon=True)
    thread.start()
    try:
        for name in meanwhile:
            importlib.import_module(name)
        if params is not None and thread.is_alive():  # only while the server starts: else the stage opens it
            _open_tracking(params, overrides or {})
    finally:
        thread.join()
    # Not before: an import holds the interpreter for up to half a second at a time (torch's), which
    # would keep the thread above from seeing the server answer.
    pending = [m for m in later if m not in sys.modules]
    if pending:
        threading.Thread(target=_import_quietly, args=(pending,), name="cvpipe-imports", daemon=True).start()
    refresh_prefect()
    err = outcome.get("error")
    if isinstance(err, ServerError):
        fail(str(err), 1)
    if err is not None:
        raise err
    return outcome.get("url")


def _import_quietly(names: list[str]) -> None:
    """Import ``names`` in turn; a failure is left for the stage that imports the module to report."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the stage's own import raises it again, in context
            return


def _open_tracking(params: Path, overrides: dict[str, Any]) -> None:
    from cvpipe.errors import UserError
    from cvpipe.params import ParamsError, load_params
    from flows.tracking import configure

    try:
        configure(load_params(params, overrides))
    except (UserError, ParamsError, OSError):
        pass


def flow_modules(*stages: str) -> tuple[str, ...]:
    """The flow modules of ``stages`` (all stages when none are named), for :func:`connect_prefect`."""
    from cvpipe.layout import STAGES

    return tuple(f"flows.{s.partition('@')[0]}" for s in (stages or STAGES))


def run_stage(stage: str, params: Path, set_: list[str] | None, **kwargs) -> Any:
    """Parse and validate ``--set`` overrides, take the project lock, then run one stage's flow."""
    ov = parse_overrides(set_)
    check_params(params, ov)
    with project_lock():
        connect_prefect(meanwhile=(*flow_modules(stage), "mlflow"), params=params, overrides=ov)
        return run_flow(stage_flow(stage), params, overrides=ov or None, **kwargs)


def profile_overrides(name: str) -> dict[str, Any]:
    import yaml

    path = Path(__file__).resolve().parent.parent / "profiles" / f"{name}.yaml"
    local = Path("profiles") / f"{name}.yaml"
    path = local if local.is_file() else path
    if not path.is_file():
        raise typer.BadParameter(f"no profile {name!r} ({local} not found)", param_hint="--profile")
    return yaml.safe_load(path.read_text()) or {}


def where_to_look(params: Path, prefect_api_url: str | None = None) -> None:
    from cvpipe import layout
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
    typer.echo(f"  curves:          dvc plots show     ({p.paths.evaluate / layout.ACCURACY_PLOT})")
    typer.echo(f"  detections:      {p.paths.detect / layout.ANNOTATED_DIR}/ and {p.paths.detect / layout.DETECTIONS}")
    typer.echo("  compare runs:    cvpipe compare")


def short(d: Any) -> str:
    if not isinstance(d, dict):
        return str(d)
    items = [(k, v) for k, v in d.items() if isinstance(v, (int, float, str))][:8]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)

