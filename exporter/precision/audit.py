"""Audit an INT8 Q/DQ graph for the layouts that make TensorRT slow (reported in the manifest, tested).

Counted (each should be zero for a graph TensorRT keeps in INT8):
* ``mismatched_concats`` / ``mismatched_pools``: a Concat (MaxPool, Resize) whose group of tensors (see
  placement.scale_groups: inputs and output joined through scale-preserving ops) carries more than one
  activation scale. TensorRT then requantizes each input instead of eliminating the Concat.
* ``unquantized_residual_adds``: an Add outside the decode whose two inputs are both activations and one of
  them is not read through a DequantizeLinear (TensorRT cannot fuse it into the conv and runs it in float).
* ``fp32_compute``: nodes outside the decode (and not Q/DQ) that produce FP32 tensors; a strongly typed
  TensorRT runs them in FP32.
* ``float_convs``: Convs without Q/DQ on their activation input; listed by name so a caller can check each
  has its reason (modelopt's narrow-channel rule, a head conv kept in FP16, --int8-max-drop).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

from .graph import conv_below


@dataclass
class PlacementAudit:
    concats: int = 0
    mismatched_concats: list[str] = field(default_factory=list)
    pools: int = 0  # MaxPool + Resize
    mismatched_pools: list[str] = field(default_factory=list)
    residual_adds: int = 0
    unquantized_residual_adds: list[str] = field(default_factory=list)
    fp32_compute: list[str] = field(default_factory=list)
    float_convs: list[str] = field(default_factory=list)
    quantized_convs: int = 0

    def as_dict(self) -> dict:
        return {k: (len(v) if isinstance(v, list) and k != "float_convs" else v) for k, v in self.__dict__.items()}


def _scale_values(proto: onnx.ModelProto) -> dict[str, float]:
    """scale initializer / Constant name -> value (activation scales are scalars)."""
    out = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return {k: float(v) for k, v in out.items() if v.size == 1 and v.dtype.kind == "f"}


def audit_int8(proto: onnx.ModelProto) -> PlacementAudit:
    from .placement import activation_quantizers, scale_groups

    graph = proto.graph
    scales = _scale_values(proto)
    quantized = activation_quantizers(proto)
    group_of: dict[str, int] = {}
    group_scales: list[set[float]] = []
    for i, group in enumerate(scale_groups(proto)):
        group_scales.append({scales.get(quantized[t], float("nan")) for t in group if t in quantized})
        for t in group:
            group_of[t] = i
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    below = conv_below(graph)
    decode = {n.name for n in graph.node if n.op_type != "Conv" and not below[n.name]}
    audit = PlacementAudit()

    for node in graph.node:
        if node.name in decode:
            continue
        mixed = len(group_scales[group_of[node.output[0]]]) > 1 if node.output[0] in group_of else False
        if node.op_type == "Concat":
            audit.concats += 1
            if mixed:
                audit.mismatched_concats.append(node.name)
        elif node.op_type in ("MaxPool", "Resize"):
            audit.pools += 1
            if mixed:
                audit.mismatched_pools.append(node.name)
        elif node.op_type == "Add":
            data = [i for i in node.input if i and i not in inits]
            if len(data) == 2:
                audit.residual_adds += 1
                if any(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in data):
                    audit.unquantized_residual_adds.append(node.name)
        elif node.op_type == "Conv":
            act = producer.get(node.input[0])
            if act is not None and act.op_type == "DequantizeLinear":
                audit.quantized_convs += 1
            else:
                audit.float_convs.append(node.name)
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(graph.output)}
    for node in graph.node:
        if node.name in decode or node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        if any(types.get(o) == onnx.TensorProto.FLOAT for o in node.output):
            audit.fp32_compute.append(node.name)
    return audit
