"""INT8 ONNX: explicit symmetric Q/DQ on the convolutions, calibrated on CPU with ONNX Runtime.

Tool choice: ``onnxruntime.quantization.quantize_static`` in QDQ format (not modelopt's ONNX PTQ, which wraps
the same function): modelopt's calibration cache only overrides scales *after* calibrating again (so a
cached build would not skip calibration), it has no percentile method for INT8, and it converts the rest of
the graph to FP16 and raises the opset to 19. Calling ONNX Runtime directly we keep the FP32 graph, the
opset, and get a real cache (``calibration_cache_path``) and all three methods.

Placement follows TensorRT's explicit-quantization guidance (what modelopt's TensorRT-guided options also
set): Q/DQ on every Conv's activation input and per-output-channel INT8 weights with a DequantizeLinear,
no Q/DQ on Conv outputs (TensorRT fuses the activation and quantizes at the next consumer), biases in
float, symmetric scales with zero-point 0 for activations and weights. A tensor that feeds a Conv is
quantized once: any other reader of it (a Concat or MaxPool beside the conv) reads the same dequantized
value, so TensorRT can keep that tensor in INT8. The detection head's sigmoid, grid and anchor math (the
decode, see graph.py) gets no Q/DQ at all, and nothing but Conv inputs is quantized.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from pathlib import Path

import onnx

from runtimes.contract import ModelInfo

from ..errors import UserError
from ..onnx_export import copy_metadata
from ..options import CalibOptions
from .calib_data import resolve_images
from .calibrate import Calibration, activation_inputs, calibrate, check_method, ort_method
from .graph import check_node_names, conv_nodes, decode_nodes, head_convs

log = logging.getLogger("yolo7_export")

QDQ_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    "OpTypesToExcludeOutputQuantization": ["Conv"],
    "QDQOpTypePerChannelSupportToAxis": {"Conv": 0},
}


def quantize_int8(proto: onnx.ModelProto, info: ModelInfo, calib: CalibOptions) -> tuple[onnx.ModelProto, dict]:
    """Calibrate (or reuse ``calib.cache``), insert Q/DQ; with ``calib.max_drop`` also recover accuracy."""
    t0 = time.perf_counter()
    method = check_method(calib.method)
    if calib.max_drop is not None and calib.max_drop < 0:
        raise UserError(f"--int8-max-drop must be >= 0 AP points (got {calib.max_drop})")
    images = resolve_images(calib.source, calib.num_images)
    check_node_names(proto)
    convs = conv_nodes(proto)
    batch = info.batch or 1
    cal = calibrate(proto, images, method, info.imgsz, batch, activation_inputs(proto, convs), calib.cache)
    quantizer = QdqBuilder(proto, cal)
    qproto = quantizer.build([])
    report = {"method": method, "n_images": cal.n_images, "n_available": images.available,
              "source": str(images.source), "calibration_seconds": cal.seconds, "cache": cal.cache,
              "cache_path": str(calib.cache) if calib.cache else None, "quantized_convs": len(convs),
              "head_convs": head_convs(proto), "decode_nodes_fp32": len(quantizer.decode),
              "excluded_layers": [], "symmetric": True, "per_channel_weights": True,
              "tool": "onnxruntime.quantization.quantize_static (QDQ)"}
    if calib.max_drop is not None:
        from .recovery import recover_accuracy

        qproto, recovery = recover_accuracy(proto, qproto, quantizer, info, calib, images)
        report["excluded_layers"] = recovery["excluded_layers"]
        report["quantized_convs"] = len(convs) - len(recovery["excluded_layers"])
        report["recovery"] = recovery
    report["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("int8: %d/%d convs quantized (%s, %d images%s)", report["quantized_convs"], len(convs), method,
             cal.n_images, ", cached ranges" if cal.cache == "hit" else "")
    return qproto, report


class QdqBuilder:
    """FP32 graph + calibrated ranges -> Q/DQ graph, with any set of convs left in float."""

    def __init__(self, proto: onnx.ModelProto, calibration: Calibration):
        self.proto, self.calibration = proto, calibration
        self.convs = conv_nodes(proto)
        self.decode = decode_nodes(proto)

    def build(self, exclude: list[str]) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        unknown = sorted(set(exclude) - set(self.convs))
        if unknown:
            raise ValueError(f"not convs of this graph: {unknown[:3]}")
        to_quantize = [c for c in self.convs if c not in set(exclude)]
        with tempfile.TemporaryDirectory(prefix="yolo7_qdq_") as tmp, _quiet_ort():
            ranges = self.calibration.write_ranges(Path(tmp) / "ranges.json")
            out = Path(tmp) / "int8.onnx"
            if to_quantize:
                quantize_static(self.proto, str(out), None, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=["Conv"], per_channel=True, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, nodes_to_quantize=to_quantize,
                                nodes_to_exclude=self.decode + list(exclude),
                                calibrate_method=ort_method(self.calibration.method),
                                calibration_cache_path=str(ranges), extra_options=dict(QDQ_OPTIONS))
                qproto = onnx.load_model(str(out))
            else:
                qproto = onnx.ModelProto()
                qproto.CopyFrom(self.proto)
        copy_metadata(self.proto, qproto)
        return qproto


class _DropOrtNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet_ort():
    """quantize_static logs 'consider pre-processing' warnings on the root logger and prints progress."""
    noise = _DropOrtNoise()
    logging.root.addFilter(noise)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.root.removeFilter(noise)
