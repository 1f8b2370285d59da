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
   Deterministic even with ties at the boundary: TopK gives the cap-th largest score t; candidates with
   score > t all enter; those equal to t enter by ascending index, chosen by a second TopK over the
   exactly-representable float key 2^24 - index (hence at most 2^24 candidates: any 80-class model up
   to ~2300x2300 input). No step depends on TensorRT's (unspecified) tie order.
3. Order: candidate j precedes i when (s_j > s_i) or (s_j == s_i and index_j < index_i): the official
   stable sort. A [cap,cap] boolean matrix, not a physical sort.
4. IoU matrix in float32 with the reference's arithmetic (corners min/max, areas, inter / union), and the
   suppression relation S[i,j] = j precedes i and IoU > iou (strict, like the official/torchvision; the
   constant is the largest float32 <= --iou so float32 IoU > it <=> IoU > --iou exactly) and same class
   (unless --agnostic). Per class by a same-class mask, not by the official +4096 px class offset: offset
   coordinates (up to 80 * 4096 px) round to 1/32 px in float32, which moves IoU by ~1e-4; the mask computes
   IoU on the true coordinates (the EfficientNMS way), so results can differ from the official NMS only for an
   IoU within ~1e-4 of --iou.
5. Greedy by fixed point (Cluster-NMS style): keep <- valid and not any_j (keep_j and S[i,j]), from
   keep = valid. The greedy result is the *unique* fixed point (induction along the order: the first
   candidate is kept in any fixed point; each next one is decided by its predecessors only), and after t
   steps the first t candidates are final, so the iteration reaches it in at most cap steps. An ONNX
   ``Loop`` runs it with trip count cap and stops as soon as keep no longer changes (typically 3-10 steps:
   the longest suppression chain). Fast-NMS (one step) would suppress more than greedy; not used.
6. Output: the first K kept in order by one more TopK over ``cap - rank`` (ranks are distinct);
   det_indices = the anchor row; zeros (-1 for det_indices) past num_dets.

``--agnostic`` multi-label reduces to best-class candidates: two labels of one box have IoU 1, so the
lower-scoring one is always suppressed (for --iou < 1). It saves candidate slots; at --iou 1 the full
multi-label candidates are used.

Thresholds: score > conf, IoU > iou (official, ONNX NonMaxSuppression). EfficientNMS_TRT uses >= for both;
the results differ only on exact equality.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from runtimes.contract import NMS_INDICES, NMS_OUTPUTS

from .errors import UserError
from .options import NmsOptions

MAX_TOPK = 3840  # TensorRT's limit on a TopK's K (and the largest candidate cap)
KEY_LIMIT = 1 << 24  # candidate indices must stay exact in float32 (the tie-breaking TopK key)


def validate_portable(nms: NmsOptions) -> None:
    cap = nms.candidates
    if int(cap) != cap or not 1 <= cap <= MAX_TOPK:
        raise UserError(f"--nms-candidates must be an integer within [1, {MAX_TOPK}] (TensorRT's TopK limit), got {cap}")
    if nms.topk > cap:
        raise UserError(f"--topk {nms.topk} is more than --nms-candidates {cap}: the portable tail keeps at most "
                        f"--nms-candidates detections; raise --nms-candidates or lower --topk")


def iou_floor32(iou: float) -> np.float32:
    """The largest float32 <= iou: for a float32 x, x > it <=> x > iou (the reference compares in float64)."""
    t = np.float32(iou)
    return np.nextafter(t, np.float32(-np.inf)) if float(t) > float(iou) else t


