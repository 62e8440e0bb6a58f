"""A small labelled detection set from photos that ship with scikit-image and matplotlib, and
mAP@0.5 of the ``detect`` stage on it for each ``detect.resize`` (and backend).

    python -m bench.detect_labelled [--model yolov3-tiny] [--backends opencv torch] [--work /tmp/cvpipe-bench]
    python -m bench.detect_labelled --write-annotations     # regenerate data/annotations/samples_coco.json

The boxes were drawn by hand on the original photos (:data:`BOXES`, x, y, w, h in pixels, COCO
style: the whole visible object). Each photo is also written as ``<name>_scene.jpg``, placed at
``download.sample_scale`` on a ``download.sample_canvas`` grey canvas exactly as the download stage
does, and its boxes are mapped there by the same geometry; the four photos of
``download.samples`` therefore carry the same file names and bytes as the download stage's
``data/samples``, so ``detect.annotations: data/annotations/samples_coco.json`` evaluates them too.
The images are generated (never committed); the annotation file is committed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from cvpipe.io import write_json
from cvpipe.params import load_params
from tasks.detect_inputs import plan_inputs
from tasks.detect_metrics import coco_map
from tasks.detect_outputs import COCO80_TO_91, coco_results
from tasks.detect_shard import detect_shard
from tasks.download import download_detector
from tasks.samples import place_on_canvas

ROOT = Path(__file__).resolve().parents[1]
ANNOTATIONS = ROOT / "data" / "annotations" / "samples_coco.json"
#: Darknet coco.names index of the classes that appear in :data:`BOXES`
CLASSES = {"person": 0, "motorbike": 3, "tie": 27, "cup": 41, "spoon": 44, "cat": 15}
COCO_NAMES = {"person": "person", "motorbike": "motorcycle", "tie": "tie", "cup": "cup", "spoon": "spoon",
              "cat": "cat"}
#: hand-drawn boxes on the original photos: {photo: [(class, x, y, w, h)]}; rocket has no COCO object
BOXES: dict[str, list[tuple[str, int, int, int, int]]] = {
    "astronaut": [("person", 28, 15, 337, 497)],
    "chelsea": [("cat", 0, 0, 451, 300)],
    "coffee": [("cup", 172, 18, 243, 290), ("spoon", 323, 66, 102, 262)],
    "rocket": [],
    "motorcycle": [("motorbike", 92, 15, 593, 437)],
    "camera": [("person", 0, 65, 335, 447)],
    "grace_hopper": [("person", 15, 25, 497, 575), ("tie", 213, 405, 87, 120)],
}


def load_photo(name: str) -> np.ndarray:
    """The RGB uint8 photo ``name`` from scikit-image's data or matplotlib's sample data."""
    import skimage.data

    if name == "motorcycle":
        img = skimage.data.stereo_motorcycle()[0]
    elif name == "grace_hopper":
        from matplotlib import cbook

        img = cv2.cvtColor(cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))),
                           cv2.COLOR_BGR2RGB)
    else:
        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    return np.ascontiguousarray(np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3])


def labelled_images(scale: float, canvas_wh: tuple[int, int]) -> dict[str, tuple[np.ndarray, list]]:
    """{file name: (RGB image, [(class, x, y, w, h)])}: every photo and its ``_scene`` variant."""
    out = {}
    for name, boxes in BOXES.items():
        photo = load_photo(name)
        out[f"{name}.jpg"] = (photo, [(c, float(x), float(y), float(w), float(h)) for c, x, y, w, h in boxes])
        canvas, (x0, y0, sw, sh) = place_on_canvas(photo, scale, canvas_wh)
        kx, ky = sw / photo.shape[1], sh / photo.shape[0]
        out[f"{name}_scene.jpg"] = (canvas, [(c, round(x0 + x * kx, 2), round(y0 + y * ky, 2), round(w * kx, 2),
                                              round(h * ky, 2)) for c, x, y, w, h in boxes])
    return out


def export_labelled(out_dir: Path, scale: float, canvas_wh: tuple[int, int]) -> list[Path]:
    """Write the labelled images as JPEGs (quality 95, as the download stage) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, (img, _) in labelled_images(scale, canvas_wh).items():
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok, fname
        (out_dir / fname).write_bytes(buf.tobytes())
        paths.append(out_dir / fname)
    return paths


def annotations(scale: float, canvas_wh: tuple[int, int]) -> dict:
    """The labelled set in COCO format (official category ids)."""
    images, anns = [], []
    for i, (fname, (img, boxes)) in enumerate(labelled_images(scale, canvas_wh).items(), start=1):
        images.append({"id": i, "file_name": fname, "width": int(img.shape[1]), "height": int(img.shape[0])})
        for c, x, y, w, h in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": COCO80_TO_91[CLASSES[c]],
                         "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0})
    cats = [{"id": COCO80_TO_91[k], "name": COCO_NAMES[c]} for c, k in sorted(CLASSES.items(), key=lambda t: t[1])]
    return {"info": {"description": "hand-labelled scikit-image / matplotlib sample photos and their scenes "
                     "(bench/detect_labelled.py)"}, "images": images, "annotations": anns, "categories": cats}


def evaluate(paths: list[Path], det_dir: Path, dp, annotation_file: Path) -> dict:
    """mAP of one detect configuration on the labelled images."""
    result = detect_shard(plan_inputs(paths), det_dir, dp)
    return coco_map(coco_results(result.records), result.records, annotation_file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="yolov3-tiny", choices=["yolov3", "yolov3-tiny"])
    ap.add_argument("--backends", nargs="+", default=["opencv"], choices=["opencv", "torch"])
    ap.add_argument("--conf", type=float, nargs="+", default=[0.01, 0.25],
                    help="score thresholds (mAP is usually read at a low one; params.yaml's is added)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cvpipe-bench"))
    ap.add_argument("--write-annotations", action="store_true", help=f"write {ANNOTATIONS.relative_to(ROOT)} and stop")
    args = ap.parse_args()

    p = load_params(ROOT / "params.yaml")
    scale, canvas = p.download.sample_scale, tuple(p.download.sample_canvas)
    if args.write_annotations:
        ANNOTATIONS.parent.mkdir(parents=True, exist_ok=True)
        write_json(ANNOTATIONS, annotations(scale, canvas))
        print(f"wrote {ANNOTATIONS}")
        return
    det_dir = args.work / args.model
    download_detector(args.model, det_dir, p.download, cache_dir=args.work / "cache")
    paths = export_labelled(args.work / "labelled", scale, canvas)
    gt = json.loads(ANNOTATIONS.read_text())
    print(f"{args.model} at {p.detect.input_size} px on {len(paths)} images, {len(gt['annotations'])} boxes")
    rows = []
    for conf in sorted({*args.conf, p.detect.conf_threshold}):
        for backend in args.backends:
            for resize in ("stretch", "letterbox"):
                dp = p.detect.model_copy(update={"model": args.model, "backend": backend, "resize": resize,
                                                 "conf_threshold": conf})
                m = evaluate(paths, det_dir, dp, ANNOTATIONS)
                rows.append({"conf": conf, "backend": backend, "resize": resize,
                             "map50": round(m["map50"], 4), "map50_95": round(m["map50_95"], 4)})
                print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
