"""Mask quality of FP16 / INT8 seg graphs against FP32, in ONNX Runtime (the NMS + masks tail always runs in
FP32; precision only changes the network before it). Matched by det_indices (the same anchor kept), compared by
mask IoU at prototype resolution. Fixture weights are random (tests/data/seg), so the INT8 figure is a floor,
not what a trained model loses; calibration uses the generated shapes images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from exporter.options import CalibOptions, ExportOptions, NmsOptions
from exporter.pipeline import run
from seg_data import SEG, mask_iou, seg_reference

NAME = "dev_yolov7-seg_w00625_nc80"
CALIB = Path(__file__).parent / "data" / "shapes" / "images" / "val"


def _run(tmp: Path, precision: str, dynamic: bool = False, imgsz=None) -> dict:
    ref = seg_reference(NAME)
    hw = imgsz or tuple(ref["input"].shape[2:])
    result = run(ExportOptions(checkpoint=SEG / f"{NAME}.pt", out_dir=tmp / precision, imgsz=hw, precision=precision,
                               dynamic=dynamic, nms=NmsOptions(mode="onnx", best_class=True, topk=100),
                               calib=CalibOptions(source=CALIB, num_images=8)))
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"images": ref["input"]})))


def _mask_agreement(a: dict, b: dict) -> tuple[float, float]:
    """(share of a's detections kept by b, mean mask IoU of those) matched by anchor row."""
    na, nb = int(a["num_dets"][0, 0]), int(b["num_dets"][0, 0])
    rows_b = list(b["det_indices"][0, :nb])
    ious = []
    for k, row in enumerate(a["det_indices"][0, :na]):
        if row in rows_b:
            j = rows_b.index(row)
            ious.append(mask_iou(a["det_masks"][0, k:k + 1] > 0.5, b["det_masks"][0, j:j + 1] > 0.5)[0])
    return len(ious) / max(na, 1), float(np.mean(ious)) if ious else 0.0


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fp32"), "fp32")


def test_fp16_masks_match_fp32(fp32, tmp_path):
    share, iou = _mask_agreement(fp32, _run(tmp_path, "fp16"))
    assert share >= 0.95 and iou >= 0.98, (share, iou)  # measured: 37/37 kept, mean IoU 0.997


def test_int8_masks_measured(fp32, tmp_path):
    share, iou = _mask_agreement(fp32, _run(tmp_path, "int8"))
    # random weights + unrelated calibration images: measured 25/37 kept, mean IoU 0.82 (TensorRT-shaped placement)
    assert share >= 0.5 and iou >= 0.7, (share, iou)


def test_dynamic_export_equals_static(fp32, tmp_path):
    """--dynamic (batch, H, W): at the fixture's own size the masks tail gives what the static graph gives."""
    dyn = _run(tmp_path, "fp32", dynamic=True, imgsz=(320, 320))
    n = int(fp32["num_dets"][0, 0])
    assert int(dyn["num_dets"][0, 0]) == n
    np.testing.assert_allclose(dyn["det_masks"][0, :n], fp32["det_masks"][0, :n], atol=1e-4)
    np.testing.assert_array_equal(dyn["det_indices"], fp32["det_indices"])
