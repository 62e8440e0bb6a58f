"""Typed models for params.yaml.

Every section of params.yaml has a pydantic model with ``extra="forbid"``, so a
typo, a wrong type or an out-of-range value fails before any work starts, with
the dotted key in the message.

Why one module: it is the schema of one file, a model per section in the order of params.yaml,
plus the loading, overriding and validating every command shares; split, a reader would chase
one section of params.yaml across files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import reprlib

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cvpipe.backbones import NAMES as BACKBONE_NAMES
from cvpipe.layout import MODES, Mode

PARAMS_FILE = "params.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Strict):
    """Where every stage reads and writes. Outputs stay inside the project (the folder of the
    params file) unless ``allow_outside`` is true: DVC refuses outputs outside its repository."""

    allow_outside: bool = False
    raw: Path
    cache: Path
    processed: Path
    samples: Path
    backbone: Path
    detector: Path
    features: Path
    train: Path
    evaluate: Path
    detect: Path
    compare: Path
    sweep: Path

    def outputs(self) -> dict[str, Path]:
        """Every path field (all of them are written by some stage)."""
        return {k: v for k, v in self if isinstance(v, Path)}


class MlflowParams(_Strict):
    tracking_uri: str
    artifact_location: str
    experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1)


class DataParams(_Strict):
    dataset: Literal["cifar10", "digits", "imagefolder"]
    imagefolder: Path


class Source(_Strict):
    """A file at a URL with its pinned sha256."""

    url: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Yolov3Sources(_Strict):
    """Where the full YOLOv3 Darknet files come from (defaults: the official Darknet release)."""

    cfg: Source
    weights: Source
    names: Source


class DownloadParams(_Strict):
    retries: int = Field(ge=1, le=20)
    backoff_s: float = Field(ge=0)
    timeout_s: float = Field(gt=0)
    cifar10_url: str
    cifar10_md5: str = Field(pattern=r"^[0-9a-f]{32}$")
    samples: list[str]
    sample_scale: float | None = Field(default=None, gt=0, le=1)
    sample_canvas: tuple[Annotated[int, Field(ge=16, le=10_000)], Annotated[int, Field(ge=16, le=10_000)]]
    yolov3: Yolov3Sources


class PreprocessParams(_Strict):
    val_fraction: float = Field(gt=0, lt=1)
    image_size: int = Field(ge=8, le=1024)
    test_fraction: float = Field(gt=0, lt=1)


class TrainParams(_Strict):
    backbone: Literal[BACKBONE_NAMES]  # a name of cvpipe/backbones.py's table
    weights: str = Field(min_length=1)
    weights_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    modes: list[Mode] = Field(min_length=1)
    image_size: int = Field(ge=16, le=1024)
    interpolation: Literal["bilinear", "bicubic", "nearest"]
    batch_size: int = Field(ge=1, le=100_000)
    epochs: int = Field(ge=1, le=100_000)
    lr: float = Field(gt=0, le=10, allow_inf_nan=False)
    bn_momentum: float | None = Field(default=None, gt=0, le=1)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool
    vflip: bool
    feature_augment: Literal["none", "flips"]
    freeze_stages: int = Field(ge=0, le=64)
    fine_tune_epochs: int | None = Field(default=None, ge=1, le=100_000)
    resume: bool
    amp: Literal["auto", "bf16", "off"]
    channels_last: bool
    num_threads: int = Field(ge=0)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("every std value must be > 0")
        return v

    @model_validator(mode="after")
    def _weights_source(self) -> "TrainParams":
        remote = self.weights.startswith(("http://", "https://"))
        if remote and self.weights_sha256 is None:
            raise ValueError("train.weights is a URL: set train.weights_sha256 to its sha256")
        return self

    def epochs_for(self, mode: str) -> int:
        """Number of epochs for a training mode."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if mode == "fine_tune" and self.fine_tune_epochs is not None:
            return self.fine_tune_epochs
        return self.epochs


class EvaluateParams(_Strict):
    batch_size: int = Field(ge=1)


