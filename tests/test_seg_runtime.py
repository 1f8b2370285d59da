"""Seg on the runtime side: yolo7-detect draws masks and writes RLE; the host-side decode of a raw seg ONNX,
the in-graph masks tail and the PyTorch checkpoint agree; one clear line for the wrong task."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from exporter.cli import export_command
from exporter.options import ExportOptions, NmsOptions
from exporter.pipeline import run
from runtimes.base import DetectConfig, Detector
from runtimes.cli import detect_command
from runtimes.draw import draw_detections
from runtimes.masks import rle_decode
from seg_data import SEG, mask_iou

NAME = "dev_yolov7-seg_w00625_nc1_aa"
CKPT = SEG / f"{NAME}.pt"
HW = (256, 384)
IMAGES = Path(__file__).parent / "data" / "images"
OFFICIAL_DET = Path(__file__).parent / "data" / "official" / "dev_yolov7-tiny_w050_nc5.pt"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("segrt")
    raw = run(ExportOptions(checkpoint=CKPT, out_dir=out / "raw", imgsz=HW, dynamic_batch=True)).onnx_path
    tail = run(ExportOptions(checkpoint=CKPT, out_dir=out / "tail", imgsz=HW, dynamic_batch=True,
                             nms=NmsOptions(mode="onnx", best_class=True, topk=300))).onnx_path
    return raw, tail


def _detect(path, images, **kw):
    with Detector.from_path(path, DetectConfig(max_det=300), **kw) as det:
        return det.detect(images)


def test_raw_host_decode_equals_in_graph_masks_and_pytorch(artifacts):
    raw, tail = artifacts
    images = [cv2.imread(str(IMAGES / "zidane.jpg")), cv2.imread(str(IMAGES / "bus.jpg"))]
    results = [_detect(raw, images), _detect(tail, images), _detect(CKPT, images, imgsz=HW)]
    for k, image in enumerate(images):
        base = results[0][k]
        assert len(base) > 0 and base.masks.shape == (len(base), *image.shape[:2]) and base.masks.dtype == bool
        for other in (results[1][k], results[2][k]):
            assert len(other) == len(base)
            np.testing.assert_allclose(other.boxes, base.boxes, atol=0.05)
            assert mask_iou(other.masks, base.masks).min() >= 0.99


def test_detect_cli_draws_masks_and_writes_rle(artifacts, tmp_path):
    _, tail = artifacts
    src = tmp_path / "src"
    src.mkdir()
    (src / "z.jpg").write_bytes((IMAGES / "zidane.jpg").read_bytes())
    image = cv2.imread(str(src / "z.jpg"))
    out = tmp_path / "out"
    res = CliRunner().invoke(detect_command, [str(tail), str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "detections.json").read_text())
    dets = data["images"][0]["detections"]
    assert dets and all("mask" in d for d in dets)
    masks = np.stack([rle_decode(d["mask"]) for d in dets])
    assert masks.shape[1:] == image.shape[:2] and masks.any()
    expected = _detect(tail, [image])[0]
    assert len(expected) == len(dets) and mask_iou(masks, expected.masks).min() == 1.0
    drawn = cv2.imread(str(out / "z.jpg")).astype(int)
    with_masks = draw_detections(image, expected, ["person"]).astype(int)
    boxes_only = draw_detections(image, replace(expected, masks=None), ["person"]).astype(int)
    # the written picture is the masked drawing (up to JPEG noise), not the boxes-only one
    assert np.abs(drawn - with_masks).mean() < 0.25 * np.abs(drawn - boxes_only).mean()


def test_wrong_task_is_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(export_command, [str(CKPT), "--task", "detect", "-o", str(tmp_path / "a")])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and "instance-segmentation checkpoint" in line and "--task segment" in line
    res = runner.invoke(export_command, [str(OFFICIAL_DET), "--task", "segment", "-o", str(tmp_path / "b")])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and "detection checkpoint" in line and "Traceback" not in line
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").glob("*.onnx"))


def test_efficient_nms_refused_for_seg_in_one_line(tmp_path):
    res = CliRunner().invoke(export_command, [str(CKPT), "--img", "256,384", "--nms", "efficient",
                                              "-o", str(tmp_path)])
    assert res.exit_code == 2
    assert "--nms portable" in res.output and len(res.output.strip().splitlines()) == 1
