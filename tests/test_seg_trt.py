"""Segmentation graphs built by a real TensorRT compiler: TensorRT-RTX's ONNX parser + builder (ahead of time,
no GPU needed), through the production pipeline (``--trt --trt-lib rtx``). Raw seg output, the plugin-free
``portable`` NMS + in-graph masks tail, FP32 / FP16 / INT8, fixed and dynamic batch, and ``--dynamic``
(batch, H, W). Running the engines needs an RTX-class GPU and is not done here; mask quality of the FP16 /
INT8 graphs is measured in ONNX Runtime (test_seg_precision.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from exporter.options import CalibOptions, ExportOptions, NmsOptions, TrtOptions
from exporter.pipeline import run
from runtimes.contract import MASK_OUTPUTS, NMS_INDICES, NMS_OUTPUTS, PROTO_OUTPUT, RAW_OUTPUT

from rtx_util import BUILT, TEST_TARGETS, rtx_skip_reason
from seg_data import SEG

pytestmark = [pytest.mark.trt_build, pytest.mark.skipif(rtx_skip_reason() is not None, reason=str(rtx_skip_reason()))]

CKPT = SEG / "dev_yolov7-seg_w00625_nc1_aa.pt"
CALIB = Path(__file__).parent / "data" / "shapes" / "images" / "val"
CASES = {
    # id: (precision, nms, dynamic_batch, dynamic)
    "seg-fp32-raw-dynbatch": ("fp32", "none", True, False),
    "seg-fp32-portable-masks": ("fp32", "portable", False, False),
    "seg-fp16-portable-masks-dynbatch": ("fp16", "portable", True, False),
    "seg-int8-portable-masks": ("int8", "portable", False, False),
    "seg-fp32-auto-dynamic": ("fp32", "auto", False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_seg_graph_builds_with_tensorrt_rtx(case, tmp_path):
    precision, nms, dynamic_batch, dynamic = CASES[case]
    opts = ExportOptions(checkpoint=CKPT, out_dir=tmp_path, imgsz=(256, 384), dynamic_batch=dynamic_batch,
                         dynamic=dynamic, precision=precision, nms=NmsOptions(mode=nms, best_class=True),
                         calib=CalibOptions(source=CALIB, num_images=8),
                         trt=TrtOptions(enabled=True, lib="rtx", arch=TEST_TARGETS, max_batch=2))
    result = run(opts)
    BUILT.append(case)
    assert result.engine_path is not None and result.engine_path.stat().st_size > 100_000
    assert result.info.task == "segment" and result.info.nm == 32 and result.info.precision == precision
    import onnx

    outputs = [o.name for o in onnx.load(str(result.onnx_path), load_external_data=False).graph.output]
    if nms == "none":
        assert outputs == [RAW_OUTPUT, PROTO_OUTPUT]
    else:  # auto with an engine picks the portable tail for seg (EfficientNMS_TRT cannot report indices)
        assert result.info.nms == "portable"
        assert outputs == [*NMS_OUTPUTS, NMS_INDICES, *MASK_OUTPUTS, PROTO_OUTPUT]
