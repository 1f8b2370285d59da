"""NMS references in plain numpy, shared by runtimes, the check harness and the tests.

* ``non_max_suppression``: the official YOLOv7 ``utils.general.non_max_suppression`` (same candidates,
  scores, class-offset batched NMS, float32 arithmetic), used on raw ``[B,N,5+nc]`` outputs.
* ``efficient_nms_reference``: what TensorRT's ``EfficientNMS_TRT`` plugin computes, so the efficient
  tail can be checked on a machine without TensorRT (the spirit of Polygraphy's ``pluginref``).
* ``portable_nms_reference``: what the ``portable`` (and ``onnx``) tail computes: greedy NMS per class by a
  same-class mask (no coordinate offset), strict thresholds, a candidate cap, and the kept anchor rows.

numpy only on purpose: no torch/onnx import, so every runtime can use it.
"""
from __future__ import annotations

import numpy as np

MAX_WH = 4096  # official class offset (pixels) for batched NMS: boxes of different classes never overlap
MAX_NMS = 30000  # official cap on candidates entering NMS (highest scores kept)
EFFICIENT_NMS_CANDIDATES = 5000  # EfficientNMS_TRT: top-scoring candidates entering NMS (desktop GPUs)


def xywh2xyxy(xywh: np.ndarray) -> np.ndarray:
    """Center/size -> corners, the official arithmetic (x - w / 2) in the input's precision."""
    out = np.empty_like(xywh)
    half_w, half_h = xywh[..., 2] / 2, xywh[..., 3] / 2
    out[..., 0] = xywh[..., 0] - half_w
    out[..., 1] = xywh[..., 1] - half_h
    out[..., 2] = xywh[..., 0] + half_w
    out[..., 3] = xywh[..., 1] + half_h
    return out


def yolo_scores(pred: np.ndarray, nc: int | None = None, obj_only_single_class: bool = True) -> np.ndarray:
    """Per-class scores [..., nc] from raw predictions [..., 5+nc(+extra)] (classes are columns 5:5+nc).

    obj * cls for nc > 1. For nc == 1 the official detection NMS uses obj alone: a single-class model's class
    output is never trained (no class loss when nc == 1), so obj * cls would be meaningless (often ~0.5x).
    The official pose and u7 segmentation NMS multiply always: ``obj_only_single_class=False``.
    """
    nc = pred.shape[-1] - 5 if nc is None else int(nc)
    obj = pred[..., 4:5]
    if nc == 1 and obj_only_single_class:
        return obj.copy()
    return pred[..., 5:5 + nc] * obj


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value}")


def _greedy(boxes: np.ndarray, iou_thres: float, *, classes: np.ndarray | None = None, inclusive: bool = False,
            max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS over boxes already sorted by score (descending); returns kept positions in that order.

    ``inclusive`` False: suppress when IoU > thres (torchvision, ONNX NonMaxSuppression);
    True: IoU >= thres (EfficientNMS_TRT). ``classes``: only boxes of the same class suppress each other.
    IoU is computed in float32 like the GPU/C++ kernels; boxes are reordered (min/max corners) first.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, np.int64)
    b = boxes.astype(np.float32, copy=False)
    x1, x2 = np.minimum(b[:, 0], b[:, 2]), np.maximum(b[:, 0], b[:, 2])
    y1, y2 = np.minimum(b[:, 1], b[:, 3]), np.maximum(b[:, 1], b[:, 3])
    areas = (x2 - x1) * (y2 - y1)
    thres = np.float64(iou_thres)
    alive = np.ones(n, bool)
    keep: list[int] = []
    for i in range(n):
        if not alive[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = i + 1 + np.flatnonzero(alive[i + 1:])
        if classes is not None:
            rest = rest[classes[rest] == classes[i]]
        if not len(rest):
            continue
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), np.float32(0))
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), np.float32(0))
        inter = w * h
        union = areas[i] + areas[rest] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where((inter > 0) & (union > 0), inter / union, np.float32(0)).astype(np.float64)
        alive[rest[iou >= thres if inclusive else iou > thres]] = False
    return np.asarray(keep, np.int64)