def portable_tail(b, pred, boxes, scores, nc: int, nms: NmsOptions) -> list:
    """boxes [B,N,4] xyxy, scores [B,N,nc] -> num_dets, det_boxes, det_scores, det_classes, det_indices."""
    validate_portable(nms)
    f32, i64 = np.float32, np.int64
    cap, K = int(nms.candidates), int(nms.topk)
    n_anchor = pred.shape[1] if pred.shape and isinstance(pred.shape[1], int) else None
    per_anchor = nms.best_class or (nms.agnostic and nms.iou < 1) or nc == 1
    width = 1 if per_anchor else nc
    if n_anchor is not None and n_anchor * width + cap > KEY_LIMIT:
        raise UserError(f"the portable NMS tail supports at most {KEY_LIMIT} candidates per image; "
                        f"{n_anchor} anchors x {width} labels is too many (use --best-class or a smaller input)")

    # 1. candidate scores v [B,L0] and, for best-class, each anchor's class
    if per_anchor and nc > 1:
        best = _reduce(b, "ReduceMax", scores, 2, f32, keepdims=1)  # [B,N,1]
        ids = b.const(np.arange(nc, dtype=f32), f32)
        is_best = b.op("Equal", [scores, best], dtype=np.bool_)
        lowest = b.op("Where", [is_best, ids, b.const(float(nc), f32)], dtype=f32)
        best_cls = _reduce(b, "ReduceMin", lowest, 2, f32)  # [B,N] float class ids (exact)
        v = b.squeeze(best, 2, dtype=f32)
    elif per_anchor:
        best_cls = None
        v = b.squeeze(scores, 2, dtype=f32)
    else:
        best_cls = None
        v = b.op("Reshape", [scores, b.const([0, -1], i64)], dtype=f32)  # [B,N*C], index anchor*C + class
    passed = b.op("Greater", [v, b.const(np.float32(nms.conf), f32)], dtype=np.bool_)
    vm = b.op("Where", [passed, v, b.const(-1.0, f32)], dtype=f32)
    # pad with cap failing entries: TopK's K = cap is then valid for any (even dynamic) number of anchors
    vm = b.op("Pad", [vm, b.const([0, 0, 0, cap], i64), b.const(-1.0, f32)], {"mode": "constant"}, dtype=f32)

    # 2. the top `cap` by (score desc, index asc), as a set chosen without relying on TopK's tie order
    topk = {"axis": 1, "largest": 1, "sorted": 1}
    k_cap = b.const([cap], i64)
    top_vals, _ = b.op("TopK", [vm, k_cap], topk, dtype=[f32, i64], n_out=2)
    t = b.slice(top_vals, cap - 1, cap, 1, f32)  # [B,1] the cap-th largest score
    length = b.op("Shape", [vm], dtype=i64)
    length = b.op("Gather", [length, b.const(1, i64)], {"axis": 0}, dtype=i64)
    index_f = b.op("Cast", [b.op("Range", [b.const(0, i64), length, b.const(1, i64)], dtype=i64)],
                   {"to": onnx.TensorProto.FLOAT}, dtype=f32)  # [L], exact below 2^24
    key = b.op("Where", [b.op("Greater", [vm, t], dtype=np.bool_), b.const(float(2 * KEY_LIMIT), f32),
                         b.op("Where", [b.op("Equal", [vm, t], dtype=np.bool_),
                                        b.op("Sub", [b.const(float(KEY_LIMIT), f32), index_f], dtype=f32),
                                        b.const(-1.0, f32)], dtype=f32)], dtype=f32)
    _, pos = b.op("TopK", [key, k_cap], topk, dtype=[f32, i64], n_out=2)  # [B,cap]

    # per-candidate facts
    s = b.op("GatherElements", [vm, pos], {"axis": 1}, dtype=f32)  # [B,cap], -1 = no candidate
    valid = b.op("Greater", [s, b.const(-0.5, f32)], dtype=np.bool_)
    pos32 = b.op("Cast", [pos], {"to": onnx.TensorProto.INT32}, dtype=np.int32)
    if per_anchor:
        anchor = pos32
    else:
        anchor = b.op("Div", [pos32, b.const(np.int32(nc), np.int32)], dtype=np.int32)
    anchor = b.op("Where", [valid, anchor, b.const(np.int32(0), np.int32)], dtype=np.int32)  # in range
    anchor64 = b.op("Cast", [anchor], {"to": onnx.TensorProto.INT64}, dtype=i64)
    if best_cls is not None:
        cls_f = b.op("GatherElements", [best_cls, anchor64], {"axis": 1}, dtype=f32)
    elif per_anchor:
        cls_f = b.op("Mul", [s, b.const(0.0, f32)], dtype=f32)  # nc == 1: class 0
    else:
        label = b.op("Sub", [pos32, b.op("Mul", [anchor, b.const(np.int32(nc), np.int32)], dtype=np.int32)],
                     dtype=np.int32)
        cls_f = b.op("Cast", [label], {"to": onnx.TensorProto.FLOAT}, dtype=f32)
    idx3 = b.op("Add", [b.unsqueeze(anchor64, 2, dtype=i64), b.const(np.zeros((1, 1, 4), i64), i64)], dtype=i64)
    cand_boxes = b.op("GatherElements", [boxes, idx3], {"axis": 1}, dtype=f32)  # [B,cap,4]

    # 3. order: j precedes i
    col = lambda x, dt=f32: b.unsqueeze(x, 2, dtype=dt)  # noqa: E731  [B,cap,1] (i)
    row = lambda x, dt=f32: b.unsqueeze(x, 1, dtype=dt)  # noqa: E731  [B,1,cap] (j)
    pos_f = b.op("Cast", [pos], {"to": onnx.TensorProto.FLOAT}, dtype=f32)
    s_i, s_j = col(s), row(s)
    higher = b.op("Greater", [s_j, s_i], dtype=np.bool_)
    tie_first = b.op("And", [b.op("Equal", [s_j, s_i], dtype=np.bool_),
                             b.op("Less", [row(pos_f), col(pos_f)], dtype=np.bool_)], dtype=np.bool_)
    before = b.op("Or", [higher, tie_first], dtype=np.bool_)  # [B,cap,cap]
    rank = _reduce(b, "ReduceSum", b.op("Cast", [before], {"to": onnx.TensorProto.FLOAT}, dtype=f32), 2, f32)

    # 4. IoU > threshold, same class
    coord = [b.op("Gather", [cand_boxes, b.const(k, i64)], {"axis": 2}, dtype=f32) for k in range(4)]  # [B,cap]
    x1, x2 = b.op("Min", [coord[0], coord[2]], dtype=f32), b.op("Max", [coord[0], coord[2]], dtype=f32)
    y1, y2 = b.op("Min", [coord[1], coord[3]], dtype=f32), b.op("Max", [coord[1], coord[3]], dtype=f32)
    area = b.op("Mul", [b.op("Sub", [x2, x1], dtype=f32), b.op("Sub", [y2, y1], dtype=f32)], dtype=f32)
    zero = b.const(0.0, f32)

    def overlap(lo, hi):
        inner = b.op("Sub", [b.op("Min", [col(hi), row(hi)], dtype=f32), b.op("Max", [col(lo), row(lo)], dtype=f32)],
                     dtype=f32)
        return b.op("Max", [inner, zero], dtype=f32)

    inter = b.op("Mul", [overlap(x1, x2), overlap(y1, y2)], dtype=f32)
    union = b.op("Sub", [b.op("Add", [col(area), row(area)], dtype=f32), inter], dtype=f32)
    iou = b.op("Div", [inter, union], dtype=f32)  # 0/0 = NaN compares False, like the reference's 0
    suppress = b.op("And", [before, b.op("Greater", [iou, b.const(iou_floor32(nms.iou), f32)], dtype=np.bool_)],
                    dtype=np.bool_)
    if not nms.agnostic:
        suppress = b.op("And", [suppress, b.op("Equal", [col(cls_f), row(cls_f)], dtype=np.bool_)], dtype=np.bool_)
    s_mat = b.op("Cast", [suppress], {"to": onnx.TensorProto.FLOAT}, dtype=f32)  # [B,cap,cap]

    # 5. greedy = the fixed point of keep <- valid & !(S @ keep)
    valid_f = b.op("Cast", [col(valid, np.bool_)], {"to": onnx.TensorProto.FLOAT}, dtype=f32)  # [B,cap,1]
    keep = _fixed_point_loop(b, s_mat, valid_f, cap)
    kept = b.op("Greater", [b.squeeze(keep, 2, dtype=f32), b.const(0.5, f32)], dtype=np.bool_)  # [B,cap]

    # 6. first K kept, in order
    out_key = b.op("Where", [kept, b.op("Sub", [b.const(float(cap), f32), rank], dtype=f32), b.const(-1.0, f32)],
                   dtype=f32)
    out_vals, slot = b.op("TopK", [out_key, b.const([K], i64)], topk, dtype=[f32, i64], n_out=2)  # [B,K]
    ok = b.op("Greater", [out_vals, zero], dtype=np.bool_)
    num = _reduce(b, "ReduceSum", b.op("Cast", [ok], {"to": onnx.TensorProto.INT32}, dtype=np.int32), 1,
                  np.int32, keepdims=1)
    num_dets = b.op("Identity", [num], dtype=np.int32, out_names=[NMS_OUTPUTS[0]])
    pick = lambda x, dt: b.op("GatherElements", [x, slot], {"axis": 1}, dtype=dt)  # noqa: E731
    det_scores = b.op("Where", [ok, pick(s, f32), zero], dtype=f32, out_names=[NMS_OUTPUTS[2]])
    det_cls = b.op("Where", [ok, pick(cls_f, f32), zero], dtype=f32)
    det_classes = b.op("Cast", [det_cls], {"to": onnx.TensorProto.INT32}, dtype=np.int32, out_names=[NMS_OUTPUTS[3]])
    det_idx = b.op("Where", [ok, pick(anchor, np.int32), b.const(np.int32(-1), np.int32)], dtype=np.int32,
                   out_names=[NMS_INDICES])
    slot4 = b.op("Add", [b.unsqueeze(slot, 2, dtype=i64), b.const(np.zeros((1, 1, 4), i64), i64)], dtype=i64)
    det_boxes = b.op("Where", [b.unsqueeze(ok, 2, dtype=np.bool_),
                               b.op("GatherElements", [cand_boxes, slot4], {"axis": 1}, dtype=f32), zero],
                     dtype=f32, out_names=[NMS_OUTPUTS[1]])
    return [num_dets, det_boxes, det_scores, det_classes, det_idx]


