"""The registered classifier as an MLflow pyfunc whose only code is the installed package.

A logged model is data: the exported classifier of :mod:`tasks.export` (``classifier.json``, its
card, and ``weights.npz``, the network's tensors as plain numpy arrays, read with pickle disabled),
which MLflow copies under the model's ``data/``. Its MLmodel names ``loader_module:
cvpipe.model_flavor``; loading rebuilds the architecture from the installed :mod:`tasks.backbones`
and preprocesses with the functions training uses, so loading a model from a tracking store never
runs code, and never unpickles objects, that the store holds.

Why not a ``torch.export`` program (.pt2): ``torch.export.load`` unpickles parts of the archive
(its sample inputs fall back to ``weights_only=False``) and evaluates symbolic shape expressions,
so anyone who can write to the store could make a .pt2 run code on the reader's machine.

The pyfunc's ``predict`` (:meth:`tasks.export.Classifier.predict`) takes what a client has (see
:func:`tasks.inputs.images_from_input`): encoded image files (PNG, JPEG, ...; bytes, or base64
strings as JSON carries them, alone, in a list, or in an ``image`` field or column), or arrays of
uint8 (N, C, H, W) images (C = 1 or 3, any H and W) or of floats in [0, 1]. It returns, per image,
the most probable class and its probability, the top ``k`` classes (param ``k``, default
:data:`tasks.export.TOP_K`), and the logits and probabilities (float32, class order of
``classifier.json``). Its signature declares the ``k`` param and no input schema: MLflow would
otherwise cast every input to one dtype before the model sees it (floats in [0, 1] to uint8 zeros)
and refuse strings; the model checks its inputs itself, with short messages.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tasks.export import TOP_K, Classifier, UntrustedModel, load_classifier_data

DATA_DIR = "classifier"  # the folder MLflow copies under the model's data/
LOADER_MODULE = __name__
# What may appear in the pyfunc section of a trusted MLmodel (anything else, e.g. `code`,
# `python_model` or `model_code_path`, makes MLflow import or unpickle something from the store).
PYFUNC_KEYS = {"loader_module", "python_version", "data", "env", "streamable"}


# --------------------------------------------------------------------------- MLflow


def signature(example: np.ndarray | None = None, output: Mapping[str, Any] | None = None):
    """The MLflow signature: the ``k`` param and the outputs; no input schema.

    MLflow enforces an input schema before the model sees the data: a tensor schema casts every
    request to its one dtype (floats in [0, 1] become uint8 zeros) and refuses base64 strings, and
    a column schema refuses arrays. The model checks what it is given itself
    (:func:`tasks.inputs.images_from_input`). ``example`` and ``output`` are accepted for callers that pass them.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    outputs = Schema([
        ColSpec("string", "label"), ColSpec("float", "probability"),
        ColSpec(Array(Object([Property("label", "string"), Property("probability", "float")])), "top_k"),
        ColSpec(Array("float"), "logits"), ColSpec(Array("float"), "probabilities")])
    return ModelSignature(inputs=None, outputs=outputs, params=ParamSchema([ParamSpec("k", "long", TOP_K)]))


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> Classifier:
    """MLflow's entry point for ``loader_module: cvpipe.model_flavor``."""
    return load_classifier_data(data_path)


# --------------------------------------------------------------------------- trust


def check_model_dir(model_dir: str | Path) -> Path:
    """Check that loading the MLflow model in ``model_dir`` runs only installed code; return its data folder.

    Trusted: a ``python_function`` flavour whose ``loader_module`` is a module of the installed
    ``cvpipe`` package, with no code paths, no pickled python model and no model-from-code file,
    and whose data folder lies inside ``model_dir``; no flavour declares code paths.

    Raises:
        UntrustedModel: naming what would be imported or unpickled from the store.
    """
    import yaml

    model_dir = Path(model_dir).resolve()
    try:
        meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UntrustedModel(f"no readable MLmodel ({err})") from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict) or not isinstance(flavors.get("python_function"), dict):
        raise UntrustedModel("its MLmodel has no python_function flavour")
    with_code = sorted(name for name, conf in flavors.items() if isinstance(conf, dict) and conf.get("code"))
    if with_code:
        raise UntrustedModel(f"its MLmodel declares code paths (flavour {', '.join(with_code)}): "
                             "Python files from the tracking store would be imported")
    conf = flavors["python_function"]
    loader = conf.get("loader_module")
    if not _installed_cvpipe_module(loader):
        raise UntrustedModel(f"its loader_module {str(loader)[:80]!r} is not a module of the installed cvpipe package")
    extra = sorted(k for k in conf if k not in PYFUNC_KEYS and conf[k] not in (None, "", {}, []))
    if extra:
        raise UntrustedModel(f"its MLmodel's python_function flavour has {', '.join(extra)}: "
                             "a pickled or code-defined model from the tracking store would be loaded")
    data = (model_dir / str(conf.get("data", ""))).resolve()
    if not data.is_relative_to(model_dir) or not data.is_dir():
        raise UntrustedModel(f"its data folder {str(conf.get('data'))[:80]!r} is not a folder inside the model")
    return data


def _installed_cvpipe_module(name: Any) -> bool:
    """True when ``name`` is a module of this cvpipe package (resolved without importing it)."""
    if not isinstance(name, str) or not name.startswith("cvpipe.") or not name.replace(".", "").replace("_", "").isalnum():
        return False
    package = Path(__file__).resolve().parent
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(package)
