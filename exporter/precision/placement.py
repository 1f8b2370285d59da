"""Where the Q/DQ go: NVIDIA modelopt's ONNX INT8 quantizer decides, our calibrated ranges set the scales.

Why modelopt (``modelopt.onnx.quantization.quantize``, mode ``int8``) and not hand-written surgery: its
placement is the one TensorRT's explicit-quantization guide describes and NVIDIA's own YOLOv7 recipe uses:
* Q/DQ on every Conv's activation input, weights INT8 per output channel (DQ only: ``dq_only``);
* Concats: one scale for all inputs and the output ("concat elimination"), so TensorRT drops the Concat
  instead of requantizing each input;
* MaxPool quantized with its input's scale (scale-preserving, runs in INT8);
* residual Adds: both inputs quantized and the output too, so TensorRT fuses the Add into the conv;
* it leaves out convs TensorRT has no INT8 kernel for (fewer than 16 input or output channels that are
  not a multiple of 8; real YOLOv7 models have none past the stem, the narrow test fixtures have some).
What we add, measured (see int8.py): the activation scales come from our calibration (percentile by
default, which modelopt does not offer; its own calibration here runs on one image only and is always
overwritten), Resize is made scale-preserving as well (modelopt gives the upsample input its own scale,
measured: one mismatched Concat per upsample), and the remainder is converted to FP16 by AutoCast with the
box decode kept FP32 (modelopt's own FP16 conversion casts the decode too; it blocks op types, not nodes).

It runs with ONNX Runtime's CPU execution provider; no GPU or TensorRT is needed to place Q/DQ.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger("yolo7_export")

QMAX = 127.0  # symmetric INT8, zero-point 0: scale = amax / 127 (what modelopt and TensorRT use)
SCALE_PRESERVING = ("Concat", "MaxPool", "Resize")  # data input(s) and output share one scale


def place_qdq(proto: onnx.ModelProto, sample: np.ndarray, exclude: list[str] | tuple[str, ...] = (),
              keep_float: list[str] | tuple[str, ...] = ()) -> onnx.ModelProto:
    """FP32 graph -> modelopt's Q/DQ graph (FP32 remainder, placeholder scales from ``sample``).

    ``exclude`` names nodes never to quantize (the decode); ``keep_float`` names Convs left unquantized
    (head convs, or those moved back by --int8-max-drop). modelopt quantizes a Conv by putting Q/DQ on its
    inputs, so an excluded Conv keeps float inputs and weights.
    """
    from modelopt.onnx.quantization import quantize

    patterns = [f"^{re.escape(n)}$" for n in list(exclude) + list(keep_float)]
    with tempfile.TemporaryDirectory(prefix="yolo7_qdq_") as tmp, quiet_modelopt(), _ort_restored():
        src, out = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        onnx.save_model(proto, str(src))
        quantize(str(src), quantize_mode="int8", calibration_data_reader=_OneBatch(sample), calibration_method="max",
                 calibration_eps=["cpu"], high_precision_dtype="fp32", nodes_to_exclude=patterns, dq_only=True,
                 output_path=str(out), log_level="ERROR")
        return onnx.load_model(str(out))


@contextlib.contextmanager
def _ort_restored():
    """modelopt's quantize monkeypatches ONNX Runtime's calibrator and quantizer classes for the whole process
    (modelopt/onnx/quantization/ort_patching.py: patch_ort_modules); our own calibration (calibrate.py)
    needs ONNX Runtime as shipped, so the classes are put back exactly as they were afterwards."""
    from onnxruntime.quantization import calibrate as ort_calibrate
    from onnxruntime.quantization.base_quantizer import BaseQuantizer
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    classes = [ort_calibrate.CalibraterBase, ort_calibrate.MinMaxCalibrater, ort_calibrate.HistogramCalibrater,
               ort_calibrate.HistogramCollector, QDQQuantizer, BaseQuantizer]
    saved = [(cls, dict(vars(cls))) for cls in classes]
    create = ort_calibrate.create_calibrator
    try:
        yield
    finally:
        ort_calibrate.create_calibrator = create
        for cls, attrs in saved:
            for name in set(vars(cls)) - set(attrs):
                delattr(cls, name)
            for name, value in attrs.items():
                if name not in ("__dict__", "__weakref__") and vars(cls).get(name) is not value:
                    setattr(cls, name, value)


class _OneBatch:
    """A CalibrationDataReader for modelopt's own (discarded) calibration pass."""

    def __init__(self, batch: np.ndarray):
        self._items = [{"images": batch}]

    def get_next(self):
        return self._items.pop() if self._items else None

    def rewind(self):
        pass


def activation_quantizers(qproto: onnx.ModelProto) -> dict[str, str]:
    """float tensor -> its scale initializer, for every QuantizeLinear on an activation (weights are DQ only)."""
    inits = {t.name for t in qproto.graph.initializer}
    return {n.input[0]: n.input[1] for n in qproto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def scale_groups(qproto: onnx.ModelProto) -> list[list[str]]:
    """Activation tensors that must share one scale: joined through Concat/MaxPool/Resize and shared scales.

    A tensor read through Q -> DQ counts as the float tensor behind the Q, so ``Concat(DQ(Q(a)), b) -> c``
    joins a, b and c.
    """
    producer = {o: n for n in qproto.graph.node for o in n.output}
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    def behind(t: str) -> str:
        dq = producer.get(t)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                return q.input[0]
        return t

    quantized = activation_quantizers(qproto)
    for node in qproto.graph.node:
        if node.op_type in SCALE_PRESERVING:
            data = list(node.input) if node.op_type == "Concat" else [node.input[0]]
            for t in data:
                if t:
                    union(behind(t), node.output[0])
    by_scale: dict[str, str] = {}
    for tensor, scale in quantized.items():
        find(tensor)
        if scale in by_scale:
            union(tensor, by_scale[scale])
        by_scale.setdefault(scale, tensor)
    groups: dict[str, list[str]] = {}
    for t in parent:
        groups.setdefault(find(t), []).append(t)
    return [sorted(g) for g in groups.values() if any(t in quantized for t in g)]


def set_scales(qproto: onnx.ModelProto, amax: dict[str, float]) -> onnx.ModelProto:
    """Every activation scale = max(amax over its group) / 127; every quantized tensor must have a range."""
    quantized = activation_quantizers(qproto)
    missing = sorted(t for t in quantized if t not in amax)
    if missing:
        raise RuntimeError(f"no calibrated range for quantized tensor(s) {missing[:3]}")
    value: dict[str, float] = {}
    for group in scale_groups(qproto):
        peak = max(amax[t] for t in group if t in amax)
        scale = max(peak, 1e-8) / QMAX
        for t in group:
            if t in quantized:
                value[quantized[t]] = scale
    out = onnx.ModelProto()
    out.CopyFrom(qproto)
    for i, init in enumerate(out.graph.initializer):
        if init.name in value:
            dtype = numpy_helper.to_array(init).dtype
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.array(value[init.name], dtype=dtype),
                                                                      init.name))
    return out


class _DropOrtNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def quiet_modelopt():
    """modelopt logs every step (and a failed NVML probe) through its own loggers and stdout; ONNX Runtime's
    quantizer logs 'consider pre-processing' warnings on the root logger."""
    level = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL
    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith("modelopt")] + ["modelopt"]
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(level)
    noise = _DropOrtNoise()
    logging.root.addFilter(noise)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.root.removeFilter(noise)
        for lg, lvl in saved:
            lg.setLevel(lvl)
