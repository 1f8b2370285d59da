"""Stage 3c: append an NMS tail to the raw graph by graph surgery (onnx-graphsurgeon).

Every tail reads the raw ``output`` [B,N,>=5+nc] (classes in columns 5:5+nc; pose/seg rows carry more columns)
and gives the contract's outputs (runtimes/contract.py): num_dets int32 [B,1], det_boxes float32 [B,K,4]
(x1,y1,x2,y2), det_scores float32 [B,K], det_classes int32 [B,K], score-descending per image, zero past
num_dets, and (``onnx``, ``portable``) det_indices int32 [B,K], the kept anchor rows (-1 past num_dets).

* ``portable`` (nms_portable.py): exact greedy NMS from standard ops only; TensorRT 10/11/RTX and any ONNX
  runtime. The default for TensorRT-RTX and --version-compatible engines.
* ``efficient``: one TensorRT ``EfficientNMS_TRT`` node (multi-label; TensorRT 10/11 only; no indices).
* ``onnx``: standard ``NonMaxSuppression``, then a fixed-shape selection of the K best per image (every
  image of a dynamic batch independent; TopK K constant; no dependence on TopK's tie order).

Shared prefix: boxes xyxy (x -/+ w/2, the official arithmetic) and scores obj*cls in FP32 (obj alone for
single-class detection models, like the official NMS; ``NmsOptions.obj_only_single_class``). Box coding 0
(corners) is given to the plugin on purpose: the plugin then sees exactly the boxes the other tails and the
CPU reference see, so the efficient tail can be checked bit for bit on CPU.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from runtimes.contract import NMS_OUTPUTS, RAW_OUTPUT

from .errors import UserError
from .nms_graph import (BOOL, F32, FLOAT, I32, I64, INT32, INT64, MAX_TOPK, Builder, export_like, finish_outputs,
                        gather_rows, ordered_top, pad_columns)
from .options import NmsOptions

TRT_DOMAIN = "TRT"  # TensorRT's parser finds plugins by op type + plugin_version; "TRT" is the usual domain
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
    if nms.mode == "onnx" and nms.topk > MAX_TOPK:
        raise UserError(f"--topk {nms.topk}: the onnx tail sorts with a TopK of K = --topk, which TensorRT limits "
                        f"to {MAX_TOPK}")
    if nms.best_class and nms.mode == "efficient":
        raise UserError("--best-class needs --nms onnx or portable (EfficientNMS_TRT is always multi-label)")


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
    b = Builder(graph, opset)
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

            outs = portable_tail(b, pred, boxes, nc, nms)
        else:
            outs = _onnx_tail(b, pred, boxes, scores, nc, nms)
        for t, dt, shp in zip(outs, dtypes, shapes):
            t.dtype, t.shape = dt, shp
    # keep_raw keeps every raw-graph output (a seg graph's `protos` too), raw `output` first
    graph.outputs = outs + ([raw] + [t for t in graph.outputs if t is not raw] if keep_raw else [])
    # explicit opset list: gs would otherwise append the plugin domain to the *input* model's list
    domains = [onnx.helper.make_opsetid(o.domain, o.version) for o in proto.opset_import if o.domain != TRT_DOMAIN]
    if nms.mode == "efficient":
        domains.append(onnx.helper.make_opsetid(TRT_DOMAIN, 1))
    return export_like(graph, proto, domains)


def _boxes_and_scores(b: Builder, pred, nc: int, obj_only_single_class: bool = True):
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


def _onnx_tail(b: Builder, pred, boxes, scores, nc: int, nms: NmsOptions) -> list:
    """NonMaxSuppression, then per image the K best selections in (score desc, anchor, class) order.

    The selections [M,3] are scattered back into a dense [B,N,C'] score map (-1 where not selected), so
    every later step has a fixed shape: the K best per image come from ``top_set`` (TopK with K = --topk, a
    constant <= 3840) and their order from ``precedence`` (stable by anchor then class, like the official
    NMS), so nothing depends on TopK's order among equal scores. The NMS itself: ONNX Runtime considers
    every candidate; TensorRT's NMS layer only the best 5000 per image (2000 on SM 5.3/6.2), sorted
    without regard to class, with an unspecified order among equal scores.
    """
    K = int(nms.topk)
    if nms.agnostic or nms.best_class:
        best, arg = b.op("TopK", [scores, b.const([1], I64)], {"axis": 2, "largest": 1, "sorted": 1},
                         dtype=[F32, I64], n_out=2)  # [B,N,1]
    if nms.agnostic:  # one candidate per box (its best class); multi-label + agnostic reduces to this
        dense_scores = best
    elif nms.best_class:  # per-class NMS where each box only competes with its best class
        is_best = b.op("Equal", [arg, b.const(np.arange(nc), I64)], dtype=BOOL)
        dense_scores = b.op("Where", [is_best, scores, b.const(0.0, F32)], dtype=F32)
    else:
        dense_scores = scores
    nms_scores = b.op("Transpose", [dense_scores], {"perm": [0, 2, 1]}, dtype=F32)  # [B,C',N]
    sel = b.op("NonMaxSuppression", [boxes, nms_scores, b.const([K], I64), b.const([nms.iou], F32),
                                     b.const([nms.conf], F32)], dtype=I64)  # [M,3] (image, class, box)
    bnc = b.op("Gather", [sel, b.const([0, 2, 1], I64)], {"axis": 1}, dtype=I64)  # [M,3] (image, box, class)
    missing = b.op("Sub", [b.op("Mul", [dense_scores, b.const(0.0, F32)], dtype=F32), b.const(1.0, F32)], dtype=F32)
    dense = b.op("ScatterND", [missing, bnc, b.op("GatherND", [dense_scores, bnc], dtype=F32)], dtype=F32)
    width = 1 if nms.agnostic else nc
    flat = pad_columns(b, b.op("Reshape", [dense, b.const([0, -1], I64)], dtype=F32), K)  # [B,N*C'+K]

    pos, s = ordered_top(b, flat, K)  # [B,K] in output order: (score desc, anchor, class)
    ok = b.op("Greater", [s, b.const(-0.5, F32)], dtype=BOOL)
    pos32 = b.cast(pos, INT32, I32)
    anchor = pos32 if width == 1 else b.op("Div", [pos32, b.const(np.int32(width), I32)], dtype=I32)
    anchor = b.op("Where", [ok, anchor, b.const(np.int32(0), I32)], dtype=I32)
    anchor64 = b.cast(anchor, INT64, I64)
    if nms.agnostic:
        label = b.squeeze(b.op("GatherElements", [arg, b.unsqueeze(anchor64, 2, dtype=I64)], {"axis": 1}, dtype=I64),
                          2, dtype=I64)
        cls_f = b.cast(label, FLOAT, F32)
    elif width == 1:
        cls_f = b.op("Mul", [s, b.const(0.0, F32)], dtype=F32)
    else:
        label = b.op("Sub", [pos32, b.op("Mul", [anchor, b.const(np.int32(width), I32)], dtype=I32)], dtype=I32)
        cls_f = b.cast(label, FLOAT, F32)
    return finish_outputs(b, ok, None, s, cls_f, anchor, gather_rows(b, boxes, anchor64, 4))
