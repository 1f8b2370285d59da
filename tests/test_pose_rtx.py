"""Pose end-to-end graphs (portable NMS tail + det_kpts) built by a real compiler: TensorRT-RTX's parser and
builder (ahead of time, no GPU needed), through the production pipeline (``--trt --trt-lib rtx``). FP32 with
a dynamic batch, FP16 and INT8 (calibrated on generated stick figures, tests/pose_data.py). Running the
engines needs an RTX-class GPU and is not done here. Also: ``--nms auto`` with an engine picks the portable
tail for a pose model (EfficientNMS_TRT cannot report kept anchors)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.options import CalibOptions, ExportOptions, NmsOptions, TrtOptions
from exporter.pipeline import run

from pose_data import make_pose_set
from rtx_util import BUILT, TEST_TARGETS, rtx_skip_reason

pytestmark = [pytest.mark.trt_build, pytest.mark.skipif(rtx_skip_reason() is not None, reason=str(rtx_skip_reason()))]

CKPT = Path(__file__).parent / "data" / "pose" / "dev_yolov7-w6-pose-kpt1x1_w00625.pt"
CASES = {  # id: (precision, nms, dynamic_batch)
    "pose-fp32-portable-dynbatch": ("fp32", "portable", True),
    "pose-fp16-auto-nms": ("fp16", "auto", False),
    "pose-int8-portable": ("int8", "portable", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pose_engine_builds_with_tensorrt_rtx(case, tmp_path):
    precision, nms, dynamic_batch = CASES[case]
    calib = make_pose_set(tmp_path / "calib", n_images=4, size=(256, 256), seed=5).images_dir
    opts = ExportOptions(checkpoint=CKPT, out_dir=tmp_path / "out", imgsz=(256, 256), dynamic_batch=dynamic_batch,
                         precision=precision, nms=NmsOptions(mode=nms, topk=50),
                         calib=CalibOptions(source=calib, num_images=4),
                         trt=TrtOptions(enabled=True, lib="rtx", arch=TEST_TARGETS, max_batch=4))
    result = run(opts)
    BUILT.append(case)
    assert result.engine_path is not None and result.engine_path.stat().st_size > 100_000
    sidecar = json.loads(Path(f"{result.engine_path}.json").read_text())
    io = {t["name"]: t for t in sidecar["io"]}
    assert io["det_kpts"]["shape"][1:] == [50, 17, 3] and io["det_kpts"]["dtype"] == "FLOAT"
    assert io["det_indices"]["dtype"] == "INT32"
    assert sidecar["model"]["task"] == "pose" and sidecar["model"]["nkpt"] == 17
    assert sidecar["model"]["nms"] == "portable" and sidecar["precision"] == precision
    assert not sidecar["plugins"]
