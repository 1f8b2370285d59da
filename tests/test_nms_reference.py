"""The numpy NMS references: official YOLOv7 semantics and the EfficientNMS_TRT plugin's attributes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtimes.nms_reference import efficient_nms_reference, non_max_suppression, xywh2xyxy

FIXTURES = sorted(Path(__file__).parent.joinpath("data", "official").glob("*.npz"))


def test_fixtures_present():
    assert len(FIXTURES) >= 9


@pytest.mark.parametrize("npz", FIXTURES, ids=lambda p: p.stem)
def test_matches_official_nms(npz):
    """On the official fused raw output, our NMS gives the official result (stored at conf .25, iou .45)."""
    z = np.load(npz)
    (got,) = non_max_suppression(z["out_fused"], conf=0.25, iou=0.45)
    ref = z["nms_fused"]
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got[:, :4], ref[:, :4], atol=1e-3)
    np.testing.assert_allclose(got[:, 4], ref[:, 4], atol=1e-6)
    np.testing.assert_array_equal(got[:, 5], ref[:, 5])


def _pred(rows, nc):
    return np.asarray(rows, np.float32).reshape(1, -1, 5 + nc)


def test_single_class_score_is_objectness():
    """Official: for nc == 1 the (untrained) class output is ignored; nc > 1 multiplies obj * cls."""
    (one,) = non_max_suppression(_pred([[50, 50, 20, 20, 0.9, 0.5]], 1))
    assert one[0, 4] == pytest.approx(0.9)
    (two,) = non_max_suppression(_pred([[50, 50, 20, 20, 0.9, 0.5, 0.1]], 2))
    assert two[0, 4] == pytest.approx(0.45)
    z = np.load(next(p for p in FIXTURES if "nc1" in p.stem))
    (dets,) = non_max_suppression(z["out_fused"])
    obj = z["out_fused"][0, :, 4]
    assert np.isin(dets[:, 4], obj).all()  # every score is some anchor's objectness, untouched


def test_multi_label_agnostic_and_max_det():
    rows = [[100, 100, 50, 50, 1.0, 0.9, 0.6],  # box A: both classes pass
            [104, 102, 50, 50, 1.0, 0.1, 0.8]]  # box B overlaps A (IoU 0.79), class 1
    pred = _pred(rows, 2)
    (best,) = non_max_suppression(pred)
    assert [(round(float(s), 2), int(c)) for s, c in best[:, 4:]] == [(0.9, 0), (0.8, 1)]
    (multi,) = non_max_suppression(pred, multi_label=True)
    assert [(round(float(s), 2), int(c)) for s, c in multi[:, 4:]] == [(0.9, 0), (0.8, 1)]  # A-c1 loses to B-c1
    (agn,) = non_max_suppression(pred, agnostic=True)
    assert len(agn) == 1 and agn[0, 5] == 0
    far = pred.copy()
    far[0, 1, :2] = 400
    (multi_far,) = non_max_suppression(far, multi_label=True)
    assert sorted(multi_far[:, 5].tolist()) == [0, 1, 1]  # A kept once per class
    assert len(non_max_suppression(far, multi_label=True, max_det=2)[0]) == 2
    np.testing.assert_array_equal(multi_far[:, 4], np.sort(multi_far[:, 4])[::-1])


def test_thresholds_are_strict_like_the_official():
    """IoU exactly at the threshold does not suppress (torchvision: IoU > iou); ditto scores (> conf)."""
    pred = _pred([[2, 0.5, 4, 1, 0.9, 1.0], [1, 0.5, 2, 1, 0.8, 1.0]], 1)  # IoU exactly 0.5
    assert len(non_max_suppression(pred, iou=0.5)[0]) == 2
    assert len(non_max_suppression(pred, iou=0.49)[0]) == 1
    assert len(non_max_suppression(pred, conf=0.8)[0]) == 1
    xyxy = xywh2xyxy(pred[0, :, :4])
    ref = efficient_nms_reference(xyxy[None], pred[..., 4:5], 0.8, 0.5, 10)
    assert ref[0][0, 0] == 1  # the plugin: score >= conf and IoU >= iou (a documented difference)


def test_reference_input_errors():
    with pytest.raises(ValueError, match="5\\+nc"):
        non_max_suppression(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="conf"):
        non_max_suppression(np.zeros((1, 3, 6), np.float32), conf=2)
    with pytest.raises(ValueError, match="box_coding"):
        efficient_nms_reference(np.zeros((1, 3, 4)), np.zeros((1, 3, 2)), 0.5, 0.5, 10, box_coding=2)


def _efficient_case():
    """Three anchors, two classes: anchors 0/1 overlap (IoU 0.68), anchor 2 is apart."""
    boxes = np.float32([[[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]]])
    scores = np.float32([[[0.9, 0.3], [0.8, 0.7], [0.2, 0.6]]])
    return boxes, scores


def test_efficient_reference_outputs_and_padding():
    boxes, scores = _efficient_case()
    num, b, s, c = efficient_nms_reference(boxes, scores, 0.25, 0.5, 6)
    assert (num.dtype, b.dtype, s.dtype, c.dtype) == (np.int32, np.float32, np.float32, np.int32)
    assert (num.shape, b.shape, s.shape, c.shape) == ((1, 1), (1, 6, 4), (1, 6), (1, 6))
    # class 0: 0.9 (a0) suppresses 0.8 (a1); class 1: 0.7 (a1) suppresses 0.3 (a0); 0.6 (a2) stays
    assert num[0, 0] == 3
    np.testing.assert_allclose(s[0], [0.9, 0.7, 0.6, 0, 0, 0], rtol=1e-6)
    assert c[0].tolist() == [0, 1, 1, 0, 0, 0]
    np.testing.assert_array_equal(b[0, :3], boxes[0, [0, 1, 2]])
    assert not b[0, 3:].any()
    assert efficient_nms_reference(boxes, scores, 0.25, 0.5, 2)[0][0, 0] == 2  # max_output_boxes


def test_efficient_reference_attributes():
    boxes, scores = _efficient_case()
    base = efficient_nms_reference(boxes, scores, 0.25, 0.5, 6)
    agn = efficient_nms_reference(boxes, scores, 0.25, 0.5, 6, class_agnostic=True)
    assert agn[0][0, 0] == 2 and agn[3][0, :2].tolist() == [0, 1] and agn[2][0, 1] == pytest.approx(0.6)
    bg = efficient_nms_reference(boxes, scores, 0.25, 0.5, 6, background_class=0)
    assert bg[0][0, 0] == 2 and set(bg[3][0, :2].tolist()) == {1}
    logits = np.log(scores / (1 - scores)).astype(np.float32)
    act = efficient_nms_reference(boxes, logits, 0.25, 0.5, 6, score_activation=True)
    for x, y in zip(act, base):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    cxcywh = np.concatenate([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)
    coded = efficient_nms_reference(cxcywh, scores, 0.25, 0.5, 6, box_coding=1)
    for x, y in zip(coded, base):
        np.testing.assert_allclose(x, y, atol=1e-5)
    per_class = np.repeat(boxes[:, :, None], 2, axis=2)  # [B,N,C,4]
    per_class[0, 1, 1] = [30, 30, 40, 40]  # anchor 1's class-1 box no longer overlaps anchor 0
    pc = efficient_nms_reference(per_class, scores, 0.25, 0.5, 6)
    assert pc[0][0, 0] == 4 and pc[2][0, :4].tolist() == pytest.approx([0.9, 0.7, 0.6, 0.3])


def test_efficient_reference_preselection():
    """Only the best ``max_candidates`` (5000 in TensorRT) scores enter NMS."""
    n = 5002
    boxes = np.tile(np.float32([0, 0, 10, 10]), (1, n, 1))
    boxes[0, -1] = [100, 100, 110, 110]
    scores = np.linspace(0.9, 0.5, n, dtype=np.float32).reshape(1, n, 1)
    assert efficient_nms_reference(boxes, scores, 0.25, 0.5, 10)[0][0, 0] == 1
    assert efficient_nms_reference(boxes, scores, 0.25, 0.5, 10, max_candidates=n)[0][0, 0] == 2