class DetectParams(_Strict):
    model: Literal["yolov3", "yolov3-tiny"]
    backend: Literal["auto", "opencv", "torch"]
    resize: Literal["stretch", "letterbox"]
    input: str = Field(min_length=1)
    input_size: int = Field(ge=32, le=2048, multiple_of=32)
    batch_size: int = Field(ge=1)
    conf_threshold: float = Field(ge=0, le=1)
    nms_threshold: float = Field(ge=0, le=1)
    shards: int = Field(ge=1)
    workers: int = Field(ge=1)
    task_runner: Literal["threads", "dask"]
    dask_address: str | None = None
    annotations: Path | None = None
    save_images: bool
    jpeg_quality: int = Field(ge=1, le=100)
    max_pixels: int = Field(ge=1, le=2**31)


class Params(_Strict):
    seed: int = Field(ge=0, le=2**32 - 1)  # numpy and scikit-learn take 32-bit seeds
    device: Literal["auto", "cpu", "cuda"]
    paths: Paths
    mlflow: MlflowParams
    data: DataParams
    download: DownloadParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    detect: DetectParams

    def confined_to(self, *roots: Path) -> "Params":
        """Check that every ``paths`` entry lies inside one of ``roots`` (unless ``paths.allow_outside``).

        Relative paths are taken against the working directory, as the stages use them.

        Raises:
            ParamsError: one line per path outside every root.
        """
        if self.paths.allow_outside:
            return self
        roots = tuple(r.resolve() for r in roots)
        bad = [f"  paths.{k}: {v} is outside the project {roots[0]} (set paths.allow_outside: true to allow)"
               for k, v in self.paths.outputs().items()
               if not any(v.resolve().is_relative_to(r) for r in roots)]
        if bad:
            raise ParamsError("\n".join(["invalid parameters:", *bad]))
        return self


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message names each bad key."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (typo?)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {_short_repr(e.get('input'))})")
    return "\n".join(lines)


def _short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a value may be huge: never print it whole)."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxdict = 6
    r.maxlevel = 2
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _NoAliasSafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: ``*ref`` lets a few kilobytes expand to gigabytes
    ("billion laughs"), and a parameters file has no use for it."""

    def compose_node(self, parent, index):  # noqa: D102 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed here",
                                              event.start_mark)
        return super().compose_node(parent, index)


def safe_yaml(text: str, source: str) -> Any:
    """Parse YAML with the safe loader, no aliases and no custom tags.

    Raises:
        ParamsError: one line saying where the YAML is wrong (syntax, alias, ``!!python/...`` tag).
    """
    try:
        return yaml.load(text, Loader=_NoAliasSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"invalid YAML in {source}{where}: {_short_repr(problem, 160)}") from None


def parse_value(text: str) -> Any:
    """Parse a command-line override value the way YAML would ("3" -> 3, "null" -> None)."""
    return safe_yaml(text, f"--set value {_short_repr(text)}")


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted-key overrides applied ("train.lr" -> 0.01).

    Raises:
        ParamsError: when a dotted key does not exist in ``raw``.
    """
    import copy

    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise ParamsError(f"invalid parameters: {dotted}: unknown key (typo?)")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ParamsError(f"invalid parameters: {dotted}: unknown key (typo?)")
        node[parts[-1]] = value
    return out


def read_raw(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml as plain data (safe YAML loader)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"parameters file not found: {path.resolve()}")
    raw = safe_yaml(path.read_text(), str(path))
    if not isinstance(raw, dict):
        raise ParamsError(f"invalid parameters in {path}: the top level must be a mapping")
    return raw


def validate(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    """Validate plain data into :class:`Params`, raising :class:`ParamsError` with every bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source)) from None


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate params.yaml, with optional dotted-key overrides.

    Args:
        path: the params file.
        overrides: {"train.lr": 0.01, ...}; each key must already exist.

    Returns:
        The validated, immutable parameters.
    """
    raw = read_raw(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    # The project: the working directory (where the stages and DVC run) or the params file's folder.
    return validate(raw, str(path)).confined_to(Path.cwd(), Path(path).resolve().parent)


def write_overrides(path: str | Path, overrides: dict[str, Any]) -> None:
    """Write dotted-key overrides into a params file in place, keeping its comments.

    The result is validated before the file is replaced, so a bad value never
    lands in params.yaml.
    """
    from ruamel.yaml import YAML

    from cvpipe.io import atomic_write_text

    path = Path(path)
    validate(apply_overrides(read_raw(path), overrides), str(path))
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never fold a long value (a URL) onto a second line
    # Keep `null` written as `null`, not as an empty value.
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    import io

    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
