"""Where the network ends and the box decode begins, found from the graph's structure, not from names.

The exported raw graph is: backbone/neck convolutions -> one 1x1 head conv per level -> decode (reshape,
sigmoid, grid/anchor math, concat) -> ``output``. The decode is every node that has no Conv downstream of
it; the head convs are the Convs with no Conv downstream. This holds for every head (Detect, folded
IDetect, P6) and does not depend on the exporter's node naming, which changes between model variants.
"""
from __future__ import annotations

from collections import defaultdict

import onnx


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def conv_below(graph: onnx.GraphProto) -> dict[str, bool]:
    """node name -> whether any Conv consumes (directly or further down) one of its outputs."""
    consumers = _consumers(graph)
    result: dict[str, bool] = {}
    for node in reversed(graph.node):  # ONNX requires topological order (onnx.checker enforces it)
        result[node.name] = any(c.op_type == "Conv" or result.get(c.name, False)
                                for o in node.output for c in consumers.get(o, []))
    return result


def decode_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the decode tail: non-Conv nodes with no Conv below them (kept FP32, never quantized)."""
    below = conv_below(proto.graph)
    return [n.name for n in proto.graph.node if n.op_type != "Conv" and not below[n.name]]


def head_convs(proto: onnx.ModelProto) -> list[str]:
    """The detection convs: Convs whose outputs reach no other Conv (one per detection level)."""
    below = conv_below(proto.graph)
    return [n.name for n in proto.graph.node if n.op_type == "Conv" and not below[n.name]]


def conv_nodes(proto: onnx.ModelProto) -> list[str]:
    return [n.name for n in proto.graph.node if n.op_type == "Conv"]


def check_node_names(proto: onnx.ModelProto) -> None:
    """Node names are how layers are excluded and reported; they must exist and be unique."""
    names = [n.name for n in proto.graph.node]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError("graph nodes need unique, non-empty names for precision conversion")

