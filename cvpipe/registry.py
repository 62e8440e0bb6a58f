"""MLflow model registry: register the best evaluated model; `champion` only when it beats the current one.

`cvpipe predict` loads ``models:/<name>@champion`` (an image classifier that takes
uint8 (N, C, H, W) images and returns logits, with its class names) and prints the
top-k classes of each image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cvpipe.params import Params

CHAMPION = "champion"


def register_best(p: Params, results: dict[str, dict[str, Any]], run_ids: dict[str, str]) -> dict[str, Any]:
    """Register the model with the highest test accuracy; move `champion` to it only if it is better.

    Args:
        p: parameters (tracking store and registered model name).
        results: {mode: {"test_acc": float, ...}} from evaluate.
        run_ids: {mode: MLflow run id that logged that mode's model as ``model``}.

    Returns:
        {"name", "version", "mode", "test_acc", "champion": bool, "previous_champion_acc"}.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from cvpipe.tracking import configure

    client, _ = configure(p)
    candidates = {m: r for m, r in results.items() if m in run_ids}
    if not candidates:
        raise ValueError("no evaluated model has an MLflow run to register")
    mode = max(candidates, key=lambda m: candidates[m]["test_acc"])
    acc = float(candidates[mode]["test_acc"])
    name = p.mlflow.registered_model
    mv = mlflow.register_model(f"runs:/{run_ids[mode]}/model", name)
    import json

    from cvpipe.io import read_json

    classes = read_json(p.paths.processed / "card.json")["classes"]
    for k, v in {"test_acc": acc, "mode": mode, "backbone": p.train.backbone,
                 "dataset": p.data.dataset, "classes": json.dumps(classes)}.items():
        client.set_model_version_tag(name, mv.version, k, str(v))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        prev = float(current.tags.get("test_acc", "-inf"))
    except MlflowException:
        current, prev = None, None
    promote = prev is None or acc > prev
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return {"name": name, "version": int(mv.version), "mode": mode, "test_acc": acc,
            "champion": promote, "previous_champion_acc": prev}


def image_batch(paths: list[Path], channels: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Each image as uint8 (1, C, H, W); C=1 for models trained on grey images (e.g. digits).

    ``size`` (H, W), when given, is the input size the model was exported with.
    """
    import cv2

    from tasks.preprocess import read_image

    out = []
    for path in paths:
        rgb = read_image(path)
        if size is not None and rgb.shape[:2] != size:
            rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        if channels == 1:
            out.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[None, None])
        else:
            out.append(rgb.transpose(2, 0, 1)[None])
    return out


def top_k(logits: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable classes (softmax of the logits), most probable first."""
    z = logits - logits.max()
    prob = np.exp(z) / np.exp(z).sum()
    idx = np.argsort(-prob)[:k]
    return [(classes[i], float(prob[i])) for i in idx]


def predict(p: Params, paths: list[Path], k: int = 3, alias: str = CHAMPION) -> list[dict[str, Any]]:
    """Classify images with ``models:/<registered_model>@<alias>``.

    Returns:
        One {"path", "top": [(class, probability), ...]} per image.
    """
    import json

    import mlflow.pytorch
    import torch

    from cvpipe.tracking import configure

    client, _ = configure(p)
    uri = f"models:/{p.mlflow.registered_model}@{alias}"
    version = client.get_model_version_by_alias(p.mlflow.registered_model, alias)
    model = mlflow.pytorch.load_model(uri, map_location="cpu")
    try:
        model.eval()
    except NotImplementedError:
        pass  # MLflow 3 saves PyTorch models with torch.export (no pickle): already an inference graph
    channels, size = _input_shape(uri)
    classes = json.loads(version.tags["classes"]) if "classes" in version.tags else None
    results = []
    with torch.inference_mode():
        for path, x in zip(paths, image_batch(paths, channels, size)):
            logits = model(torch.from_numpy(np.ascontiguousarray(x)))[0].float().numpy()
            names = classes or [str(i) for i in range(len(logits))]
            results.append({"path": str(path), "top": top_k(logits, names, k)})
    return results


def _input_shape(uri: str) -> tuple[int, tuple[int, int] | None]:
    """Channels and fixed (H, W) of the model's input, from its signature (None: any size)."""
    from mlflow.models import get_model_info

    sig = get_model_info(uri).signature
    shape = sig.inputs.inputs[0].shape if sig is not None else (-1, 3, -1, -1)
    channels = int(shape[1]) if shape[1] in (1, 3) else 3
    size = (int(shape[2]), int(shape[3])) if shape[2] > 0 and shape[3] > 0 else None
    return channels, size
