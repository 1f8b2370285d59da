"""Every graph family the exporter emits, built into an engine by a real compiler: TensorRT-RTX's ONNX parser
and builder (ahead of time, no GPU needed). Each case runs the production pipeline end to end
(``exporter.pipeline.run`` with ``--trt --trt-lib rtx``): export -> precision -> NMS tail -> build_engine ->
sidecar + manifest. Running the engines needs an RTX-class GPU and is not done here.

Matrix (families; the NMS engineer's tests own the NMS-tail variants):
P5 trained tiny at 320: FP32 dynamic batch / FP16 dynamic batch / INT8 static / ``--dynamic``
(batch, H, W) raw and with the portable tail / ``auto`` NMS (-> portable with RTX); official fixtures: a P6
(W6), a deploy-form checkpoint (X deploy), an 80-class P5 (static batch: INT8 tiny, X deploy, the 80-class P5).
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from exporter.errors import UserError
from exporter.options import CalibOptions, ExportOptions, NmsOptions, TrtOptions
from exporter.pipeline import run

from conftest import OFFICIAL, SHAPES, TRAINED
from rtx_util import BUILT, TEST_TARGETS, rtx_build, rtx_skip_reason

pytestmark = [pytest.mark.trt_build, pytest.mark.skipif(rtx_skip_reason() is not None, reason=str(rtx_skip_reason()))]

CASES = {
    # id: (checkpoint, img, precision, nms, dynamic_batch, dynamic)
    "tiny-fp32-dynbatch": (TRAINED, 320, "fp32", "none", True, False),
    "tiny-fp16-dynbatch": (TRAINED, 320, "fp16", "none", True, False),
    "tiny-int8-static": (TRAINED, 320, "int8", "none", False, False),
    "tiny-fp32-auto-nms": (TRAINED, 320, "fp32", "auto", True, False),
    "tiny-fp32-dynamic": (TRAINED, 320, "fp32", "none", False, True),
    "tiny-fp16-dynamic-portable": (TRAINED, 320, "fp16", "portable", False, True),
    "p6-w6-fp32-dynbatch": (OFFICIAL / "dev_yolov7-w6_w00625_nc1.pt", 256, "fp32", "none", True, False),
    "deploy-x-fp32-static": (OFFICIAL / "dev_yolov7x_w00625_nc3_deploy.pt", 128, "fp32", "none", False, False),
    "p5-nc80-fp32-portable": (OFFICIAL / "dev_yolov7_w0125_nc80.pt", 128, "fp32", "portable", False, False),
}
SIZES: dict[str, int] = {}  # engine bytes per case, for the FP16-vs-FP32 check


def export_and_build(tmp_path: Path, ckpt: Path, img: int, precision: str, nms: str, dynamic_batch: bool,
                     dynamic: bool, label: str):
    opts = ExportOptions(checkpoint=ckpt, out_dir=tmp_path, imgsz=(img, img), batch=1, dynamic_batch=dynamic_batch,
                         dynamic=dynamic, precision=precision, nms=NmsOptions(mode=nms),
                         calib=CalibOptions(source=SHAPES / "images" / "val", num_images=8),
                         trt=TrtOptions(enabled=True, lib="rtx", arch=TEST_TARGETS, max_batch=4))
    result = run(opts)
    BUILT.append(label)
    return opts, result


@pytest.mark.parametrize("case", list(CASES))
def test_family_builds_with_tensorrt_rtx(case, tmp_path):
    ckpt, img, precision, nms, dynamic_batch, dynamic = CASES[case]
    opts, result = export_and_build(tmp_path, ckpt, img, precision, nms, dynamic_batch, dynamic, case)
    engine = result.engine_path
    assert engine is not None and engine.stat().st_size > 100_000
    SIZES[case] = engine.stat().st_size
    side = json.loads((engine.parent / (engine.name + ".json")).read_text())
    import tensorrt_rtx_bindings as trt

    assert side["tensorrt"]["library"] == "tensorrt-rtx" and side["tensorrt"]["version"] == trt.__version__
    assert side["targets"] == list(TEST_TARGETS) and side["gpu"] is None
    assert side["model"]["precision"] == precision
    # the engine's IO is the ONNX's IO: same names and ranks, every static ONNX dim kept (TensorRT may resolve
    # more dims than the ONNX's shape inference, e.g. the anchor count of a dynamic-batch graph)
    proto = onnx.load(str(result.onnx_path), load_external_data=False)
    onnx_io = {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
               for v in list(proto.graph.input) + list(proto.graph.output)}
    engine_io = {t["name"]: t["shape"] for t in side["io"]}
    assert engine_io.keys() == onnx_io.keys()
    for name, dims in onnx_io.items():
        assert len(engine_io[name]) == len(dims) and all(o < 0 or o == e for o, e in zip(dims, engine_io[name])), name
    assert (engine_io["images"][0] < 0) == (dynamic_batch or dynamic)
    assert (engine_io["images"][2] < 0) == dynamic
    expected_nms = "portable" if nms == "auto" else nms  # auto + TensorRT-RTX = the plugin-free tail
    assert side["model"]["nms"] == expected_nms
    profile = side["build"]["profile"]
    if dynamic:
        half = img // 2
        assert profile["min"] == [1, 3, half, half] and profile["opt"] == [1, 3, img, img]
        assert profile["max"] == [4, 3, img, img] and side["model"]["dynamic_hw"] is True
    elif dynamic_batch:
        assert profile["min"][0] == 1 and profile["max"][0] == 4 and profile["opt"][2:] == [img, img]
    else:
        assert profile is None
    manifest = json.loads(result.manifest_path.read_text())
    entry = next(o for o in manifest["outputs"] if o["kind"] == "tensorrt_engine")
    assert entry["library"] == "tensorrt-rtx" and entry["targets"] == list(TEST_TARGETS)


def test_fp16_engine_is_smaller_than_fp32():
    """The FP16 casts written into the ONNX reach the engine (strongly typed build): weights take half the bytes.
    Uses the two dynamic-batch engines built above (same graph, same profile)."""
    if not {"tiny-fp32-dynbatch", "tiny-fp16-dynbatch"} <= SIZES.keys():
        pytest.skip("needs the tiny-fp32-dynbatch and tiny-fp16-dynbatch builds of this module")
    assert SIZES["tiny-fp16-dynbatch"] < 0.85 * SIZES["tiny-fp32-dynbatch"]


@pytest.mark.parametrize("nms, message", [("efficient", "TensorRT-RTX does not have.*--nms portable"),
                                          ("onnx", "TensorRT-RTX cannot build.*--nms portable")])
def test_rtx_refuses_tails_it_cannot_build_before_export(tmp_path, nms, message):
    opts = ExportOptions(checkpoint=TRAINED, out_dir=tmp_path, imgsz=(320, 320), nms=NmsOptions(mode=nms),
                         trt=TrtOptions(enabled=True, lib="rtx", arch=TEST_TARGETS))
    with pytest.raises(UserError, match=message):
        run(opts)
    assert not list(tmp_path.glob("*"))  # refused before anything was written


def test_onnx_nms_tail_really_fails_in_tensorrt_rtx(trained_fp32_onnx):
    """Why the refusal above exists: RTX 1.7 parses NonMaxSuppression but cannot build it. If a later
    TensorRT-RTX can, this test fails and the refusal in trt_build.check_nms should go."""
    from exporter.nms_tail import append_nms

    proto, info = trained_fp32_onnx
    graph = append_nms(proto, NmsOptions(mode="onnx"), info.nc)
    from rtx_util import RtxBuildError

    with pytest.raises(RtxBuildError, match="NonMaxSuppression"):
        rtx_build(graph)


def test_rtx_build_helper_reports_parser_errors():
    from onnx import TensorProto, helper

    from rtx_util import RtxBuildError

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(RtxBuildError, match="could not parse.*NoSuchOp"):
        rtx_build(model)
