"""``cvpipe serve-model``: the registered classifier as an HTTP API on 127.0.0.1.

The model is loaded as ``cvpipe predict`` loads it (:func:`cvpipe.predict.load_registered`:
checked, nothing from the store executed) and served in this process with uvicorn, so serving
needs neither an activated virtualenv nor an exported ``MLFLOW_TRACKING_URI``. Requests follow
MLflow's scoring protocol (``POST /invocations`` with ``inputs``, ``instances``,
``dataframe_split`` or ``dataframe_records``, optional ``params``; ``GET /ping``, ``/health``,
``/version``), parsed and answered by MLflow's own scoring functions. What differs from
``mlflow models serve``: an input the model cannot take is a 400 whose message is one short
line (MLflow's server repeats the whole request in its messages).
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request).
import asyncio
import json
import socket
from typing import Any

from cvpipe.errors import UserError

#: Largest request body accepted (a batch of 32 images of 3x224x224 as JSON integers is ~20 MB).
MAX_BODY = 256 * 2**20
MAX_MESSAGE = 240  # characters of an error message sent back


class PortUnavailable(UserError, OSError):
    """The address the server should listen on cannot be bound."""


def check_port(host: str, port: int) -> None:
    """Fail at once, in one line, when ``host:port`` cannot be bound (before the model loads).

    Raises:
        PortUnavailable: the port is taken or the host is not an address of this machine.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise PortUnavailable(f"cannot listen on {host}:{port}: {err.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as err:
            raise PortUnavailable(f"cannot listen on {host}:{port}: {err.strerror} "
                                  "(choose another with --port)") from None


def short_message(err: BaseException) -> str:
    """One short line saying what was wrong with a request (never the request itself)."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import REQUIRED_INPUT_FORMAT

    from tasks.inputs import InvalidInput

    cause = _find(err, InvalidInput)
    if cause is not None:
        text = str(cause)
    elif isinstance(err, MlflowException):
        text = err.message
        if text.startswith(REQUIRED_INPUT_FORMAT):
            text = ('expected a JSON object with one of "inputs", "instances", "dataframe_split" or '
                    '"dataframe_records" (and optionally "params"), e.g. {"inputs": {"image": ["<base64 PNG>"]}}')
        elif text.startswith("Failed to predict data"):  # MLflow repeats the whole request first
            text = text.rsplit("Error: ", 1)[-1]
    else:
        text = str(err)
    text = text.split("\nInput:")[0]  # MLflow's JSON errors append the request
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def _find(err: BaseException | None, kind: type) -> BaseException | None:
    """``err`` or the first exception it was raised from (or while handling) that is a ``kind``."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def build_app(model: Any):
    """A FastAPI app answering MLflow's scoring protocol for a loaded pyfunc ``model``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server
    from mlflow.version import VERSION

    app = FastAPI(title="cvpipe classifier")
    input_schema = model.metadata.get_input_schema()

    def error(status: int, code: str, message: str) -> Response:
        return Response(json.dumps({"error_code": code, "message": message}), status_code=status,
                        media_type="application/json")

    @app.get("/ping")
    @app.get("/health")
    async def ping() -> Response:
        return Response("\n", status_code=200, media_type="application/json")

    @app.get("/version")
    async def version() -> Response:
        return Response(VERSION, status_code=200, media_type="application/json")

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            return error(413, "REQUEST_LIMIT_EXCEEDED", f"request body over {MAX_BODY // 2**20} MiB")
        body = await request.body()
        content_type = request.headers.get("content-type") or ""
        try:
            result = await asyncio.to_thread(scoring_server.invocations, body, content_type, model, input_schema)
        except MlflowException as err:
            status = err.get_http_status_code()
            from tasks.inputs import InvalidInput

            if _find(err, InvalidInput) is not None:
                status = 400
            return error(status, "INVALID_PARAMETER_VALUE" if status < 500 else err.error_code, short_message(err))
        if result.status >= 400:  # unsupported content type or charset: MLflow's own text, shortened
            return error(result.status, "BAD_REQUEST", " ".join(result.response.split())[:MAX_MESSAGE])
        return Response(result.response, status_code=result.status, media_type=result.mimetype)

    return app


def serve(loaded, host: str, port: int, say=print) -> None:
    """Serve a :class:`cvpipe.predict.LoadedModel` on ``host:port`` until interrupted (SIGINT/SIGTERM)."""
    import uvicorn

    app = build_app(loaded.model)
    say(loaded.describe())
    say(f"serving on http://{host}:{port}/invocations (POST; health: GET /ping); Ctrl-C to stop")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
