"""Tests of the ``detect`` stage: pure post-processing on synthetic network outputs, the real
yolov3-tiny weights on scikit-image photos placed in larger canvases, bad inputs, mAP, and
the flow on threads and on a local Dask cluster."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvpipe.io import read_json, write_json
from cvpipe.params import load_params
from tasks.annotate import class_colour, draw_detections
from tasks.boxes import Detections, decode, nms, postprocess
from tasks.detect import merge_shards
from tasks.detect_inputs import list_inputs, plan_inputs, split_shards
from tasks.detect_metrics import coco_map, summarize
from tasks.detect_outputs import COCO80_TO_91, coco_results, detections_csv
from tasks.detect_shard import detect_shard
from tasks.predictor import check_detector, with_layer_threshold
from tests.helpers import DEFAULT_PARAMS, iou, write_params

CAT, PERSON = 15, 0  # Darknet coco.names indices


# --------------------------------------------------------------------------- decode + NMS on synthetic outputs


def row(cx, cy, w, h, obj, scores):
    return [cx, cy, w, h, obj, *scores]


ZERO = row(0, 0, 0, 0, 0, [0, 0, 0])


@pytest.fixture
def synthetic():
    """Two images, three classes, two output layers (N, R, 5 + C) as OpenCV's YOLO layer
    writes them: class columns are objectness x class probability."""
    sizes = np.array([[400, 200], [400, 400]])  # (width, height)
    layer_a = np.array([
        [row(0.5, 0.5, 0.25, 0.5, 0.9, [0, 0.75, 0]),         # -> (150, 50, 100, 100) class 1
         row(0.515625, 0.5, 0.25, 0.5, 0.9, [0, 0.625, 0]),   # same class, IoU 0.88 with the first: suppressed
         row(0.515625, 0.5, 0.25, 0.5, 0.9, [0, 0, 0.5])],    # same place, other class: kept
        [row(0.5, 0.25, 0.25, 0.25, 0.8, [0, 0.5, 0]),        # -> (150, 50, 100, 100): image 0's first box,
                                                              #    same class, but another image: kept
         row(-0.25, 0.5, 0.25, 0.25, 0.95, [0, 0, 0.9]),      # wholly left of the image: no area once clipped
         ZERO],
    ], dtype=np.float32)
    layer_b = np.array([
        [row(0.9375, 0.25, 0.25, 0.25, 0.9, [0.875, 0, 0]),   # -> x 325..425 clipped to 400: (325, 25, 75, 50)
         row(0.25, 0.25, 0.25, 0.25, 0.99, [0.25, 0, 0])],    # objectness 0.99 but score 0.25: dropped
        [row(0.5, 0.5, 0.5, 0.5, 0.7, [0.4, 0.6, 0]),         # -> (100, 100, 200, 200); two classes above
                                                              #    the threshold: the best one, 0.6
         ZERO],
    ], dtype=np.float32)
    return [layer_a, layer_b], sizes


def test_decode_exact_boxes_and_scores(synthetic):
    outputs, sizes = synthetic
    d = decode(outputs, sizes, conf_threshold=0.3)
    assert d.image.tolist() == [0, 0, 0, 0, 1, 1]
    np.testing.assert_array_equal(d.boxes, [[150, 50, 100, 100], [156.25, 50, 100, 100], [156.25, 50, 100, 100],
                                            [325, 25, 75, 50], [150, 50, 100, 100], [100, 100, 200, 200]])
    np.testing.assert_array_equal(d.scores, np.float32([0.75, 0.625, 0.5, 0.875, 0.5, 0.6]))
    assert d.class_ids.tolist() == [1, 1, 2, 0, 1, 1]


def test_decode_single_image_output_without_batch_axis(synthetic):
    outputs, sizes = synthetic
    d = decode([o[1] for o in outputs], sizes[1:], conf_threshold=0.3)  # OpenCV drops the axis when N is 1
    assert d.image.tolist() == [0, 0]
    np.testing.assert_array_equal(d.boxes, [[150, 50, 100, 100], [100, 100, 200, 200]])


def test_nms_is_class_and_image_aware(synthetic):
    outputs, sizes = synthetic
    kept = nms(decode(outputs, sizes, 0.3), num_classes=3, iou_threshold=0.5)
    assert kept.image.tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(kept.scores, np.float32([0.875, 0.75, 0.5, 0.6, 0.5]))
    assert kept.class_ids.tolist() == [0, 1, 2, 1, 1]
    np.testing.assert_array_equal(kept.boxes, [[325, 25, 75, 50], [150, 50, 100, 100], [156.25, 50, 100, 100],
                                               [100, 100, 200, 200], [150, 50, 100, 100]])


def test_nms_threshold_is_an_iou_bound():
    boxes = np.array([[0, 0, 100, 100], [20, 0, 100, 100]], dtype=np.float64)  # IoU 80/120 = 0.667
    d = Detections(np.zeros(2, int), boxes, np.float32([0.9, 0.8]), np.zeros(2, int))
    assert nms(d, 80, 0.6).scores.tolist() == pytest.approx([0.9])
    assert nms(d, 80, 0.7).scores.tolist() == pytest.approx([0.9, 0.8])


def test_postprocess_splits_per_image(synthetic):
    outputs, sizes = synthetic
    per_image = postprocess(outputs, sizes, 3, 0.3, 0.5)
    assert [len(d.scores) for d in per_image] == [3, 2]
    assert per_image[1].image.tolist() == [0, 0]
    assert per_image[1].scores.tolist() == pytest.approx([0.6, 0.5])
    empty = postprocess([o * 0 for o in outputs], sizes, 3, 0.3, 0.5)
    assert [len(d.scores) for d in empty] == [0, 0]


def test_layer_threshold_set_in_every_yolo_section_only():
    cfg = "[net]\nwidth=416\n\n[yolo]\nmask=0,1\nignore_thresh = .7\n\n[convolutional]\nthresh=9\n\n" \
          "[yolo]\nthresh = 0.2\nclasses=80\n"
    out = with_layer_threshold(cfg, 0.05)
    assert out.count("thresh=0.05") == 2
    assert "thresh = 0.2" not in out and "ignore_thresh = .7" in out and "[convolutional]\nthresh=9" in out


# --------------------------------------------------------------------------- inputs, shards, drawing, outputs


def test_list_inputs_folder_txt_glob(tmp_path):
    for name in ("b.jpg", "a.PNG", "notes.md", ".hidden.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jpg").write_bytes(b"x")
    assert [p.name for p in list_inputs(str(tmp_path))] == ["a.PNG", "b.jpg"]
    assert [p.name for p in list_inputs(str(tmp_path / "**" / "*.jpg"))] == ["b.jpg", "c.jpg"]
    listing = tmp_path / "list.txt"
    listing.write_text("# images\nsub/c.jpg\n\nmissing.jpg\n/abs/x.jpg\n")
    assert list_inputs(str(listing)) == [tmp_path / "sub/c.jpg", tmp_path / "missing.jpg", Path("/abs/x.jpg")]
    with pytest.raises(FileNotFoundError, match="no images found"):
        list_inputs(str(tmp_path / "nothing*.jpg"))


def test_plan_names_and_shards(tmp_path):
    items = plan_inputs([Path("x/a.jpg"), Path("y/a.png"), Path("b.jpg")])
    assert [(i.image_id, i.out_name) for i in items] == [(1, "a.jpg"), (2, "a_2.jpg"), (3, "b.jpg")]
    assert items[0].path == "x/a.jpg" and Path(items[0].file).is_absolute()
    assert [len(s) for s in split_shards(list(range(10)), 3)] == [3, 4, 3]
    assert split_shards([1, 2], 5) == [[1], [2]]
    assert sum(split_shards(list(range(7)), 2), []) == list(range(7))


def test_check_detector_names_the_mismatch(tmp_path):
    for f in ("model.cfg", "model.weights", "classes.txt"):
        (tmp_path / f).write_text("x")
    with pytest.raises(FileNotFoundError, match="not found"):
        check_detector(tmp_path, "yolov3")
    write_json(tmp_path / "manifest.json", {"model": "yolov3-tiny"})
    with pytest.raises(FileNotFoundError, match="holds yolov3-tiny files but detect.model is yolov3"):
        check_detector(tmp_path, "yolov3")
    check_detector(tmp_path, "yolov3-tiny")


def test_draw_uses_class_colours_and_captions():
    classes = [f"c{i}" for i in range(80)]
    assert len({class_colour(c) for c in range(80)}) == 80
    image = np.zeros((200, 300, 3), np.uint8)
    d = Detections(np.zeros(2, int), np.array([[50.0, 60, 100, 80], [200, 100, 60, 60]]),
                   np.float32([0.9, 0.5]), np.array([CAT, PERSON]))
    out = draw_detections(image, d, classes)
    assert image.max() == 0  # the input is not drawn on
    assert tuple(out[100, 50]) == class_colour(CAT)      # left edge of the first box
    assert tuple(out[130, 200]) == class_colour(PERSON)  # left edge of the second box
    label = out[40:60, 50:100].reshape(-1, 3)            # caption above the first box: filled + ink
    colours = {tuple(p) for p in label}
    assert class_colour(CAT) in colours and len(colours) > 2


def _records():
    return [
        {"image_id": 1, "path": "imgs/a.jpg", "width": 200, "height": 100, "detections": [
            {"class_id": PERSON, "class_name": "person", "score": 0.9, "box": {"x": 10, "y": 10, "w": 100, "h": 50}}]},
        {"image_id": 2, "path": "imgs/b.jpg", "width": 200, "height": 100, "detections": [
            {"class_id": CAT, "class_name": "cat", "score": 0.7, "box": {"x": 5, "y": 5, "w": 10, "h": 10}},
            {"class_id": PERSON, "class_name": "person", "score": 0.8, "box": {"x": 20, "y": 20, "w": 100, "h": 50}}]},
    ]


def coco_gt(records: list[dict], shift: dict[str, float] | None = None) -> dict:
    """A COCO ground truth made from detections (image ids deliberately not the records'),
    with the boxes of the named files shifted right by the given fraction of their width."""
    images, anns = [], []
    for r in records:
        img_id = 100 + r["image_id"]
        name = Path(r["path"]).name
        images.append({"id": img_id, "file_name": name, "width": r["width"], "height": r["height"]})
        for d in r["detections"]:
            x, y, w, h = (d["box"][k] for k in "xywh")
            x += (shift or {}).get(name, 0.0) * w
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": COCO80_TO_91[d["class_id"]],
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    cats = [{"id": i, "name": str(i)} for i in sorted(set(COCO80_TO_91))]
    return {"images": images, "annotations": anns, "categories": cats}


def test_coco_results_and_csv():
    records = _records()
    res = coco_results(records)
    assert res == [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 50], "score": 0.9},
                   {"image_id": 2, "category_id": 17, "bbox": [5, 5, 10, 10], "score": 0.7},
                   {"image_id": 2, "category_id": 1, "bbox": [20, 20, 100, 50], "score": 0.8}]
    rows = list(csv.DictReader(detections_csv(records).splitlines()))
    assert [(r["path"], r["class_name"], r["score"], r["x"]) for r in rows] == [
        ("imgs/a.jpg", "person", "0.9", "10"), ("imgs/b.jpg", "cat", "0.7", "5"), ("imgs/b.jpg", "person", "0.8", "20")]


def test_map_perfect_and_shifted(tmp_path):
    records = _records()
    records[1]["detections"] = records[1]["detections"][1:]  # two person boxes, one per image
    res = coco_results(records)
    write_json(tmp_path / "gt.json", coco_gt(records))
    assert coco_map(res, records, tmp_path / "gt.json") == {"map50": 1.0, "map50_95": 1.0, "annotated_images": 2}
    # b's ground truth moved by 20% of its width: IoU 0.8 / 1.2 = 0.667, a true positive at IoU 0.5-0.65
    # (4 thresholds) and a false positive above (6): AP there = 51 of 101 recall points.
    write_json(tmp_path / "shifted.json", coco_gt(records, {"b.jpg": 0.2}))
    m = coco_map(res, records, tmp_path / "shifted.json")
    assert m["map50"] == pytest.approx(1.0)
    assert m["map50_95"] == pytest.approx((4 + 6 * 51 / 101) / 10)
    write_json(tmp_path / "far.json", coco_gt(records, {"b.jpg": 0.5}))  # IoU 1/3: a miss at every threshold
    m = coco_map(res, records, tmp_path / "far.json")
    assert m["map50"] == pytest.approx(51 / 101) and m["map50_95"] == pytest.approx(51 / 101)
    other = [dict(records[0], path="elsewhere/z.jpg")]
    with pytest.raises(ValueError, match="none of the 1 processed images"):
        coco_map(res, other, tmp_path / "gt.json")


# --------------------------------------------------------------------------- real yolov3-tiny weights


def shared_detector(detector_dir: Path) -> dict:
    """Overrides that point ``paths.detector`` at the session's detector, outside the project."""
    return {"paths.detector": str(detector_dir), "paths.allow_outside": True}


@pytest.fixture(scope="session")
def shard_run(scene, detector_dir, tmp_path_factory):
    """One shard over every scene file (plus a missing path), with the repo's detect params."""
    tmp = tmp_path_factory.mktemp("shard")
    p = load_params(write_params(tmp, shared_detector(detector_dir)))
    items = plan_inputs(list_inputs(str(scene["dir"])) + [scene["dir"] / "missing.jpg"])
    (tmp / "images").mkdir()
    result = detect_shard(items, detector_dir, p.detect, tmp / "images")
    return {"items": items, "result": result, "images": tmp / "images",
            "records": {Path(r["path"]).name: r for r in result.records},
            "failures": {Path(f["path"]).name: f["reason"] for f in result.failures}}


def _dets(rec: dict, cls: str) -> list[dict]:
    return [d for d in rec["detections"] if d["class_name"] == cls]


@pytest.mark.slow
def test_real_weights_find_the_placed_cat_and_person(shard_run, scene):
    cats = _dets(shard_run["records"]["cat.jpg"], "cat")
    assert cats, shard_run["records"]["cat.jpg"]
    best = max(iou([c["box"][k] for k in "xywh"], scene["cat_box"]) for c in cats)
    assert best >= 0.5
    assert all(c["score"] > 0.6 for c in cats)  # detect.conf_threshold of params.yaml
    persons = _dets(shard_run["records"]["astronaut.png"], "person")
    assert persons
    px, py, pw, ph = scene["person_box"]
    for p in persons:  # each person box lies where the astronaut was pasted
        x, y, w, h = (p["box"][k] for k in "xywh")
        assert px <= x + w / 2 <= px + pw and py <= y + h / 2 <= py + ph


@pytest.mark.slow
def test_every_input_is_a_record_or_a_failure(shard_run):
    ids = sorted([r["image_id"] for r in shard_run["result"].records]
                 + [f["image_id"] for f in shard_run["result"].failures])
    assert ids == [i.image_id for i in shard_run["items"]]
    assert set(shard_run["records"]).isdisjoint(shard_run["failures"])


@pytest.mark.slow
@pytest.mark.parametrize("name, reason", [
    ("corrupt.jpg", "not a decodable image"),
    ("badheader.jpg", "not a decodable image"),
    ("empty.jpg", "empty file"),
    ("notes.jpg", "not a decodable image"),
    ("missing.jpg", "No such file or directory"),
])
def test_bad_inputs_become_failures(shard_run, name, reason):
    assert shard_run["failures"][name] == reason


@pytest.mark.slow
def test_converted_inputs_are_detected(shard_run, scene):
    recs = shard_run["records"]
    # 16-bit: value * 257 converts back exactly, so the detections are those of the 8-bit file
    assert recs["astronaut16.png"]["detections"] == recs["astronaut.png"]["detections"]
    for name in ("gray.png", "rgba.png"):
        assert (recs[name]["width"], recs[name]["height"]) == (800, 600)
        cats = _dets(recs[name], "cat")
        assert cats and max(iou([c["box"][k] for k in "xywh"], scene["cat_box"]) for c in cats) >= 0.5
    assert recs["tiny.png"]["width"] == recs["tiny.png"]["height"] == 1
    assert recs["tiny.png"]["detections"] == []


@pytest.mark.slow
def test_annotated_images_are_written(shard_run, scene):
    files = sorted(p.name for p in shard_run["images"].iterdir())
    assert files == sorted(f"{Path(n).stem}.jpg" for n in shard_run["records"])
    drawn = cv2.imread(str(shard_run["images"] / "cat.jpg"))
    original = cv2.imread(str(scene["dir"] / "cat.jpg"))
    assert drawn.shape == original.shape
    x, y, w, h = (round(v) for v in _dets(shard_run["records"]["cat.jpg"], "cat")[0]["box"].values())
    # the box outline is the cat colour (JPEG-compressed, so approximately)
    edge = cv2.cvtColor(drawn[y + h // 2: y + h // 2 + 1, x: x + 1], cv2.COLOR_BGR2RGB)[0, 0].astype(int)
    assert np.abs(edge - class_colour(CAT)).max() < 40


@pytest.mark.slow
def test_conf_threshold_below_the_layer_default_is_honoured(scene, detector_dir):
    # NMS off (no IoU is above 1), so the weak boxes around the cat stay
    p = load_params(DEFAULT_PARAMS).detect.model_copy(update={"conf_threshold": 0.05, "nms_threshold": 1.0})
    items = plan_inputs([scene["dir"] / "cat.jpg"])
    scores = [d["score"] for d in detect_shard(items, detector_dir, p).records[0]["detections"]]
    assert min(scores) < 0.2 and all(s > 0.05 for s in scores)  # OpenCV's layer alone stops at 0.2


# --------------------------------------------------------------------------- flow: threads and Dask


@pytest.fixture(scope="module")
def threads_run(prefect_server, scene, detector_dir, tmp_path_factory):
    """The flow with the default thread runner on a .txt list of the scene (plus a missing path)."""
    from flows.detect import detect_flow

    tmp = tmp_path_factory.mktemp("threads")
    listing = tmp / "inputs.txt"
    names = sorted(p.name for p in scene["dir"].iterdir()) + ["missing.jpg"]
    listing.write_text("".join(f"{scene['dir'] / n}\n" for n in names))
    pf = write_params(tmp, shared_detector(detector_dir))
    summary = detect_flow(str(pf), input=str(listing))
    return {"tmp": tmp, "params": load_params(pf), "listing": listing, "names": names, "summary": summary}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_flow_writes_every_output(threads_run):
    out = threads_run["params"].paths.detect
    summary = threads_run["summary"]
    records = _read_jsonl(out / "detections.jsonl")
    failures = read_json(out / "failures.json")
    assert summary == read_json(out / "summary.json")
    assert read_json(out / "metrics.json") == {k: summary[k] for k in (
        "inputs", "images", "failures", "detections", "images_per_s", "forward_images_per_s")}
    assert summary["inputs"] == len(threads_run["names"]) == len(records) + len(failures)
    assert (summary["images"], summary["failures"]) == (len(records), len(failures)) == (6, 5)
    assert sorted(Path(r["path"]).name for r in records) == [
        "astronaut.png", "astronaut16.png", "cat.jpg", "gray.png", "rgba.png", "tiny.png"]
    assert {Path(f["path"]).name: f["reason"] for f in failures}["missing.jpg"] == "No such file or directory"
    assert summary["per_class"]["cat"] >= 3 and summary["per_class"]["person"] >= 2
    assert summary["detections"] == sum(len(r["detections"]) for r in records) == sum(summary["per_class"].values())
    assert summary["images_per_s"] > 0 and summary["forward_images_per_s"] > 0
    coco = read_json(out / "coco_results.json")
    assert len(coco) == summary["detections"] and {c["category_id"] for c in coco} >= {1, 17}
    rows = list(csv.DictReader((out / "detections.csv").read_text().splitlines()))
    assert len(rows) == summary["detections"]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        Path(r["annotated"]).name for r in records)


@pytest.mark.slow
def test_flow_logs_to_mlflow(threads_run):
    from mlflow.tracking import MlflowClient

    from flows.tracking import tracking_uri

    p = threads_run["params"]
    client = MlflowClient(tracking_uri(p))
    exp = client.get_experiment_by_name(p.mlflow.experiment)
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'detect'")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["images"] == threads_run["summary"]["images"]
    assert run.data.metrics["per_class.cat"] == threads_run["summary"]["per_class"]["cat"]
    assert run.data.params["detect.model"] == "yolov3-tiny"


@pytest.mark.slow
def test_dask_cluster_gives_the_same_detections_and_map(threads_run, detector_dir, tmp_path):
    """A local Dask cluster of 2 worker processes; ground truth made from the thread run's
    detections, so its mAP must be 1.0."""
    from flows.detect import detect_flow

    threads_records = _read_jsonl(threads_run["params"].paths.detect / "detections.jsonl")
    write_json(tmp_path / "gt.json", coco_gt(threads_records))
    pf = write_params(tmp_path, {**shared_detector(detector_dir), "detect.task_runner": "dask",
                                 "detect.workers": 2, "detect.save_images": False,
                                 "detect.annotations": str(tmp_path / "gt.json")})
    summary = detect_flow(str(pf), input=str(threads_run["listing"]))
    out = load_params(pf).paths.detect
    records = _read_jsonl(out / "detections.jsonl")
    strip = lambda recs: [{k: v for k, v in r.items() if k != "annotated"} for r in recs]  # noqa: E731
    assert strip(records) == strip(threads_records)
    assert read_json(out / "failures.json") == read_json(threads_run["params"].paths.detect / "failures.json")
    assert (summary["map50"], summary["map50_95"], summary["annotated_images"]) == (1.0, 1.0, 6)
    assert not (out / "images").exists()


def test_summary_counts():
    from tasks.detect_shard import ShardResult

    recs = _records()
    shards = [ShardResult(recs[:1], [], dict.fromkeys(("preprocess", "forward", "postprocess", "draw"), 1.0), 10, 12),
              ShardResult(recs[1:], [{"image_id": 3, "path": "c.jpg", "reason": "empty file"}],
                          dict.fromkeys(("preprocess", "forward", "postprocess", "draw"), 1.0), 11, 14)]
    records, failures = merge_shards(shards[::-1])
    assert [r["image_id"] for r in records] == [1, 2]
    s = summarize(shards, records, failures)
    assert (s["inputs"], s["images"], s["failures"], s["detections"]) == (3, 2, 1, 3)
    assert s["per_class"] == {"cat": 1, "person": 2}
    assert s["images_per_s"] == pytest.approx(3 / 4) and s["forward_images_per_s"] == pytest.approx(1.0)
