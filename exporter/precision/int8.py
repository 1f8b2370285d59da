"""INT8 ONNX in the form TensorRT runs fast: modelopt's Q/DQ placement, our calibration, FP16 remainder.

Pipeline (each step's tool and why):
1. Placement: NVIDIA modelopt's ONNX INT8 quantizer (placement.py says what it places and why we use it).
   The decode (graph.py) is excluded: it stays FP32, as does everything after it (NMS tails).
2. Scales: calibrated on CPU with ONNX Runtime over the user's images (calibrate.py: percentile by default,
   ``max``/``entropy`` on request, ``--calib-cache``), for exactly the tensors modelopt quantized; then one
   scale per group of tensors joined by Concat/MaxPool/Resize (the group's largest amax), so TensorRT
   can drop Concats and run pools/upsamples in INT8 without requantizing.
3. Remainder: everything that is not INT8 (LeakyReLU/SiLU, bias, unquantized convs) in FP16 by modelopt
   AutoCast, decode and graph IO in FP32 (a strongly typed TensorRT would run FP32-typed layers in FP32).

The Q/DQ layout is checked by audit.py (tests/test_precision_placement.py).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import onnx

from runtimes.contract import ModelInfo

from ..errors import UserError
from ..onnx_export import copy_metadata
from ..options import CalibOptions
from .calib_data import resolve_images
from .calibrate import Calibration, calibrate, check_cache_path, check_method
from .graph import check_node_names, conv_nodes, decode_nodes, head_convs

log = logging.getLogger("yolo7_export")

# Convs kept in float (FP16) by default: the detection head's 1x1 convs, as NVIDIA's YOLOv7 PTQ recipe keeps
# them. Chosen on tune splits (the 200 stored val images / 300 generated with seed 4000; calibrated on 512
# generated train images), mAP50-95 drop vs FP32 in AP: percentile 0.07 / 0.53 with every conv quantized,
# -0.12 / 0.28 with the head in FP16; max 0.24 / 0.73 and 0.12 / 0.50. Also keeping the first conv or the
# one or two most sensitive convs in FP16 did not beat calibrating on 1024 images with only the head in FP16
# (calibrate.py lists the figures), so the default keeps every other conv INT8 for TensorRT. Report-split
# figure: README "FP16 and INT8". The head convs output 3*(5+nc) channels: little of the network's MACs.
DEFAULT_FLOAT_POLICY = "head"


def quantize_int8(proto: onnx.ModelProto, info: ModelInfo, calib: CalibOptions) -> tuple[onnx.ModelProto, dict]:
    """Calibrate (or reuse ``calib.cache``), place Q/DQ; with ``calib.max_drop`` also recover accuracy."""
    t0 = time.perf_counter()
    method = check_method(calib.method)
    if calib.max_drop is not None and calib.max_drop < 0:
        raise UserError(f"--int8-max-drop must be >= 0 AP points (got {calib.max_drop})")
    images = resolve_images(calib.source, calib.num_images)
    if calib.cache is not None:
        check_cache_path(calib.cache)
    if calib.max_drop is not None:  # refuse an eval set that shares images with the calibration before calibrating
        from .recovery import check_disjoint, eval_set

        check_disjoint(eval_set(calib, images), images)
    check_node_names(proto)
    batch = info.batch or 1
    builder = QdqBuilder(proto, info, keep_float(proto, DEFAULT_FLOAT_POLICY))
    cal = calibrate(proto, images, method, info.imgsz, batch, builder.tensors, calib.cache)
    builder.calibration = cal
    qproto = builder.build([])
    report = {"method": method, "n_images": cal.n_images, "n_available": images.available,
              "source": str(images.source), "calibration_seconds": cal.seconds, "cache": cal.cache,
              "cache_path": str(calib.cache) if calib.cache else None,
              "quantized_convs": len(builder.convs), "convs": len(conv_nodes(proto)),
              "float_convs": builder.float_convs(), "head_convs": head_convs(proto),
              "decode_nodes_fp32": len(builder.decode), "excluded_layers": [], "symmetric": True,
              "per_channel_weights": True, "remainder": "fp16 (decode fp32)",
              "tool": "modelopt.onnx.quantization (placement) + onnxruntime calibration + modelopt AutoCast"}
    if calib.max_drop is not None:
        from .recovery import recover_accuracy

        qproto, recovery = recover_accuracy(proto, qproto, builder, info, calib, images)
        report["excluded_layers"] = recovery["excluded_layers"]
        report["quantized_convs"] = len(builder.convs) - len(recovery["excluded_layers"])
        report["recovery"] = recovery
    report["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("int8: %d/%d convs quantized (%s, %d images%s)", report["quantized_convs"], report["convs"], method,
             cal.n_images, ", cached ranges" if cal.cache == "hit" else "")
    return qproto, report


def keep_float(proto: onnx.ModelProto, policy: str) -> list[str]:
    """Convs left unquantized by default: ``none``, or ``head`` (the 1x1 detection convs, as NVIDIA's YOLOv7
    PTQ recipe keeps them)."""
    if policy == "none":
        return []
    if policy == "head":
        return head_convs(proto)
    raise ValueError(f"unknown float policy {policy!r}")


class QdqBuilder:
    """FP32 graph + calibrated amax -> Q/DQ graph, with any set of convs left in float."""

    def __init__(self, proto: onnx.ModelProto, info: ModelInfo, base_float: list[str] | None = None,
                 calibration: Calibration | None = None):
        from .placement import activation_quantizers

        self.proto, self.calibration = proto, calibration
        self.decode = decode_nodes(proto)
        self.base_float = list(base_float or [])
        # modelopt's own calibration pass is discarded (every activation scale is overwritten); a constant
        # grey image keeps the placement independent of any data
        self.sample = np.full((info.batch or 1, 3, *info.imgsz), 114 / 255, np.float32)
        self._placed: dict[tuple[str, ...], onnx.ModelProto] = {}
        first = self._place(())
        self.tensors = sorted(activation_quantizers(first))
        producer = {o: n.op_type for n in first.graph.node for o in n.output}
        self.convs = [n.name for n in first.graph.node if n.op_type == "Conv"
                      and producer.get(n.input[0]) == "DequantizeLinear"]

    def _place(self, exclude: tuple[str, ...]) -> onnx.ModelProto:
        from .placement import place_qdq

        if exclude not in self._placed:
            self._placed[exclude] = place_qdq(self.proto, self.sample, self.decode, self.base_float + list(exclude))
        return self._placed[exclude]

    def float_convs(self) -> list[str]:
        """Convs of the default graph left unquantized (base policy and modelopt's narrow-channel rule)."""
        wanted = set(self.convs)
        return [c for c in conv_nodes(self.proto) if c not in wanted]

    def build(self, exclude: list[str], fp16: bool = True) -> onnx.ModelProto:
        """The Q/DQ graph with ``exclude`` convs in float too; ``fp16=False`` keeps the remainder FP32."""
        from .fp16 import fp16_outside_decode
        from .placement import set_scales

        unknown = sorted(set(exclude) - set(self.convs))
        if unknown:
            raise ValueError(f"not quantized convs of this graph: {unknown[:3]}")
        if self.calibration is None:
            raise RuntimeError("QdqBuilder.build needs a calibration")
        qproto = set_scales(self._place(tuple(sorted(exclude))), self.calibration.amax)
        if fp16:
            qproto = fp16_outside_decode(qproto)
        # the one intermediate copy left: INT8 recovery runs this graph through OnnxBackend, which reads the
        # model's facts from its metadata (the pipeline's finalize() rewrites it from ModelInfo at the end)
        copy_metadata(self.proto, qproto)
        return qproto