def _reduce(b, op: str, x, axis: int, dtype, keepdims: int = 0):
    """Reduce* over one axis; axes became an input in opset 13 (ReduceSum) / 18 (the others)."""
    if (op == "ReduceSum" and b.opset >= 13) or b.opset >= 18:
        return b.op(op, [x, b.const([axis], np.int64)], {"keepdims": keepdims}, dtype=dtype)
    return b.op(op, [x], {"axes": [axis], "keepdims": keepdims}, dtype=dtype)


def _fixed_point_loop(b, s_mat, valid_f, cap: int):
    """ONNX Loop: at most ``cap`` steps of keep <- valid * (S @ keep == 0), stopping once keep is unchanged.

    keep is float {0,1} [B,cap,1]; S @ keep counts kept suppressors (exact small integers in float32).
    """
    f32 = np.float32
    it = gs.Variable(b.name("loop_iter"), dtype=np.int64, shape=[])
    cond_in = gs.Variable(b.name("loop_cond_in"), dtype=np.bool_, shape=[])
    keep_in = gs.Variable(b.name("loop_keep_in"), dtype=f32, shape=None)
    body = gs.Graph(inputs=[it, cond_in, keep_in], opset=b.opset, name=b.name("greedy_body"))
    sub = type(b)(body, b.opset)
    sub.count = b.count  # one counter: names stay unique across graph and body
    hits = sub.op("MatMul", [s_mat, keep_in], dtype=f32)
    free = sub.op("Cast", [sub.op("Less", [hits, sub.const(0.5, f32)], dtype=np.bool_)],
                  {"to": onnx.TensorProto.FLOAT}, dtype=f32)
    keep_out = sub.op("Mul", [valid_f, free], dtype=f32)
    diff = sub.op("Abs", [sub.op("Sub", [keep_out, keep_in], dtype=f32)], dtype=f32)
    total = sub.op("ReduceSum", [diff], {"keepdims": 0}, dtype=f32)  # no axes: all of them -> scalar
    cond_out = sub.op("Greater", [total, sub.const(0.5, f32)], dtype=np.bool_)
    body.outputs = [cond_out, keep_out]
    b.count = sub.count
    return b.op("Loop", [b.const(np.int64(cap), np.int64), b.const(np.bool_(True), np.bool_), valid_f],
                {"body": body}, dtype=f32)