def non_max_suppression(pred: np.ndarray, conf: float = 0.25, iou: float = 0.45, multi_label: bool = False,
                        agnostic: bool = False, max_det: int = 300, nc: int | None = None,
                        obj_only_single_class: bool = True) -> list[np.ndarray]:
    """Official YOLOv7 NMS on raw predictions [B,N,5+nc] (cx,cy,w,h input pixels, obj, class probs).

    ``nc``: number of classes when rows carry extra columns after 5+nc (keypoints, mask coefficients);
    default: every column after the 5th. ``obj_only_single_class``: see ``yolo_scores``.

    Per image: candidates obj > conf; scores as ``yolo_scores``; best class with score > conf (or every
    (box, class) pair with score > conf if ``multi_label`` and nc > 1); at most 30000 highest-scoring
    candidates; boxes offset by class * 4096 unless ``agnostic``; greedy NMS (suppress IoU > iou).
    Returns per image float32 [n,6] (x1,y1,x2,y2,score,cls), score descending, n <= max_det.
    Ties in score keep the candidate order (anchor, then class), like a stable sort.
    """
    pred = np.asarray(pred)
    if pred.ndim != 3 or pred.shape[-1] < 6:
        raise ValueError(f"expected raw predictions [B,N,5+nc], got shape {pred.shape}")
    _check_unit("conf", conf)
    _check_unit("iou", iou)
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")
    pred = pred.astype(np.float32, copy=False)
    nc = _num_classes(pred, nc)
    multi_label = multi_label and nc > 1
    thr = np.float32(conf)
    out = []
    for x in pred:
        x = x[x[:, 4] > thr]
        scores = yolo_scores(x, nc, obj_only_single_class)
        box = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = np.nonzero(scores > thr)
            det_box, det_score, det_cls = box[i], scores[i, j], j
        else:
            j = scores.argmax(1) if len(x) else np.zeros(0, np.int64)
            best = scores[np.arange(len(x)), j]
            sel = best > thr
            det_box, det_score, det_cls = box[sel], best[sel], j[sel]
        order = np.argsort(-det_score, kind="stable")[:MAX_NMS]
        det_box, det_score = det_box[order], det_score[order]
        det_cls = det_cls[order].astype(np.float32)
        offset = det_cls[:, None] * np.float32(0 if agnostic else MAX_WH)
        keep = _greedy(det_box + offset, iou, max_keep=max_det)
        out.append(np.concatenate([det_box[keep], det_score[keep, None], det_cls[keep, None]], 1).astype(np.float32))
    return out


def _num_classes(pred: np.ndarray, nc: int | None) -> int:
    if nc is None:
        return pred.shape[-1] - 5
    if int(nc) != nc or not 1 <= nc <= pred.shape[-1] - 5:
        raise ValueError(f"nc={nc} does not fit rows of {pred.shape[-1]} values (5 + nc + extra)")
    return int(nc)


def portable_nms_reference(pred: np.ndarray, conf: float = 0.25, iou: float = 0.45, max_det: int = 100, *,
                           multi_label: bool = True, agnostic: bool = False, max_candidates: int = 1024,
                           nc: int | None = None, obj_only_single_class: bool = True):
    """What the ``portable`` NMS tail computes, on raw predictions [B,N,5+nc(+extra)].

    Candidates: (anchor, class) pairs with score > conf (multi-label), or each anchor's best class (lowest
    id among equal maxima) with score > conf; multi-label + agnostic reduces to best class when iou < 1
    (two labels of one box have IoU 1: the second is always suppressed). Order: score desc, then candidate
    index (anchor * nc + class, or anchor) asc; the first ``max_candidates`` enter NMS. Greedy NMS on the
    true coordinates, same class only unless ``agnostic``, suppressing IoU > iou. With a large enough
    ``max_candidates`` this is also what the ``onnx`` tail gives (ONNX Runtime; no score ties).

    Returns num_dets int32 [B,1], det_boxes float32 [B,K,4], det_scores float32 [B,K], det_classes int32
    [B,K], det_indices int32 [B,K] (anchor rows, -1 past num_dets), K = max_det.
    """
    pred = np.asarray(pred, np.float32)
    if pred.ndim != 3 or pred.shape[-1] < 6:
        raise ValueError(f"expected raw predictions [B,N,5+nc], got shape {pred.shape}")
    _check_unit("conf", conf)
    _check_unit("iou", iou)
    if max_det < 1 or max_candidates < 1:
        raise ValueError(f"max_det and max_candidates must be >= 1, got {max_det}, {max_candidates}")
    nc = _num_classes(pred, nc)
    per_anchor = not multi_label or (agnostic and iou < 1) or nc == 1
    B, K = len(pred), int(max_det)
    num = np.zeros((B, 1), np.int32)
    boxes = np.zeros((B, K, 4), np.float32)
    scores = np.zeros((B, K), np.float32)
    classes = np.zeros((B, K), np.int32)
    indices = np.full((B, K), -1, np.int32)
    thr = np.float32(conf)
    for b, x in enumerate(pred):
        s = yolo_scores(x, nc, obj_only_single_class)
        if per_anchor:
            cls = s.argmax(1)
            value = s[np.arange(len(s)), cls]
            cand = np.flatnonzero(value > thr)
            anchor, label, v = cand, cls[cand], value[cand]
        else:
            flat = s.reshape(-1)
            cand = np.flatnonzero(flat > thr)
            anchor, label, v = cand // nc, cand % nc, flat[cand]
        order = np.argsort(-v, kind="stable")[:max_candidates]
        anchor, label, v = anchor[order], label[order], v[order]
        box = xywh2xyxy(x[anchor, :4])
        keep = _greedy(box, iou, classes=None if agnostic else label, max_keep=K)
        n = len(keep)
        num[b, 0] = n
        boxes[b, :n], scores[b, :n], classes[b, :n], indices[b, :n] = box[keep], v[keep], label[keep], anchor[keep]
    return num, boxes, scores, classes, indices


