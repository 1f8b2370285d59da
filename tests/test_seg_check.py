"""Mask evaluation: labels (YOLO-seg txt, COCO polygons, COCO RLE) on a generated polygon set, COCO segm with
faster-coco-eval against pycocotools, and yolo7-bench writing mask mAP + mask parity into its report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.evaluation.dataset import DatasetError
from exporter.evaluation.masks import (evaluate_mask_map, has_masks, load_labels, load_segment_dataset, match_masks,
                                  score_segm)
from runtimes.base import Detections
from runtimes.masks import rle_decode, rle_encode
from tests.seg_data import SEG, make_polygon_dataset, seg_reference


@pytest.fixture(scope="module")
def polys(tmp_path_factory):
    return make_polygon_dataset(tmp_path_factory.mktemp("polys"))


def _gt_as_predictions(ds, erode: int = 0, drop_every: int = 0) -> list[dict]:
    """Predictions made of the ground truth masks (rasterized by pycocotools), optionally damaged."""
    import cv2
    from pycocotools import mask as mask_utils

    preds = []
    h_of = {im["id"]: (im["height"], im["width"]) for im in ds.gt["images"]}
    for k, a in enumerate(ds.gt["annotations"]):
        if drop_every and k % drop_every == 0:
            continue
        h, w = h_of[a["image_id"]]
        seg = a["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else \
            dict(seg, counts=seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"])
        m = mask_utils.decode(rle).astype(np.uint8)
        if erode:
            m = cv2.erode(m, np.ones((3, 3), np.uint8), iterations=erode)
        preds.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
                      "score": 0.9 - 0.001 * k, "segmentation": rle_encode(m.astype(bool))})
    return preds


@pytest.mark.parametrize("source", ["labels", "coco_poly", "coco_rle"])
def test_mask_ap_is_one_on_the_labels_and_evaluators_agree(polys, source):
    path = polys["images"] if source == "labels" else polys[source]
    ds = load_segment_dataset(path)
    assert has_masks(ds) and ds.n_labels > 6
    preds = _gt_as_predictions(ds)
    fast = score_segm(ds.gt, preds, "segm", "faster-coco-eval")
    ref = score_segm(ds.gt, preds, "segm", "pycocotools")
    assert fast[0] == pytest.approx(1.0) and fast[1] == pytest.approx(1.0)
    np.testing.assert_allclose(fast, ref, atol=1e-6)


def test_imperfect_masks_score_below_one_and_evaluators_agree(polys):
    ds = load_segment_dataset(polys["coco_poly"])
    preds = _gt_as_predictions(ds, erode=2, drop_every=4)
    fast = score_segm(ds.gt, preds, "segm", "faster-coco-eval")
    ref = score_segm(ds.gt, preds, "segm", "pycocotools")
    assert 0.05 < fast[0] < 0.95
    np.testing.assert_allclose(fast, ref, atol=1e-6)


def test_yolo_seg_labels_equal_coco_polygons(polys):
    yolo = load_segment_dataset(polys["images"])
    coco = load_segment_dataset(polys["coco_poly"])
    ya = sorted((a["image_id"], a["category_id"] + 1, tuple(np.round(a["segmentation"][0], 3)))
                for a in yolo.gt["annotations"])
    ca = sorted((a["image_id"], a["category_id"], tuple(np.round(a["segmentation"][0], 3)))
                for a in coco.gt["annotations"])
    assert ya == ca
    box_only = load_labels(polys["images"])  # the bench's loader takes the polygon set for box mAP too
    assert box_only.n_labels == yolo.n_labels


def test_box_labels_are_refused_for_masks(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    import cv2

    cv2.imwrite(str(root / "images" / "a.png"), np.zeros((32, 32, 3), np.uint8))
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match="box label, no mask"):
        load_segment_dataset(root / "images")


def test_match_masks_pairs_by_box_and_class():
    m = np.zeros((3, 20, 20), bool)
    m[0, 2:8, 2:8] = m[1, 10:18, 10:18] = m[2, 10:18, 10:18] = True
    ref = Detections(np.array([[2, 2, 8, 8], [10, 10, 18, 18]], np.float32), np.array([0.9, 0.8], np.float32),
                     np.array([0, 1], np.int32), m[:2])
    other = m[:2].copy()
    other[1, 10, 10:18] = False  # one row of 8 off: IoU 56/64
    out = Detections(ref.boxes[::-1].copy(), ref.scores[::-1].copy(), ref.classes[::-1].copy(), other[::-1].copy())
    assert match_masks(ref, out) == pytest.approx([1.0, 56 / 64])
    wrong_class = Detections(ref.boxes, ref.scores, np.array([1, 0], np.int32), m[:2])
    assert match_masks(ref, wrong_class) == []


def test_rle_round_trip():
    m = np.zeros((7, 9), bool)
    m[1:5, 2:8] = True
    rle = rle_encode(m)
    assert rle["size"] == [7, 9] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(rle_decode(rle), m)


@pytest.fixture(scope="module")
def nc3_onnx(tmp_path_factory):
    from exporter.options import ExportOptions, NmsOptions
    from exporter.pipeline import run

    name = "dev_yolov7-seg_w009375_nc3"
    hw = tuple(seg_reference(name)["input"].shape[2:])
    out = tmp_path_factory.mktemp("nc3")
    raw = run(ExportOptions(checkpoint=SEG / f"{name}.pt", out_dir=out / "raw", imgsz=hw)).onnx_path
    tail = run(ExportOptions(checkpoint=SEG / f"{name}.pt", out_dir=out / "tail", imgsz=hw,
                             nms=NmsOptions(mode="onnx", best_class=True))).onnx_path
    return SEG / f"{name}.pt", raw, tail


def test_mask_map_runs_on_a_seg_model(polys, nc3_onnx):
    from runtimes.base import Detector

    ckpt, raw, _ = nc3_onnx
    ds = load_segment_dataset(polys["coco_rle"])
    with Detector.from_path(raw) as det:
        res = evaluate_mask_map(det, ds, batch_size=4)
    assert res.n_detections > 0 and res.n_labels == ds.n_labels
    assert 0.0 <= res.mask_map50_95 <= 1.0 and 0.0 <= res.box_map50_95 <= 1.0
    fast = res.mask_stats
    assert len(fast) == 12


def test_bench_report_has_mask_map_and_parity(polys, nc3_onnx, tmp_path):
    from exporter.check.harness import BenchConfig, run_bench

    ckpt, raw, tail = nc3_onnx
    cfg = BenchConfig(checkpoint=ckpt, artifacts=[raw, tail], out_dir=tmp_path / "bench", data=polys["images"],
                      batches=(1,), runs=1, warmup=0, parity_images=3, eval_batch=4, progress=False,
                      max_images=4)
    report = run_bench(cfg)
    rows = report["artifacts"]  # PyTorch reference, raw ONNX, ONNX with the NMS + masks tail
    assert len(rows) == 3 and rows[0].reference
    for r in rows:
        assert r.mask["n_detections"] > 0 and 0.0 <= r.mask["mask_map50_95"] <= 1.0
    for r in rows[1:]:
        p = r.mask_parity
        assert p["matched"] > 0 and p["mean_iou"] >= 0.99, p
    md = (tmp_path / "bench" / "report.md").read_text()
    assert "## Instance masks" in md and "mask mAP50-95" in md
    saved = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert saved["artifacts"][1]["mask_parity"]["matched"] == rows[1].mask_parity["matched"]
