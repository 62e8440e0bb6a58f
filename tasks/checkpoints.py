"""The files of ``train``: saving and loading ``model.pt`` and ``checkpoint.pt``, the RNG state and
fingerprint a checkpoint carries so that a resumed run repeats an uninterrupted one, and the
backbone weights ``download`` provided.

Every ``torch.load`` here is ``weights_only=True``: a file holding pickled Python objects is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvpipe.io import CorruptFile, atomic_path, file_hash, read_json
from cvpipe.layout import MANIFEST
from cvpipe.params import Params
from tasks.backbones import ImageClassifier, build_model

# Train params that may change between a checkpoint and its resumption: they do not change what an epoch computes.
RESUMABLE_KEYS = {"modes", "epochs", "fine_tune_epochs", "resume", "num_threads"}


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states, for a checkpoint."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers, never arbitrary objects).

    Raises:
        CorruptFile: the file is truncated, not a PyTorch file, or holds pickled Python objects
            (the message names it).
    """
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running the file's code: never repeat it.
        raise CorruptFile(f"{path}: not a plain state dict: it holds pickled Python objects, which are "
                          "refused (they could run code); save only tensors and plain containers "
                          "(torch.save(model.state_dict(), path))") from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CorruptFile(f"{path}: not a readable PyTorch file, truncated or corrupt "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                          "delete it and run the stage that writes it again") from None


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> ImageClassifier:
    """Rebuild the classifier saved in ``model.pt`` (uint8 images in, logits out), in eval mode.

    Raises:
        CorruptFile: ``path`` is truncated, not a PyTorch file, or not a model written by ``train``.
    """
    ckpt = load_torch(path, map_location)
    keys = ("backbone", "classes", "state_dict", "image_size", "mean", "std", "interpolation")
    missing = [k for k in keys if k not in ckpt] if isinstance(ckpt, dict) else list(keys)
    if missing:
        raise CorruptFile(f"{path}: not a model written by `cvpipe train` (missing {', '.join(missing)}); "
                          "run `cvpipe train` to write it again")
    try:
        net = build_model(ckpt["backbone"], len(ckpt["classes"]))
        net.load_state_dict(ckpt["state_dict"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CorruptFile(f"{path}: its weights do not fit a {ckpt['backbone']} model "
                          f"({str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__}); "
                          "run `cvpipe train` to write it again") from None
    return ImageClassifier(net, ckpt["image_size"], ckpt["mean"], ckpt["std"], ckpt["classes"],
                           ckpt["interpolation"]).eval()


def resolve_weights(p: Params) -> tuple[Path | None, str]:
    """The weights file written by ``download`` and a tag identifying it (its sha256, or the random seed).

    Raises:
        FileNotFoundError: ``download`` has not provided weights for this backbone and source.
    """
    tp = p.train
    manifest_path = p.paths.backbone / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: run `cvpipe download` first")
    manifest = read_json(manifest_path)
    if (manifest.get("backbone"), manifest.get("weights")) != (tp.backbone, tp.weights):
        raise FileNotFoundError(
            f"{p.paths.backbone} holds {manifest.get('backbone')} weights {manifest.get('weights')!r}, but "
            f"train asks for {tp.backbone} weights {tp.weights!r}: run `cvpipe download` again")
    if manifest["file"] is None:
        return None, f"random-seed{p.seed}"
    path = p.paths.backbone / manifest["file"]
    actual = file_hash(path)
    if actual != manifest["sha256"]:
        raise FileNotFoundError(f"{path}: sha256 {actual} differs from its manifest; run `cvpipe download` again")
    return path, actual


def fingerprint(p: Params, mode: str, weights_tag: str, data_hash: str) -> dict[str, Any]:
    """What an epoch's computation depends on; a checkpoint resumes only under the same fingerprint."""
    train = {k: v for k, v in p.train.model_dump(mode="json").items() if k not in RESUMABLE_KEYS}
    return {"mode": mode, "seed": p.seed, "weights": weights_tag, "data_hash": data_hash, "train": train}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def resume_from(path: Path, fp: dict[str, Any], epochs: int, trainable: nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[int, list[dict], dict]:
    """Load a checkpoint into ``trainable`` and ``optimizer`` (and torch's RNG).

    Returns:
        (last epoch done, history so far, best epoch so far).

    Raises:
        ValueError: the checkpoint was made under another fingerprint, or is beyond ``epochs``.
    """
    ckpt = load_torch(path)
    if ckpt["fingerprint"] != fp:
        raise ValueError(f"cannot resume from {path}: it was made with other parameters:\n  "
                         + "\n  ".join(_diff(ckpt["fingerprint"], fp)))
    if ckpt["epoch"] > epochs:
        raise ValueError(f"{path} is at epoch {ckpt['epoch']}, beyond epochs={epochs}")
    trainable.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"], ckpt["history"], ckpt["best"]
