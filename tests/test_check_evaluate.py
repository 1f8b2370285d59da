"""Dataset loading and the COCO-mAP protocol, with oracle detectors (no model needed) and both evaluators."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporter.evaluation.dataset import DatasetError, load_dataset
from exporter.evaluation.evaluate import EVAL_CONFIG, evaluate_map, score_coco
from exporter.errors import UserError
from runtimes.base import Backend, Detector
from runtimes.contract import ModelInfo
from runtimes.preprocess import letterbox

DATA = Path(__file__).parent / "data" / "shapes"
JSON = DATA / "annotations" / "instances_val.json"
NAMES = ["circle", "square", "triangle", "star", "cross"]


class OracleBackend(Backend):
    """Returns the ground truth (optionally disturbed) in network-input pixels as NMS-style outputs.

    It sees only the batch, so it walks the dataset in the evaluator's order; this also checks that order.
    """

    name = "oracle"

    def __init__(self, dataset, imgsz=(320, 320), jitter=0.0, drop=0.0, false_pos=0, seed=0, batch=None):
        self.info = ModelInfo(names=NAMES, stride=[8, 16, 32], imgsz=imgsz, nms="onnx", batch=batch,
                              nms_params={"conf": 0.0, "iou": 0.65, "topk": 300})
        self.ds, self.pos, self.rng = dataset, 0, np.random.default_rng(seed)
        self.jitter, self.drop, self.false_pos = jitter, drop, false_pos

    def infer(self, batch):
        rows = []
        for _ in range(len(batch)):
            rec = self.ds.images[self.pos % len(self.ds)]
            self.pos += 1
            boxes, cls = self.ds.labels(rec.id)
            _, lb = letterbox(np.zeros((rec.height, rec.width, 3), np.uint8), self.info.imgsz)
            boxes = boxes * lb.ratio + np.array([lb.pad[0], lb.pad[1]] * 2, np.float32)
            keep = self.rng.random(len(boxes)) >= self.drop
            boxes, cls = boxes[keep], cls[keep]
            size = np.maximum(boxes[:, 2:] - boxes[:, :2], 1.0)
            boxes = boxes + self.rng.normal(0, self.jitter, boxes.shape) * np.tile(size, 2)
            scores = self.rng.uniform(0.3, 1.0, len(boxes))
            fp = self.rng.uniform(0, 280, (self.false_pos, 2))
            boxes = np.concatenate([boxes, np.hstack([fp, fp + 30])])
            cls = np.concatenate([cls, self.rng.integers(0, 5, self.false_pos)])
            scores = np.concatenate([scores, self.rng.uniform(0.0, 0.6, self.false_pos)])
            rows.append((boxes, scores, cls))
        k = max(1, max(len(r[1]) for r in rows))
        out = {"num_dets": np.zeros((len(batch), 1), np.int32), "det_boxes": np.zeros((len(batch), k, 4), np.float32),
               "det_scores": np.zeros((len(batch), k), np.float32), "det_classes": np.zeros((len(batch), k), np.int32)}
        for i, (b, s, c) in enumerate(rows):
            out["num_dets"][i, 0] = len(s)
            out["det_boxes"][i, :len(s)], out["det_scores"][i, :len(s)], out["det_classes"][i, :len(s)] = b, s, c
        return out


@pytest.fixture(scope="module")
def coco():
    return load_dataset(JSON)


def test_coco_json_loads_and_resolves_images(coco):
    assert coco.kind == "coco" and len(coco) == 200 and coco.n_labels == 1164
    assert coco.category_ids == [0, 1, 2, 3, 4] and coco.names == NAMES
    assert all(r.path.is_file() and r.path.parent == DATA / "images" / "val" for r in coco.images)
    assert load_dataset(DATA).source == JSON  # a dataset root finds annotations/*.json


def test_yolo_labels_describe_the_same_boxes_as_the_json(coco):
    yolo = load_dataset(DATA / "images" / "val")
    assert yolo.kind == "yolo" and len(yolo) == 200 and yolo.n_labels == 1164
    assert [r.id for r in yolo.images] == [r.id for r in coco.images]
    for rec in coco.images[:40]:
        (b1, c1), (b2, c2) = coco.labels(rec.id), yolo.labels(rec.id)
        order1, order2 = (np.lexsort(np.round(np.c_[b, c], 1).T[::-1]) for b, c in ((b1, c1), (b2, c2)))
        np.testing.assert_array_equal(c1[order1], c2[order2])
        np.testing.assert_allclose(b1[order1], b2[order2], atol=1e-3)


def test_oracle_scores_one_and_perturbed_matches_pycocotools(coco):
    ds = coco.subset(40)
    perfect = evaluate_map(Detector(OracleBackend(ds)), ds, batch_size=8, progress=False)
    assert perfect.n_images == 40 and perfect.map50_95 == pytest.approx(1.0, abs=1e-6)
    assert perfect.map50 == pytest.approx(1.0, abs=1e-6) and "NMS inside the graph" in perfect.protocol_note

    noisy = Detector(OracleBackend(ds, jitter=0.04, drop=0.15, false_pos=6, seed=1))
    res = evaluate_map(noisy, ds, batch_size=5, progress=False)
    assert 0.2 < res.map50_95 < 0.9 and res.map50_95 < res.map50
    noisy.backend.pos, noisy.backend.rng = 0, np.random.default_rng(1)
    ref = evaluate_map(noisy, ds, batch_size=5, progress=False, evaluator="pycocotools")
    np.testing.assert_allclose(res.stats, ref.stats, atol=1e-6)
    assert set(res.per_class) == set(NAMES)


def test_fixed_batch_artifact_and_protocol_config_restored(coco):
    ds = coco.subset(11)
    det = Detector(OracleBackend(ds, batch=4))  # 11 images -> chunks of 4, last one padded
    before = det.config
    res = evaluate_map(det, ds, batch_size=8, progress=False)
    assert res.map50_95 == pytest.approx(1.0, abs=1e-6) and det.config is before
    assert res.protocol["conf"] == EVAL_CONFIG.conf == 0.001 and res.protocol["max_det"] == 300
    assert EVAL_CONFIG.iou == 0.65 and EVAL_CONFIG.multi_label


def test_empty_predictions_score_zero(coco):
    stats, per_class = score_coco(coco.subset(3).gt, [])
    assert stats[0] == 0 and per_class == {}


def test_input_size_mismatch_is_one_line(coco):
    with pytest.raises(UserError, match=r"input size 320x320 differs from the requested --img 640x640"):
        evaluate_map(Detector(OracleBackend(coco)), coco.subset(2), imgsz=(640, 640), progress=False)


def test_classes_outside_the_model(coco):
    backend = OracleBackend(coco)
    backend.info.names = NAMES[:3]
    with pytest.raises(DatasetError, match="has 5 classes but the model predicts only 3"):
        evaluate_map(Detector(backend), coco.subset(2), progress=False)


def _copy_yolo(tmp_path: Path, n: int = 4) -> Path:
    img_dir, lbl_dir = tmp_path / "images" / "val", tmp_path / "labels" / "val"
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    for p in sorted((DATA / "images" / "val").glob("*.jpg"))[:n]:
        shutil.copy(p, img_dir / p.name)
        shutil.copy(DATA / "labels" / "val" / f"{p.stem}.txt", lbl_dir / f"{p.stem}.txt")
    return img_dir


def test_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="dataset not found"):
        load_dataset(tmp_path / "nope")
    img_dir = _copy_yolo(tmp_path)
    assert len(load_dataset(img_dir)) == 4
    (tmp_path / "labels" / "val" / "999999.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match="labels do not match images: 1 label file"):
        load_dataset(img_dir)
    (tmp_path / "labels" / "val" / "999999.txt").unlink()
    (tmp_path / "labels" / "val" / "000002.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    ds = load_dataset(img_dir)
    with pytest.raises(DatasetError, match="8 classes but the model predicts only 5"):
        ds.for_model(NAMES)
    (tmp_path / "labels" / "val" / "000002.txt").write_text("1 0.5 0.5\n")
    with pytest.raises(DatasetError, match=r"000002.txt:1: expected 'class cx cy w h'"):
        load_dataset(img_dir)
    shutil.rmtree(tmp_path / "labels")
    with pytest.raises(DatasetError, match="no YOLO labels for the images"):
        load_dataset(img_dir)


def test_coco_json_errors(tmp_path):
    gt = json.loads(JSON.read_text())
    gt["images"] = gt["images"][:3]
    bad = tmp_path / "ann" / "instances_val.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(gt))
    with pytest.raises(DatasetError, match="refers to image_id .* not in 'images'"):
        load_dataset(bad)
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] <= 3]
    bad.write_text(json.dumps(gt))
    with pytest.raises(DatasetError, match="cannot find image '000001.jpg'; looked in"):
        load_dataset(bad)
    (tmp_path / "ann" / "images").mkdir()
    for im in gt["images"][:2]:
        shutil.copy(DATA / "images" / "val" / im["file_name"], tmp_path / "ann" / "images" / im["file_name"])
    with pytest.raises(DatasetError, match="image '000003.jpg' \\(id 3\\) not found"):
        load_dataset(bad)
    shutil.copy(DATA / "images" / "val" / "000003.jpg", tmp_path / "ann" / "images")
    assert len(load_dataset(bad)) == 3
