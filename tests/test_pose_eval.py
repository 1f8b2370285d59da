"""The keypoint evaluation itself, on the generated stick-figure set (tests/pose_data.py): AP 1.0 when the
predictions are the labels, lower with jitter, faster-coco-eval == pycocotools; YOLO-pose txt labels and the
COCO json give the same ground truth; keypoint parity and drawing. No model involved (fast)."""
from __future__ import annotations

import numpy as np
import pytest

from exporter.evaluation.dataset import DatasetError, load_dataset
from exporter.evaluation.keypoints import (compare_keypoints, detections_to_coco_keypoints, keypoint_gt, score_keypoints,
                                      sigmas_for)
from runtimes.base import Detections
from runtimes.keypoints import COCO_SKELETON, draw_keypoints, scale_keypoints, skeleton_for
from runtimes.preprocess import Letterbox

from pose_data import make_pose_set


@pytest.fixture(scope="module")
def pose_set(tmp_path_factory):
    return make_pose_set(tmp_path_factory.mktemp("pose_set"), n_images=8, size=(256, 320), seed=7)


def _label_preds(gt: dict, rng=None, sd: float = 0.0) -> list[dict]:
    preds = []
    for a in gt["annotations"]:
        k = np.asarray(a["keypoints"], np.float64).reshape(-1, 3)
        if rng is not None:
            k[:, :2] += rng.normal(0, sd, size=(len(k), 2))
        preds.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
                      "score": float(rng.uniform(0.3, 1.0)) if rng is not None else 1.0,
                      "keypoints": k.reshape(-1).tolist()})
    return preds


@pytest.mark.parametrize("source", ["coco", "yolo"])
def test_ap_is_one_for_the_labels_lower_with_jitter_and_equal_to_pycocotools(pose_set, source):
    ds = load_dataset(pose_set.coco_json if source == "coco" else pose_set.images_dir).for_model(["person"])
    gt = keypoint_gt(ds, 17)
    assert sum(a["num_keypoints"] > 0 for a in gt["annotations"]) >= 8
    sig, name = sigmas_for(17)
    assert name == "coco17"
    exact = score_keypoints(gt, _label_preds(gt), sig)
    assert exact[0] == pytest.approx(1.0) and exact[1] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    last = 1.0
    for sd in (4.0, 10.0):
        preds = _label_preds(gt, rng, sd)
        fast = score_keypoints(gt, preds, sig, "faster-coco-eval")
        ref = score_keypoints(gt, preds, sig, "pycocotools")
        np.testing.assert_allclose(fast, ref, atol=1e-9)  # same numbers as the reference evaluator
        assert fast[0] < last  # more jitter, lower AP
        last = fast[0]
    assert last < 0.9


def test_yolo_pose_labels_and_coco_json_give_the_same_keypoints(pose_set):
    coco = keypoint_gt(load_dataset(pose_set.coco_json).for_model(["person"]), 17)
    yolo = keypoint_gt(load_dataset(pose_set.images_dir).for_model(["person"]), 17)
    assert len(coco["annotations"]) == len(yolo["annotations"])
    for a, b in zip(coco["annotations"], yolo["annotations"]):
        np.testing.assert_allclose(a["keypoints"], b["keypoints"], atol=0.02)  # json rounds to 0.01 px
        assert a["num_keypoints"] == b["num_keypoints"]


def test_detection_labels_or_another_keypoint_count_give_one_line(pose_set, tmp_path):
    ds = load_dataset(pose_set.coco_json).for_model(["person"])
    with pytest.raises(DatasetError, match="has 17 keypoints but the model predicts 5"):
        keypoint_gt(ds, 5)
    boxes_only = dict(ds.gt, annotations=[{k: v for k, v in a.items() if k not in ("keypoints", "num_keypoints")}
                                          for a in ds.gt["annotations"]])
    from dataclasses import replace

    with pytest.raises(DatasetError, match="no keypoint labels"):
        keypoint_gt(replace(ds, gt=boxes_only), 17)
    bad = tmp_path / "labels" / "1.txt"
    bad.parent.mkdir()
    (tmp_path / "images").mkdir()
    import cv2

    cv2.imwrite(str(tmp_path / "images" / "1.png"), np.zeros((32, 32, 3), np.uint8))
    bad.write_text("0 0.5 0.5 0.2 0.2 0.1 0.1\n")  # 5 + 2 values: neither a box row nor a pose row
    with pytest.raises(DatasetError, match="YOLO-pose row"):
        load_dataset(tmp_path / "images")


def test_detections_to_coco_keypoints_and_compare():
    k = np.arange(17 * 3, dtype=np.float32).reshape(1, 17, 3)
    det = Detections(np.array([[1, 2, 11, 22]], np.float32), np.array([0.9], np.float32), np.array([0], np.int32),
                     keypoints=k)
    res = detections_to_coco_keypoints(det, 5, [1])
    assert res[0]["bbox"] == [1.0, 2.0, 10.0, 20.0] and res[0]["keypoints"] == k.reshape(-1).tolist()
    moved = Detections(det.boxes, det.scores, det.classes, keypoints=k + np.array([3, 4, 0.25], np.float32))
    p = compare_keypoints([det], [moved])
    assert p.matched == 1 and p.max_px == pytest.approx(5.0) and p.mean_px == pytest.approx(5.0)
    assert p.visibility_max_abs == pytest.approx(0.25)
    far = Detections(det.boxes + 50, det.scores, det.classes, keypoints=k)
    assert compare_keypoints([det], [far]).matched == 0


def test_keypoints_scale_back_like_boxes_and_draw():
    lb = Letterbox(ratio=0.5, pad=(10.0, 4.0), orig_shape=(100, 200))
    k = np.array([[[20.0, 14.0, 0.9], [500.0, -3.0, 0.1]]], np.float32)
    s = scale_keypoints(k, lb)
    np.testing.assert_allclose(s[0, 0], [20.0, 20.0, 0.9])
    np.testing.assert_allclose(s[0, 1], [200.0, 0.0, 0.1])  # clipped into the image, visibility kept
    assert skeleton_for(17) == COCO_SKELETON and skeleton_for(5) == ()
    img = np.zeros((64, 64, 3), np.uint8)
    pts = np.zeros((17, 3), np.float32)
    pts[:, 0], pts[:, 1], pts[:, 2] = np.linspace(5, 58, 17), np.linspace(5, 58, 17), 1.0
    pts[3, 2] = 0.1  # invisible: no point, no limb to it
    draw_keypoints(img, pts)
    assert img.any() and img[int(pts[0, 1]), int(pts[0, 0])].any()


def test_keypoint_ap_of_a_detection_model_is_one_line(pose_set):
    from conftest import TRAINED
    from exporter.evaluation.keypoints import evaluate_keypoints
    from runtimes.base import Detector

    det = Detector.from_path(TRAINED, imgsz=(256, 256))
    with pytest.raises(DatasetError, match="needs a pose model; this artifact is a 'detect' model"):
        evaluate_keypoints(det, load_dataset(pose_set.coco_json))
