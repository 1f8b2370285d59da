"""The ``portable`` NMS tail: exact greedy NMS from standard ONNX ops only (issue 9).

Why it exists: ``EfficientNMS_TRT`` is a plugin (deprecated since TensorRT 10.12, absent from TensorRT-RTX,
not serialized into version-compatible engines) and reports no indices; ONNX ``NonMaxSuppression`` has no
TensorRT-RTX runner and a data-dependent output size. This tail uses only Reshape/Slice/TopK/GatherElements/
element-wise/ReduceSum/MatMul/Loop, every TopK with a constant K <= 3840 (TensorRT's limit), and fixed-shape
outputs, so it builds in TensorRT 10/11/RTX and runs in any ONNX runtime.

Steps (per image; every tensor keeps the batch axis, images never mix):

1. Candidates. Multi-label: every (anchor, class) pair, flat index ``anchor * C + class``; ``--best-class``
   (and ``--agnostic``, see below): one per anchor, its best class (the lowest class id among equal maxima,
   like numpy/torch argmax). A candidate passes with score > conf (strict, the official rule).
2. The candidate cap (``--nms-candidates``, default 1024, at most 3840). When more than ``cap`` pass --conf,
   the ``cap`` best by (score desc, index asc) enter NMS, like the official 30000 and EfficientNMS's 5000;
   the rest are dropped (they could only be kept if fewer than K detections survive among the best).
   Two stages, so no [N*nc] candidate list is formed: the cap best *anchors* by their best score
   (max_c fl(obj*cls_c) = fl(obj * max_c cls_c), rounding being monotone), then the cap best (anchor, class)
   pairs among those anchors' rows: the same set, since every anchor ranked before a pair's anchor owns a
   distinct pair ranked before that pair. Each stage is ``nms_graph.top_set``: deterministic even with
   ties at the boundary (the cap-th largest *value* from TopK; entries above it all enter, entries equal to
   it by ascending index via a second TopK over the exactly-representable float key 2^24 - index; hence
   at most 2^24 candidates: an 80-class model up to ~1800x1800 input multi-label, any size with
   --best-class). No step depends on TensorRT's (unspecified) order among equal values.
3. Order: candidate j precedes i when (s_j > s_i) or (s_j == s_i and index_j < index_i): the official
   stable sort. A [cap,cap] boolean matrix, not a physical sort.
4. IoU matrix in float32 with the reference's arithmetic (corners min/max, areas, inter / union), and the
   suppression relation S[i,j] = j precedes i and IoU > iou (strict, like the official/torchvision; the
   constant is the largest float32 <= --iou so float32 IoU > it <=> IoU > --iou exactly) and same class
   (unless --agnostic). Per class by a same-class mask, not by the official +4096 px class offset: offset
   coordinates (up to 80 * 4096 px) round to 1/32 px in float32, which moves an IoU by up to ~1e-3 for a
   30 px box (less for larger ones); the mask computes IoU on the true coordinates (the EfficientNMS way), so
   results can differ from the official NMS only for an IoU that close to --iou.
5. Greedy by fixed point (Cluster-NMS style): keep <- valid and not any_j (keep_j and S[i,j]), from
   keep = valid. The greedy result is the *unique* fixed point (induction along the order: the first
   candidate is kept in any fixed point; each next one is decided by its predecessors only), and after t
   steps the first t candidates are final, so the iteration reaches it in at most cap steps. An ONNX
   ``Loop`` runs it with trip count cap and stops as soon as keep no longer changes (a few passes
   in practice, counting the one that sees no change: 2-6 on the official fixtures at conf 0.25, 6-10 at
   conf 0.001 with 3840 candidates). Fast-NMS (one step) would suppress more than greedy; not used.
6. Output: the K best kept by (score, index), again as an exact set (``top_set``) ordered by a [K,K]
   precedence count; det_indices = the anchor row; zeros (-1 for det_indices) past num_dets.

``--agnostic`` multi-label reduces to best-class candidates: two labels of one box have IoU 1, so the
lower-scoring one is always suppressed (for --iou < 1). It saves candidate slots; at --iou 1 the full
multi-label candidates are used.

Thresholds: score > conf, IoU > iou (official, ONNX NonMaxSuppression). EfficientNMS_TRT uses >= for both;
the results differ only on exact equality.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UserError
from .nms_graph import (BOOL, F32, FLOAT, I32, I64, INT32, INT64, KEY_LIMIT, MAX_TOPK, Builder, finish_outputs,
                        gather_rows, ordered_top, pad_columns, precedence, top_set)
from .options import NmsOptions


def validate_portable(nms: NmsOptions) -> None:
    cap = nms.candidates
    if int(cap) != cap or not 1 <= cap <= MAX_TOPK:
        raise UserError(f"--nms-candidates must be an integer within [1, {MAX_TOPK}] (TensorRT's TopK limit), "
                        f"got {cap}")
    if nms.topk > cap:
        raise UserError(f"--topk {nms.topk} is more than --nms-candidates {cap}: the portable tail keeps at most "
                        f"--nms-candidates detections; raise --nms-candidates or lower --topk")


def iou_floor32(iou: float) -> np.float32:
    """The largest float32 <= iou: for a float32 x, x > it <=> x > iou (the reference compares in float64)."""
    t = np.float32(iou)
    return np.nextafter(t, np.float32(-np.inf)) if float(t) > float(iou) else t


def per_anchor_candidates(nms: NmsOptions, nc: int) -> bool:
    """One candidate per anchor (its best class) instead of one per (anchor, class)."""
    return bool(nms.best_class or (nms.agnostic and nms.iou < 1) or nc == 1)


def portable_tail(b: Builder, pred, boxes, nc: int, nms: NmsOptions) -> list:
    """pred [B,N,>=5+nc] float32, boxes [B,N,4] xyxy -> num_dets, det_boxes, det_scores, det_classes, det_indices."""
    validate_portable(nms)
    cap, K = int(nms.candidates), int(nms.topk)
    n_anchor = pred.shape[1] if pred.shape and isinstance(pred.shape[1], int) else None
    per_anchor = per_anchor_candidates(nms, nc)
    width = 1 if per_anchor else nc
    if n_anchor is not None and n_anchor * width + cap > KEY_LIMIT:
        raise UserError(f"the portable NMS tail supports at most {KEY_LIMIT} candidates per image; "
                        f"{n_anchor} anchors x {width} labels is too many (use --best-class or a smaller input)")

    # 1. each anchor's best score m [B,N]; max_c fl(obj * cls_c) == fl(obj * max_c cls_c) (rounding is monotone),
    #    so the [B,N,nc] products are never formed: only the cap best anchors' rows are multiplied out below
    obj = b.slice(pred, 4, 5, 2, F32)  # [B,N,1]
    cls = None if nc == 1 and nms.obj_only_single_class else b.slice(pred, 5, 5 + nc, 2, F32)  # [B,N,nc]
    m = obj if cls is None else b.op("Mul", [obj, b.reduce("ReduceMax", cls, 2, F32, keepdims=1)], dtype=F32)
    m = b.squeeze(m, 2, dtype=F32)
    conf = b.const(np.float32(nms.conf), F32)
    m = pad_columns(b, b.op("Where", [b.op("Greater", [m, conf], dtype=BOOL), m, b.const(-1.0, F32)], dtype=F32), cap)

    # 2. the cap best anchors by (best score desc, anchor asc). Every one of the cap best (anchor, class) pairs
    #    has its anchor among them: each anchor ranked before it owns a distinct pair ranked before the pair.
    a_pos, a_s = top_set(b, m, cap)  # [B,cap]; -1: no candidate
    a_valid = b.op("Greater", [a_s, b.const(-0.5, F32)], dtype=BOOL)
    a_anchor = b.op("Where", [a_valid, b.cast(a_pos, INT32, I32), b.const(np.int32(0), I32)], dtype=I32)
    a_anchor64 = b.cast(a_anchor, INT64, I64)
    ids = b.const(np.arange(nc, dtype=np.float32), F32)
    rows = None  # [B,cap,nc]: those anchors' fl(obj * cls), exactly the reference's products
    if cls is not None:
        rows = b.op("Mul", [gather_rows(b, obj, a_anchor64, 1), gather_rows(b, cls, a_anchor64, nc)], dtype=F32)
    if per_anchor:
        s, pos_f, valid, anchor = a_s, b.cast(a_pos, FLOAT, F32), a_valid, a_anchor
        if rows is None or nc == 1:
            cls_f = b.op("Mul", [s, b.const(0.0, F32)], dtype=F32)
        else:  # the lowest class id among equal best products (numpy/torch argmax)
            is_best = b.op("Equal", [rows, b.unsqueeze(s, 2, dtype=F32)], dtype=BOOL)
            cls_f = b.reduce("ReduceMin", b.op("Where", [is_best, ids, b.const(float(nc), F32)], dtype=F32), 2, F32)
    else:  # multi-label: the cap best (anchor, class) pairs among those anchors' cap * nc pairs
        live = b.op("And", [b.op("Greater", [rows, conf], dtype=BOOL), b.unsqueeze(a_valid, 2, dtype=BOOL)],
                    dtype=BOOL)
        pair_v = b.op("Reshape", [b.op("Where", [live, rows, b.const(-1.0, F32)], dtype=F32), b.const([0, -1], I64)],
                      dtype=F32)  # [B,cap*nc]
        flat = b.op("Add", [b.op("Mul", [b.unsqueeze(b.cast(a_anchor, FLOAT, F32), 2, dtype=F32),
                                         b.const(float(nc), F32)], dtype=F32), ids], dtype=F32)
        flat = b.op("Reshape", [flat, b.const([0, -1], I64)], dtype=F32)  # anchor * nc + class (exact < 2^24)
        sel, s = top_set(b, pair_v, cap, index=flat)
        valid = b.op("Greater", [s, b.const(-0.5, F32)], dtype=BOOL)
        pos_f = b.op("GatherElements", [flat, sel], {"axis": 1}, dtype=F32)
        sel32 = b.cast(sel, INT32, I32)
        row = b.op("Div", [sel32, b.const(np.int32(nc), I32)], dtype=I32)
        label = b.op("Sub", [sel32, b.op("Mul", [row, b.const(np.int32(nc), I32)], dtype=I32)], dtype=I32)
        cls_f = b.cast(label, FLOAT, F32)
        anchor = b.op("GatherElements", [a_anchor, b.cast(row, INT64, I64)], {"axis": 1}, dtype=I32)
    cand_boxes = gather_rows(b, boxes, b.cast(anchor, INT64, I64), 4)  # [B,cap,4]

    # 3. order, 4. suppression relation
    suppress = b.op("And", [precedence(b, s, pos_f), _iou_above(b, cand_boxes, nms.iou)], dtype=BOOL)
    if not nms.agnostic:
        same = b.op("Equal", [b.unsqueeze(cls_f, 2, dtype=F32), b.unsqueeze(cls_f, 1, dtype=F32)], dtype=BOOL)
        suppress = b.op("And", [suppress, same], dtype=BOOL)

    # 5. greedy = the fixed point of keep <- valid & !(S @ keep)
    valid_f = b.cast(b.unsqueeze(valid, 2, dtype=BOOL), FLOAT, F32)  # [B,cap,1]
    keep = _fixed_point_loop(b, b.cast(suppress, FLOAT, F32), valid_f, cap)
    kept = b.op("Greater", [b.squeeze(keep, 2, dtype=F32), b.const(0.5, F32)], dtype=BOOL)  # [B,cap]

    # 6. the first K kept, in order (a [K,K] ranking, not [cap,cap])
    slot, out_s = ordered_top(b, b.op("Where", [kept, s, b.const(-1.0, F32)], dtype=F32), K, index=pos_f)
    ok = b.op("Greater", [out_s, b.const(-0.5, F32)], dtype=BOOL)
    return finish_outputs(b, ok, slot, s, cls_f, anchor, cand_boxes)


def _iou_above(b: Builder, box, iou: float):
    """box [B,k,4] -> [B,k,k] bool: IoU(i,j) > iou, in the numpy reference's float32 arithmetic.

    The reference clamps the overlap widths at 0 before multiplying; here a non-positive width or height
    masks the pair instead (its IoU is 0 there, never above --iou): same result, two fewer float passes."""
    coord = [b.op("Gather", [box, b.const(k, I64)], {"axis": 2}, dtype=F32) for k in range(4)]  # [B,k]
    x1, x2 = b.op("Min", [coord[0], coord[2]], dtype=F32), b.op("Max", [coord[0], coord[2]], dtype=F32)
    y1, y2 = b.op("Min", [coord[1], coord[3]], dtype=F32), b.op("Max", [coord[1], coord[3]], dtype=F32)
    area = b.op("Mul", [b.op("Sub", [x2, x1], dtype=F32), b.op("Sub", [y2, y1], dtype=F32)], dtype=F32)
    col = lambda x: b.unsqueeze(x, 2, dtype=F32)  # noqa: E731  [B,k,1] (i)
    row = lambda x: b.unsqueeze(x, 1, dtype=F32)  # noqa: E731  [B,1,k] (j)
    zero = b.const(0.0, F32)

    def overlap(lo, hi):  # outer Min/Max, one full-size Sub
        return b.op("Sub", [b.op("Min", [col(hi), row(hi)], dtype=F32), b.op("Max", [col(lo), row(lo)], dtype=F32)],
                    dtype=F32)

    w, h = overlap(x1, x2), overlap(y1, y2)
    both = b.op("And", [b.op("Greater", [w, zero], dtype=BOOL), b.op("Greater", [h, zero], dtype=BOOL)], dtype=BOOL)
    inter = b.op("Mul", [w, h], dtype=F32)
    union = b.op("Sub", [b.op("Add", [col(area), row(area)], dtype=F32), inter], dtype=F32)
    ratio = b.op("Div", [inter, union], dtype=F32)
    return b.op("And", [both, b.op("Greater", [ratio, b.const(iou_floor32(iou), F32)], dtype=BOOL)], dtype=BOOL)


def _fixed_point_loop(b: Builder, s_mat, valid_f, cap: int):
    """ONNX Loop: at most ``cap`` steps of keep <- valid * (S @ keep == 0), stopping once keep is unchanged.

    keep is float {0,1} [B,cap,1]; S @ keep counts kept suppressors (exact small integers in float32).
    TensorRT builds the data-dependent stop (a while loop; checked with TensorRT-RTX in the tests).
    """
    it = gs.Variable(b.name("loop_iter"), dtype=np.int64, shape=[])
    cond_in = gs.Variable(b.name("loop_cond_in"), dtype=np.bool_, shape=[])
    keep_in = gs.Variable(b.name("loop_keep_in"), dtype=F32, shape=None)
    body = gs.Graph(inputs=[it, cond_in, keep_in], opset=b.opset, name=b.name("greedy_body"))
    sub = Builder(body, b.opset)
    sub.count = b.count  # one counter: names stay unique across graph and body
    hits = sub.op("MatMul", [s_mat, keep_in], dtype=F32)
    free = sub.cast(sub.op("Less", [hits, sub.const(0.5, F32)], dtype=BOOL), FLOAT, F32)
    keep_out = sub.op("Mul", [valid_f, free], dtype=F32)
    diff = sub.op("Abs", [sub.op("Sub", [keep_out, keep_in], dtype=F32)], dtype=F32)
    total = sub.op("ReduceSum", [diff], {"keepdims": 0}, dtype=F32)  # no axes: all of them -> scalar
    cond_out = sub.op("Greater", [total, sub.const(0.5, F32)], dtype=BOOL)
    body.outputs = [cond_out, keep_out]
    b.count = sub.count
    return b.op("Loop", [b.const(np.int64(cap), I64), b.const(np.bool_(True), BOOL), valid_f], {"body": body},
                dtype=F32)