def efficient_nms_reference(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, iou_threshold: float,
                            max_output_boxes: int, background_class: int = -1, score_activation: bool = False,
                            box_coding: int = 0, class_agnostic: bool = False,
                            max_candidates: int = EFFICIENT_NMS_CANDIDATES):
    """CPU reference of TensorRT's EfficientNMS_TRT plugin (standard mode, no anchors input).

    Inputs: ``boxes`` [B,N,4] (one box per anchor, shared by all classes) or [B,N,C,4] (one per class);
    ``scores`` [B,N,C]. Attributes, as the plugin documents them:

    * ``score_threshold``: candidates are the (anchor, class) pairs with score >= threshold.
    * ``iou_threshold``: a candidate is dropped when its IoU with an already kept, higher-scoring box
      (of the same class unless ``class_agnostic``) is >= threshold.
    * ``max_output_boxes``: K, detections per image; outputs are padded to K with zeros.
    * ``background_class``: this class id is never a candidate (-1: none).
    * ``score_activation``: scores are logits; the threshold is applied as logit(threshold) and sigmoid
      is applied to the kept scores only.
    * ``box_coding``: 0 = corners (x1,y1,x2,y2), 1 = center-size (cx,cy,w,h); outputs are always corners.
    * ``class_agnostic``: boxes of different classes suppress each other.

    Internals mirrored: candidates are sorted by score (descending) and only the best ``max_candidates``
    (5000 on desktop GPUs, 2000 on Jetson TX1/TX2; the README's 4096 is outdated) enter NMS. Multi-label:
    one anchor can be kept once per class whose score passes. On exact score ties the plugin's order
    depends on GPU atomics; here ties keep (anchor, class) order.

    Returns num_dets int32 [B,1], det_boxes float32 [B,K,4], det_scores float32 [B,K], det_classes int32 [B,K].
    """
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if scores.ndim != 3 or boxes.ndim not in (3, 4) or boxes.shape[:2] != scores.shape[:2] or boxes.shape[-1] != 4:
        raise ValueError(f"expected boxes [B,N,4] or [B,N,C,4] and scores [B,N,C], got {boxes.shape}, {scores.shape}")
    if boxes.ndim == 4 and boxes.shape[2] != scores.shape[2]:
        raise ValueError(f"per-class boxes {boxes.shape} do not match {scores.shape[2]} classes")
    if box_coding not in (0, 1):
        raise ValueError(f"box_coding must be 0 (corners) or 1 (center-size), got {box_coding}")
    if max_output_boxes < 1:
        raise ValueError(f"max_output_boxes must be >= 1, got {max_output_boxes}")
    B, N, C = scores.shape
    K = int(max_output_boxes)
    if score_activation:
        # the plugin compares logits with logit(threshold) (and -32768 for a threshold <= 0)
        thr = np.float32(-(1 << 15) if score_threshold <= 0 else np.log(score_threshold / (1 - score_threshold)))
    else:
        thr = np.float32(score_threshold)
    num = np.zeros((B, 1), np.int32)
    out_boxes = np.zeros((B, K, 4), np.float32)
    out_scores = np.zeros((B, K), np.float32)
    out_classes = np.zeros((B, K), np.int32)
    for b in range(B):
        flat = scores[b].reshape(-1)
        cand = np.flatnonzero(flat >= thr)
        if background_class >= 0:
            cand = cand[cand % C != background_class]
        cand = cand[np.argsort(-flat[cand], kind="stable")][:max_candidates]
        anchor, cls = cand // C, cand % C
        box = boxes[b, anchor] if boxes.ndim == 3 else boxes[b, anchor, cls]
        if box_coding == 1:
            box = _center_size_to_corners(box)
        keep = _greedy(box, iou_threshold, classes=None if class_agnostic else cls, inclusive=True, max_keep=K)
        s = flat[cand[keep]]
        if score_activation:
            s = (1 / (1 + np.exp(-s.astype(np.float64)))).astype(np.float32)
        n = len(keep)
        num[b, 0] = n
        out_boxes[b, :n] = box[keep]
        out_scores[b, :n] = s
        out_classes[b, :n] = cls[keep]
    return num, out_boxes, out_scores, out_classes


def _center_size_to_corners(box: np.ndarray) -> np.ndarray:
    half = box[:, 2:] * np.float32(0.5)
    return np.concatenate([box[:, :2] - half, box[:, :2] + half], 1)
