"""Graph-building helpers shared by the NMS tails (nms_tail.py, nms_portable.py).

``Builder`` names every node from one counter (same options -> byte-identical graph). The two primitives
below make a TopK-based selection independent of TopK's order among equal values, which TensorRT does
not promise (its docs: "the ordering of ... the same score is unspecified"):

* ``top_set``: the k best entries of each row by (value desc, index asc), as a set;
* ``precedence``: the [k,k] "j comes before i" relation for that order;
* ``ordered_top``: both, plus the permutation: the k best in that order.

Every TopK here has a constant K (TensorRT rejects K > 3840), and every output has a fixed shape.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from runtimes.contract import NMS_INDICES, NMS_OUTPUTS

PREFIX = "nms/"
MAX_TOPK = 3840  # TensorRT's limit on a TopK's K
KEY_LIMIT = 1 << 24  # row indices stay exact in a float32 TopK key below this

F32, I64, I32, BOOL = np.float32, np.int64, np.int32, np.bool_
FLOAT, INT32, INT64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64


class Builder:
    """Adds named nodes to a gs.Graph; names are counted so the same graph always gets the same names.

    ``prefix`` keeps each tail's node names apart (nms/, kpts/, masks/): the keypoint and mask tails subclass
    this with their own prefix.
    """

    prefix = PREFIX

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph, self.opset, self.count = graph, opset, 0

    def name(self, op: str) -> str:
        self.count += 1
        return f"{self.prefix}{op}_{self.count}"

    def const(self, value, dtype) -> gs.Constant:
        return gs.Constant(self.name("const"), np.asarray(value, dtype=dtype))

    def op(self, op: str, inputs: list, attrs: dict | None = None, dtype=None, shape=None, n_out: int = 1,
           domain: str | None = None, out_names: list[str] | None = None):
        name = self.name(op)
        names = out_names or [f"{name}_out{i}" for i in range(n_out)]
        many = isinstance(dtype, list)
        outputs = [gs.Variable(n, dtype=dtype[i] if many else dtype, shape=shape[i] if many and shape else shape)
                   for i, n in enumerate(names)]
        node = gs.Node(op=op, name=name, attrs=attrs or {}, inputs=inputs, outputs=outputs, domain=domain)
        self.graph.nodes.append(node)
        return outputs[0] if n_out == 1 else outputs

    # opset-dependent forms (axes became an input in opset 13)
    def unsqueeze(self, x, axis: int, dtype=None):
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const([axis], np.int64)], dtype=dtype)
        return self.op("Unsqueeze", [x], {"axes": [axis]}, dtype=dtype)

    def squeeze(self, x, axis: int, dtype=None):
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.const([axis], np.int64)], dtype=dtype)
        return self.op("Squeeze", [x], {"axes": [axis]}, dtype=dtype)

    def reduce_sum(self, x, axis: int, keepdims: int, dtype=None):
        if self.opset >= 13:
            return self.op("ReduceSum", [x, self.const([axis], np.int64)], {"keepdims": keepdims}, dtype=dtype)
        return self.op("ReduceSum", [x], {"axes": [axis], "keepdims": keepdims}, dtype=dtype)

    def slice(self, x, start: int, end: int, axis: int, dtype=None, out_names=None):
        c = self.const
        return self.op("Slice", [x, c([start], np.int64), c([end], np.int64), c([axis], np.int64)], dtype=dtype,
                       out_names=out_names)

    def reduce(self, op: str, x, axis: int, dtype, keepdims: int = 0):
        """Reduce* over one axis; axes became an input in opset 13 (ReduceSum) / 18 (the others)."""
        if (op == "ReduceSum" and self.opset >= 13) or self.opset >= 18:
            return self.op(op, [x, self.const([axis], np.int64)], {"keepdims": keepdims}, dtype=dtype)
        return self.op(op, [x], {"axes": [axis], "keepdims": keepdims}, dtype=dtype)

    def cast(self, x, to: int, dtype):
        return self.op("Cast", [x], {"to": to}, dtype=dtype)

    def column(self, x, index: int, dtype=np.int64):
        """x[:, index] of a 2-D tensor."""
        return self.op("Gather", [x, self.const(index, np.int64)], {"axis": 1}, dtype=dtype)


def top_set(b: Builder, values, k: int, index=None):
    """values [B,L] (L >= k; missing entries -1, real ones >= 0) -> positions [B,k] int64 of the k best by
    (value desc, index asc), and their values [B,k].

    The *set* is exact whatever TopK does with ties: t = the k-th largest value (a value, not an index, so
    tie order cannot change it); entries > t all belong (fewer than k of them); entries == t fill the rest by
    ascending index, chosen by a second TopK over the key 2^24 - index (distinct, exact in float32). The
    *order* of the returned positions is TopK's; callers order by ``precedence``, which looks at values and
    positions only. ``index`` [B,L] float32: the entries' own indices for tie-breaking (default: position);
    must stay below 2^24.
    """
    topk = {"axis": 1, "largest": 1, "sorted": 1}
    kk = b.const([k], I64)
    top_vals, _ = b.op("TopK", [values, kk], topk, dtype=[F32, I64], n_out=2)
    t = b.slice(top_vals, k - 1, k, 1, F32)  # [B,1]
    if index is None:
        index = position_index(b, values)
    tied = b.op("Where", [b.op("Equal", [values, t], dtype=BOOL),
                          b.op("Sub", [b.const(float(KEY_LIMIT), F32), index], dtype=F32), b.const(-1.0, F32)],
                dtype=F32)
    key = b.op("Where", [b.op("Greater", [values, t], dtype=BOOL), b.const(float(2 * KEY_LIMIT), F32), tied],
               dtype=F32)
    _, pos = b.op("TopK", [key, kk], topk, dtype=[F32, I64], n_out=2)
    return pos, b.op("GatherElements", [values, pos], {"axis": 1}, dtype=F32)


def precedence(b: Builder, s, pos_f):
    """s, pos_f [B,k] float32 (score, candidate index) -> before [B,k,k] bool: before[i,j] when j precedes i,
    i.e. s_j > s_i, or s_j == s_i and pos_j < pos_i (the official stable sort). Outer comparisons only."""
    s_i, s_j = b.unsqueeze(s, 2, dtype=F32), b.unsqueeze(s, 1, dtype=F32)
    p_i, p_j = b.unsqueeze(pos_f, 2, dtype=F32), b.unsqueeze(pos_f, 1, dtype=F32)
    tie_first = b.op("And", [b.op("Equal", [s_j, s_i], dtype=BOOL), b.op("Less", [p_j, p_i], dtype=BOOL)], dtype=BOOL)
    return b.op("Or", [b.op("Greater", [s_j, s_i], dtype=BOOL), tie_first], dtype=BOOL)


def ordered_top(b: Builder, values, k: int, index=None):
    """values [B,L] (missing -1), index [B,L] float32 (default: position) -> slots [B,k] int64 into the row, in
    (value desc, index asc) order, and their values [B,k] (-1 for missing). ``top_set`` picks the set, a [k,k]
    precedence count ranks it (distinct ranks: indices are distinct), one more TopK applies the order."""
    slot, s = top_set(b, values, k, index=index)
    pos_f = b.cast(slot, FLOAT, F32) if index is None else b.op("GatherElements", [index, slot], {"axis": 1},
                                                                 dtype=F32)
    rank = b.reduce("ReduceSum", b.cast(precedence(b, s, pos_f), FLOAT, F32), 2, F32)
    key = b.op("Sub", [b.const(float(k), F32), rank], dtype=F32)  # k..1, distinct
    _, order = b.op("TopK", [key, b.const([k], I64)], {"axis": 1, "largest": 1, "sorted": 1}, dtype=[F32, I64],
                    n_out=2)
    return (b.op("GatherElements", [slot, order], {"axis": 1}, dtype=I64),
            b.op("GatherElements", [s, order], {"axis": 1}, dtype=F32))


def position_index(b: Builder, values):
    """[B,L] -> [L] float32 0..L-1 (broadcasts as every row's index; exact below 2^24)."""
    length = b.op("Gather", [b.op("Shape", [values], dtype=I64), b.const(1, I64)], {"axis": 0}, dtype=I64)
    return b.cast(b.op("Range", [b.const(0, I64), length, b.const(1, I64)], dtype=I64), FLOAT, F32)


def pad_columns(b: Builder, values, n: int, value: float = -1.0):
    """[B,L] -> [B,L+n]: a TopK of constant K <= n is then valid for any (even dynamic) L."""
    return b.op("Pad", [values, b.const([0, 0, 0, n], I64), b.const(value, F32)], {"mode": "constant"}, dtype=F32)


def gather_rows(b: Builder, x, index, width: int, dtype=F32):
    """x [B,N,width], index [B,k] int64 -> x[b, index[b,i], :] as [B,k,width] (GatherElements: opset 11+)."""
    idx = b.op("Add", [b.unsqueeze(index, 2, dtype=I64), b.const(np.zeros((1, 1, width), np.int64), I64)], dtype=I64)
    return b.op("GatherElements", [x, idx], {"axis": 1}, dtype=dtype)


def export_like(graph: gs.Graph, proto: onnx.ModelProto, opset_imports: list | None = None) -> onnx.ModelProto:
    """The surgery's graph back to a checked ModelProto with ``proto``'s opsets (unless given), IR version and
    producer. No yolo7_export metadata: facts travel as ModelInfo and the pipeline's finalize() writes it once."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, opset_imports=list(proto.opset_import) if opset_imports is None else opset_imports)
    model.ir_version = proto.ir_version
    model.producer_name, model.producer_version = proto.producer_name, proto.producer_version
    onnx.checker.check_model(model)  # an unregistered domain (TRT) is not schema-checked, the rest is
    return model


def finish_outputs(b: Builder, ok, slot, s, cls_f, anchor, cand_boxes) -> list:
    """The contract outputs from per-candidate tensors picked by ``slot`` [B,K] (None: already in output
    order); zeros (-1 for det_indices) where not ``ok``."""
    zero = b.const(0.0, F32)
    num = b.reduce("ReduceSum", b.cast(ok, INT32, I32), 1, I32, keepdims=1)
    num_dets = b.op("Identity", [num], dtype=I32, out_names=[NMS_OUTPUTS[0]])
    pick = (lambda x, dt: x) if slot is None else (  # noqa: E731
        lambda x, dt: b.op("GatherElements", [x, slot], {"axis": 1}, dtype=dt))
    det_scores = b.op("Where", [ok, pick(s, F32), zero], dtype=F32, out_names=[NMS_OUTPUTS[2]])
    det_classes = b.cast(b.op("Where", [ok, pick(cls_f, F32), zero], dtype=F32), INT32, I32)
    det_classes = b.op("Identity", [det_classes], dtype=I32, out_names=[NMS_OUTPUTS[3]])
    det_indices = b.op("Where", [ok, pick(anchor, I32), b.const(np.int32(-1), I32)], dtype=I32,
                       out_names=[NMS_INDICES])
    boxes = cand_boxes if slot is None else gather_rows(b, cand_boxes, slot, 4)
    det_boxes = b.op("Where", [b.unsqueeze(ok, 2, dtype=BOOL), boxes, zero], dtype=F32, out_names=[NMS_OUTPUTS[1]])
    return [num_dets, det_boxes, det_scores, det_classes, det_indices]
