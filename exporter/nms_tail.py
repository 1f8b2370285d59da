"""Stage 3c: append an NMS tail to the raw graph by graph surgery (onnx-graphsurgeon).

Both tails read the raw ``output`` [B,N,5+nc] and give the same four outputs (runtimes/contract.py):
num_dets int32 [B,1], det_boxes float32 [B,K,4] (x1,y1,x2,y2), det_scores float32 [B,K],
det_classes int32 [B,K]; score-descending per image, zero past num_dets.

* ``efficient``: one TensorRT ``EfficientNMS_TRT`` node (multi-label; TensorRT only).
* ``onnx``: standard ``NonMaxSuppression`` plus sorting/gathers, runs in any ONNX runtime; every image of a
  dynamic batch is handled independently (a selection list sorted by (image, score), then sliced per image).

Shared prefix: boxes xyxy (x -/+ w/2, the official arithmetic) and scores obj*cls in FP32 (obj alone for
single-class models, like the official NMS). Box coding 0 (corners) is given to the plugin on purpose:
the plugin then sees exactly the boxes the onnx tail and the CPU reference see, so the efficient tail can be
checked bit for bit on CPU; converting N boxes is a few element-wise ops, negligible next to the network.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from runtimes.contract import NMS_INDICES, NMS_OUTPUTS, RAW_OUTPUT

from .errors import UserError
from .onnx_export import copy_metadata
from .options import NmsOptions

TRT_DOMAIN = "TRT"  # TensorRT's parser finds plugins by op type + plugin_version; "TRT" is the usual domain
PREFIX = "nms/"
BOXES, SCORES = "nms/boxes", "nms/scores"  # the tails' shared inputs (xyxy [B,N,4], scores [B,N,nc])


def validate_nms(nms: NmsOptions) -> None:
    """The CLI checks ranges too; this guards the Python API with the same one-line messages."""
    if nms.mode not in ("efficient", "onnx", "portable"):
        raise UserError(f"NMS tail must be 'efficient', 'onnx' or 'portable', got {nms.mode!r}")
    if not 0.0 <= nms.conf <= 1.0:
        raise UserError(f"--conf must be within [0, 1], got {nms.conf}")
    if not 0.0 <= nms.iou <= 1.0:
        raise UserError(f"--iou must be within [0, 1], got {nms.iou}")
    if int(nms.topk) != nms.topk or nms.topk < 1:
        raise UserError(f"--topk must be an integer >= 1, got {nms.topk}")
    if nms.best_class and nms.mode == "efficient":
        raise UserError("--best-class needs --nms onnx or portable (EfficientNMS_TRT is always multi-label)")


class _Builder:
    """Adds named nodes to a gs.Graph; names are counted so the same graph always gets the same names."""

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph, self.opset, self.count = graph, opset, 0

    def name(self, op: str) -> str:
        self.count += 1
        return f"{PREFIX}{op}_{self.count}"

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

    def column(self, x, index: int, dtype=np.int64):
        """x[:, index] of a 2-D tensor."""
        return self.op("Gather", [x, self.const(index, np.int64)], {"axis": 1}, dtype=dtype)


def append_nms(proto: onnx.ModelProto, nms: NmsOptions, nc: int, *, keep_raw: bool = False) -> onnx.ModelProto:
    """Raw graph (output ``output`` [B,N,>=5+nc]) -> the same graph ending in the NMS tail's outputs.

    ``nc``: number of classes, passed as a value (the raw output may carry extra columns after 5+nc: pose
    keypoints, mask coefficients; classes are columns 5:5+nc). ``keep_raw``: the raw ``output`` stays a
    graph output (after the tail's outputs) so a head can gather its extra columns by ``det_indices``.
    """
    validate_nms(nms)
    if int(nc) != nc or nc < 1:
        raise UserError(f"cannot add an NMS tail: number of classes must be an integer >= 1, got {nc}")
    nc = int(nc)
    graph = gs.import_onnx(proto)
    raw = next((t for t in graph.outputs if t.name == RAW_OUTPUT), None)
    if raw is None:
        raise UserError(f"cannot add an NMS tail: the graph has no '{RAW_OUTPUT}' output "
                        f"(outputs: {[t.name for t in graph.outputs]}); is it already end-to-end?")
    width = raw.shape[-1] if raw.shape and isinstance(raw.shape[-1], int) else None
    if width is not None and width < 5 + nc:
        raise UserError(f"cannot add an NMS tail: '{RAW_OUTPUT}' has {width} values per box, fewer than "
                        f"5 + {nc} classes")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise UserError(f"the NMS tail needs opset >= 11 (model has {opset})")
    b = _Builder(graph, opset)
    batch = graph.inputs[0].shape[0] if graph.inputs and graph.inputs[0].shape else "batch"
    K = int(nms.topk)

    pred = raw if raw.dtype == np.float32 else b.op("Cast", [raw], {"to": onnx.TensorProto.FLOAT}, dtype=np.float32)
    boxes, scores = _boxes_and_scores(b, pred, nc, nms.obj_only_single_class)
    shapes = [[batch, 1], [batch, K, 4], [batch, K], [batch, K], [batch, K]]
    dtypes = [np.int32, np.float32, np.float32, np.int32, np.int32]
    if nms.mode == "efficient":
        attrs = {"background_class": -1, "box_coding": 0, "iou_threshold": float(nms.iou),
                 "max_output_boxes": K, "plugin_version": "1", "score_activation": 0,
                 "class_agnostic": int(bool(nms.agnostic)), "score_threshold": float(nms.conf)}
        outs = b.op("EfficientNMS_TRT", [boxes, scores], attrs, dtype=dtypes[:4], shape=shapes[:4], n_out=4,
                    domain=TRT_DOMAIN, out_names=list(NMS_OUTPUTS))
    else:
        if nms.mode == "portable":
            from .nms_portable import portable_tail

            outs = portable_tail(b, pred, boxes, scores, nc, nms)
        else:
            outs = _onnx_tail(b, pred, boxes, scores, nc, nms)
        for t, dt, shp in zip(outs, dtypes, shapes):
            t.dtype, t.shape = dt, shp
    # keep_raw keeps every raw-graph output (a seg graph's `protos` too), raw `output` first
    graph.outputs = outs + ([raw] + [t for t in graph.outputs if t is not raw] if keep_raw else [])
    graph.cleanup().toposort()
    # explicit opset list: gs would otherwise append the plugin domain to the *input* model's list
    domains = [onnx.helper.make_opsetid(o.domain, o.version) for o in proto.opset_import if o.domain != TRT_DOMAIN]
    if nms.mode == "efficient":
        domains.append(onnx.helper.make_opsetid(TRT_DOMAIN, 1))
    model = gs.export_onnx(graph, opset_imports=domains)
    model.ir_version = proto.ir_version
    model.producer_name, model.producer_version = proto.producer_name, proto.producer_version
    copy_metadata(proto, model)
    onnx.checker.check_model(model)  # an unregistered domain (TRT) is not schema-checked, the rest is
    return model


def _boxes_and_scores(b: _Builder, pred, nc: int, obj_only_single_class: bool = True):
    """[B,N,>=5+nc] -> boxes xyxy [B,N,4], scores [B,N,nc] (obj*cls; obj alone when nc == 1 and
    ``obj_only_single_class``)."""
    f32 = np.float32
    xy, wh = b.slice(pred, 0, 2, 2, f32), b.slice(pred, 2, 4, 2, f32)
    half = b.op("Div", [wh, b.const([2.0], f32)], dtype=f32)
    x1y1, x2y2 = b.op("Sub", [xy, half], dtype=f32), b.op("Add", [xy, half], dtype=f32)
    boxes = b.op("Concat", [x1y1, x2y2], {"axis": 2}, dtype=f32, out_names=[BOXES])
    if nc == 1 and obj_only_single_class:
        return boxes, b.slice(pred, 4, 5, 2, f32, out_names=[SCORES])
    obj = b.slice(pred, 4, 5, 2, f32)
    cls = b.slice(pred, 5, 5 + nc, 2, f32)
    return boxes, b.op("Mul", [cls, obj], dtype=f32, out_names=[SCORES])


def _onnx_tail(b: _Builder, pred, boxes, scores, nc: int, nms: NmsOptions) -> list:
    """NonMaxSuppression, then per image: sort the selections by score and take the first K.

    Selections of all images are sorted by score (TopK, ties by index), then stably by image, so each
    image's detections form one run; run starts come from per-image counts (exclusive CumSum).
    """
    f32, i64 = np.float32, np.int64
    K = int(nms.topk)
    if nms.agnostic or nms.best_class:
        best, arg = b.op("TopK", [scores, b.const([1], i64)], {"axis": 2, "largest": 1, "sorted": 1},
                         dtype=[f32, i64], n_out=2)
    if nms.agnostic:  # one candidate per box (its best class); multi-label + agnostic reduces to this
        nms_scores = b.op("Transpose", [best], {"perm": [0, 2, 1]}, dtype=f32)  # [B,1,N]
    elif nms.best_class:  # per-class NMS where each box only competes with its best class
        is_best = b.op("Equal", [arg, b.const(np.arange(nc), i64)], dtype=np.bool_)
        masked = b.op("Where", [is_best, scores, b.const(0.0, f32)], dtype=f32)
        nms_scores = b.op("Transpose", [masked], {"perm": [0, 2, 1]}, dtype=f32)  # [B,C,N]
    else:
        nms_scores = b.op("Transpose", [scores], {"perm": [0, 2, 1]}, dtype=f32)  # [B,C,N]
    sel = b.op("NonMaxSuppression", [boxes, nms_scores, b.const([K], i64), b.const([nms.iou], f32),
                                     b.const([nms.conf], f32)], dtype=i64)  # [M,3] (image, class, box)
    sel_b, sel_n = b.column(sel, 0), b.column(sel, 2)
    sel_s = b.op("GatherND", [nms_scores, sel], dtype=f32)
    if nms.agnostic:
        bn0 = b.op("Gather", [sel, b.const([0, 2, 1], i64)], {"axis": 1}, dtype=i64)
        sel_c = b.op("GatherND", [arg, bn0], dtype=i64)
    else:
        sel_c = b.column(sel, 1)

    # a sentinel selection (image B, score -1) sorts last, keeps every tensor non-empty, fills padding
    shape = b.op("Shape", [pred], dtype=i64)
    n_img = b.op("Gather", [shape, b.const([0], i64)], {"axis": 0}, dtype=i64)  # [1]
    n_box = b.op("Gather", [shape, b.const(1, i64)], {"axis": 0}, dtype=i64)  # scalar
    zero = b.const([0], i64)
    all_b = b.op("Concat", [sel_b, n_img], {"axis": 0}, dtype=i64)
    all_n = b.op("Concat", [sel_n, zero], {"axis": 0}, dtype=i64)
    all_c = b.op("Concat", [sel_c, zero], {"axis": 0}, dtype=i64)
    all_s = b.op("Concat", [sel_s, b.const([-1.0], f32)], {"axis": 0}, dtype=f32)
    m = b.op("Shape", [all_s], dtype=i64)  # [1] = M + 1
    topk = {"axis": 0, "largest": 1, "sorted": 1}
    _, by_score = b.op("TopK", [all_s, m], topk, dtype=[f32, i64], n_out=2)
    neg_img = b.op("Neg", [b.op("Gather", [all_b, by_score], {"axis": 0}, dtype=i64)], dtype=i64)
    _, by_img = b.op("TopK", [neg_img, m], topk, dtype=[i64, i64], n_out=2)
    order = b.op("Gather", [by_score, by_img], {"axis": 0}, dtype=i64)
    img_sorted = b.op("Gather", [all_b, order], {"axis": 0}, dtype=i64)

    images = b.op("Range", [b.const(0, i64), b.squeeze(n_img, 0, dtype=i64), b.const(1, i64)], dtype=i64)
    col_images = b.op("Reshape", [images, b.const([-1, 1], i64)], dtype=i64)  # [B,1]
    row_sorted = b.op("Reshape", [img_sorted, b.const([1, -1], i64)], dtype=i64)  # [1,M+1]
    hits = b.op("Cast", [b.op("Equal", [col_images, row_sorted], dtype=np.bool_)], {"to": onnx.TensorProto.INT64},
                dtype=i64)
    count = b.reduce_sum(hits, 1, keepdims=1, dtype=i64)  # [B,1] selections per image
    start = b.op("CumSum", [count, b.const(0, i64)], {"exclusive": 1}, dtype=i64)  # [B,1]
    slots = b.const(np.arange(K), i64)  # [K]
    valid = b.op("Less", [slots, count], dtype=np.bool_)  # [B,K]
    last = b.op("Sub", [m, b.const([1], i64)], dtype=i64)  # the sentinel's position
    pos = b.op("Where", [valid, b.op("Add", [start, slots], dtype=i64), last], dtype=i64)
    pick = b.op("Gather", [order, pos], {"axis": 0}, dtype=i64)  # [B,K] -> selection index

    det_scores = b.op("Where", [valid, b.op("Gather", [all_s, pick], {"axis": 0}, dtype=f32), b.const(0.0, f32)],
                      dtype=f32, out_names=[NMS_OUTPUTS[2]])
    cls = b.op("Where", [valid, b.op("Gather", [all_c, pick], {"axis": 0}, dtype=i64), b.const(0, i64)], dtype=i64)
    det_classes = b.op("Cast", [cls], {"to": onnx.TensorProto.INT32}, dtype=np.int32, out_names=[NMS_OUTPUTS[3]])
    flat_idx = b.op("Add", [b.op("Mul", [col_images, n_box], dtype=i64),
                            b.op("Gather", [all_n, pick], {"axis": 0}, dtype=i64)], dtype=i64)
    flat_boxes = b.op("Reshape", [boxes, b.const([-1, 4], i64)], dtype=f32)
    picked = b.op("Gather", [flat_boxes, flat_idx], {"axis": 0}, dtype=f32)  # [B,K,4]
    valid3 = b.unsqueeze(valid, 2, dtype=np.bool_)
    det_boxes = b.op("Where", [valid3, picked, b.const(0.0, f32)], dtype=f32, out_names=[NMS_OUTPUTS[1]])
    num = b.reduce_sum(b.op("Cast", [valid], {"to": onnx.TensorProto.INT32}, dtype=np.int32), 1, keepdims=1,
                       dtype=np.int32)
    num_dets = b.op("Identity", [num], dtype=np.int32, out_names=[NMS_OUTPUTS[0]])
    rows = b.op("Where", [valid, b.op("Gather", [all_n, pick], {"axis": 0}, dtype=i64), b.const(-1, i64)], dtype=i64)
    det_indices = b.op("Cast", [rows], {"to": onnx.TensorProto.INT32}, dtype=np.int32, out_names=[NMS_INDICES])
    return [num_dets, det_boxes, det_scores, det_classes, det_indices]
