"""The portable NMS tail through a real compiler: TensorRT-RTX parses and builds every variant (no GPU needed).

End-to-end graphs go through the production pipeline (``--nms portable --trt --trt-lib rtx``) for FP32 static
and dynamic batch, FP16 dynamic batch and INT8 static; tail variants (multi-label 80 classes at 25200 anchors,
best-class, agnostic, the largest cap) are built on synthetic raw graphs. Running the engines needs an
RTX-class GPU: not done here (the ONNX Runtime tests check what the graph computes).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from exporter.nms_tail import append_nms
from exporter.onnx_export import finalize
from exporter.options import CalibOptions, ExportOptions, NmsOptions, TrtOptions
from exporter.pipeline import run
from runtimes.contract import NMS_INDICES, NMS_OUTPUTS, ModelInfo

from conftest import SHAPES, TRAINED
from rtx_util import BUILT, TEST_TARGETS, rtx_build, rtx_skip_reason

pytestmark = [pytest.mark.trt_build, pytest.mark.skipif(rtx_skip_reason() is not None, reason=str(rtx_skip_reason()))]


def raw_graph(nc: int, anchors: int, batch: int | str = "batch"):
    shape = [batch, anchors, 5 + nc]
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "raw",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    info = ModelInfo(names=[f"c{i}" for i in range(nc)], stride=[8.0, 16.0, 32.0], imgsz=(640, 640),
                     batch=None if isinstance(batch, str) else batch)
    return finalize(model, info)


TAILS = {  # id: (nc, anchors, static batch or None, NmsOptions kwargs)
    "multi-label-nc80-25200-dynbatch": (80, 25200, None, dict(topk=300)),
    "best-class-nc80-25200-static4": (80, 25200, 4, dict(best_class=True, topk=100)),
    "agnostic-nc3-6300-dynbatch": (3, 6300, None, dict(agnostic=True)),
    "max-cap-3840-nc1-6300-static1": (1, 6300, 1, dict(topk=3840, candidates=3840)),
}


@pytest.mark.parametrize("case", list(TAILS))
def test_portable_tail_variants_build(case):
    nc, anchors, batch, kw = TAILS[case]
    model = append_nms(raw_graph(nc, anchors, batch if batch else "batch"), NmsOptions(mode="portable", **kw), nc)
    shapes = None if batch else {"images": ((1, anchors, 5 + nc), (2, anchors, 5 + nc), (8, anchors, 5 + nc))}
    result = rtx_build(model, shapes=shapes, label=f"nms {case}")
    K = kw.get("topk", 100)
    b = batch or -1
    assert result.outputs == {"num_dets": (b, 1), "det_boxes": (b, K, 4), "det_scores": (b, K),
                              "det_classes": (b, K), "det_indices": (b, K)}
    assert len(result.engine) > 10_000


END_TO_END = {  # id: (precision, dynamic_batch, NmsOptions kwargs)
    "tiny-fp32-static-portable": ("fp32", False, dict(best_class=True, topk=300)),
    "tiny-fp32-dynbatch-portable": ("fp32", True, dict()),
    "tiny-fp16-dynbatch-portable": ("fp16", True, dict(agnostic=True)),
    "tiny-int8-static-portable": ("int8", False, dict()),
}


@pytest.mark.parametrize("case", list(END_TO_END))
def test_end_to_end_portable_builds(case, tmp_path: Path):
    precision, dynamic_batch, kw = END_TO_END[case]
    opts = ExportOptions(checkpoint=TRAINED, out_dir=tmp_path, imgsz=(320, 320), batch=1, dynamic_batch=dynamic_batch,
                         precision=precision, nms=NmsOptions(mode="portable", **kw),
                         calib=CalibOptions(source=SHAPES / "images" / "val", num_images=8),
                         trt=TrtOptions(enabled=True, lib="rtx", arch=TEST_TARGETS, max_batch=4))
    result = run(opts)
    BUILT.append(case)
    side = json.loads((result.engine_path.parent / (result.engine_path.name + ".json")).read_text())
    assert side["model"]["nms"] == "portable" and side["model"]["precision"] == precision
    io = {t["name"]: t["shape"] for t in side["io"]}
    K = kw.get("topk", 100)
    b = -1 if dynamic_batch else 1
    assert {k: io[k] for k in (*NMS_OUTPUTS, NMS_INDICES)} == {
        "num_dets": [b, 1], "det_boxes": [b, K, 4], "det_scores": [b, K], "det_classes": [b, K], "det_indices": [b, K]}
