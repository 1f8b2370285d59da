"""Pose on the runtime side: COCO keypoint constants, the official keypoint NMS in numpy, post-processing,
mapping keypoints back to the image, drawing the skeleton.

numpy/OpenCV only (no torch/onnx import, no exporter import): every runtime can use it.

Keypoint rows are (x, y, visibility) with x, y in network-input pixels until ``scale_keypoints`` maps them
to the original image (the letterbox inverse, like boxes). ``non_max_suppression_kpt`` is the official
pose-branch ``non_max_suppression(kpt_label=True)``: candidates obj > conf, score = obj * cls with *no*
single-class shortcut (unlike the detection NMS), best class, class offset 4096 px, greedy NMS (IoU > iou
suppresses), keypoints copied from the kept rows.
"""
from __future__ import annotations

import numpy as np

from .contract import KPT_OUTPUT, NMS_INDICES, NMS_OUTPUTS, RAW_OUTPUT, ModelInfo
from .nms_reference import MAX_NMS, MAX_WH, _greedy, xywh2xyxy

# COCO person keypoints (the category's own "keypoints" and "skeleton" fields; skeleton 0-based here)
COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle")
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                 (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
# per-keypoint OKS constants of COCO (pycocotools' defaults for 17 keypoints)
COCO_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
               0.087, 0.087, 0.089, 0.089)
VISIBLE = 0.5  # a keypoint is drawn / called visible when its visibility score is >= this (official plotting)


def non_max_suppression_kpt(pred: np.ndarray, nc: int, nkpt: int, conf: float = 0.25, iou: float = 0.45,
                            max_det: int = 300, agnostic: bool = False,
                            multi_label: bool = False) -> list[np.ndarray]:
    """Official keypoint NMS on raw pose predictions [B,N,5+nc+3*nkpt].

    Returns per image float32 [n, 6+3*nkpt]: x1, y1, x2, y2, score, class, then the kept row's keypoints
    (official row layout), score descending. ``multi_label`` (nc > 1 only) keeps a box once per class above
    ``conf``, as the evaluation protocol does for detection.
    """
    pred = np.asarray(pred, np.float32)
    width = 5 + nc + 3 * nkpt
    if pred.ndim != 3 or pred.shape[-1] != width:
        raise ValueError(f"expected raw pose predictions [B,N,{width}] (5 + {nc} classes + 3 x {nkpt} keypoints), "
                         f"got shape {pred.shape}")
    thr = np.float32(conf)
    out = []
    for x in pred:
        x = x[x[:, 4] > thr]
        scores = x[:, 5:5 + nc] * x[:, 4:5]
        box = xywh2xyxy(x[:, :4])
        kpts = x[:, 5 + nc:]
        if multi_label and nc > 1:
            i, j = np.nonzero(scores > thr)
            rows, score, cls = i, scores[i, j], j
        else:
            j = scores.argmax(1) if len(x) else np.zeros(0, np.int64)
            best = scores[np.arange(len(x)), j]
            rows = np.flatnonzero(best > thr)
            score, cls = best[rows], j[rows]
        order = np.argsort(-score, kind="stable")[:MAX_NMS]
        rows, score, cls = rows[order], score[order], cls[order].astype(np.float32)
        offset = cls[:, None] * np.float32(0 if agnostic else MAX_WH)
        keep = _greedy(box[rows] + offset, iou, max_keep=max_det)
        r = rows[keep]
        out.append(np.concatenate([box[r], score[keep, None], cls[keep, None], kpts[r]], 1).astype(np.float32))
    return out


def decode_pose(outputs: dict[str, np.ndarray], info: ModelInfo, config) -> list[tuple[np.ndarray, ...]]:
    """Contract outputs of a pose artifact -> per image (boxes, scores, classes, keypoints [n,nkpt,3]) in input
    pixels: the in-graph ``det_kpts`` when there is an NMS tail, else the official keypoint NMS on ``output``.
    Arrays, not Detections: ``Detector.postprocess`` builds those (no runtimes.base <-> keypoints import circle)."""
    nkpt = int(info.nkpt)
    if all(k in outputs for k in NMS_OUTPUTS):
        if KPT_OUTPUT not in outputs:
            raise ValueError(f"pose artifact with an NMS tail but no '{KPT_OUTPUT}' output")
        num, boxes, scores, classes = (outputs[k] for k in NMS_OUTPUTS)
        kpts = outputs[KPT_OUTPUT]
        result = []
        for i in range(len(num)):
            n = int(num[i].reshape(-1)[0])
            result.append((boxes[i, :n].astype(np.float32), scores[i, :n].astype(np.float32),
                           classes[i, :n].astype(np.int32), kpts[i, :n].astype(np.float32).reshape(n, nkpt, 3)))
        return result
    dets = non_max_suppression_kpt(outputs[RAW_OUTPUT], info.nc, nkpt, conf=config.conf, iou=config.iou,
                                   max_det=config.max_det, agnostic=config.agnostic,
                                   multi_label=config.multi_label)
    return [(d[:, :4].copy(), d[:, 4].copy(), d[:, 5].astype(np.int32), d[:, 6:].reshape(len(d), nkpt, 3).copy())
            for d in dets]


def kept_indices(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """det_indices of an NMS-tail artifact (row of each kept detection in the raw output), if it has them."""
    return outputs.get(NMS_INDICES)


def scale_keypoints(kpts: np.ndarray, lb) -> np.ndarray:
    """Keypoints [n,nkpt,3] in network-input pixels -> original image pixels (letterbox inverse, clipped to
    the image like boxes); visibility unchanged."""
    out = np.array(kpts, dtype=np.float32, copy=True)
    out[..., 0] = ((out[..., 0] - lb.pad[0]) / lb.ratio).clip(0, lb.orig_shape[1])
    out[..., 1] = ((out[..., 1] - lb.pad[1]) / lb.ratio).clip(0, lb.orig_shape[0])
    return out


def keypoints_to_list(kpts: np.ndarray) -> list[list[float]]:
    """One detection's keypoints for detections.json: [[x, y, visibility], ...] (image pixels)."""
    return [[round(float(x), 2), round(float(y), 2), round(float(v), 4)] for x, y, v in kpts]


def skeleton_for(nkpt: int) -> tuple[tuple[int, int], ...]:
    """The COCO skeleton for 17 keypoints; no limbs for other layouts (points only)."""
    return COCO_SKELETON if nkpt == len(COCO_KEYPOINTS) else ()


# limb colours by body part (BGR): face, arms, torso, legs
_LIMB_BGR = {"face": (255, 128, 0), "arm": (0, 200, 255), "torso": (255, 51, 255), "leg": (0, 255, 0)}


def _limb_part(a: int, b: int) -> str:
    if max(a, b) <= 4:
        return "face"
    if {a, b} <= {5, 6, 7, 8, 9, 10} and {a, b} != {5, 6}:
        return "arm"
    if min(a, b) >= 11 and {a, b} != {11, 12}:
        return "leg"
    return "torso"


def draw_keypoints(image_bgr: np.ndarray, kpts: np.ndarray, thickness: int = 2) -> None:
    """Draw one detection's skeleton and points in place (image pixels); points below VISIBLE are skipped."""
    import cv2

    h, w = image_bgr.shape[:2]
    pts = [(int(round(float(x))), int(round(float(y))), float(v)) for x, y, v in kpts]
    for a, b in skeleton_for(len(pts)):
        (xa, ya, va), (xb, yb, vb) = pts[a], pts[b]
        if va >= VISIBLE and vb >= VISIBLE:
            cv2.line(image_bgr, (xa, ya), (xb, yb), _LIMB_BGR[_limb_part(a, b)], thickness, cv2.LINE_AA)
    radius = max(2, thickness + 1)
    for x, y, v in pts:
        if v >= VISIBLE and 0 <= x < w and 0 <= y < h:
            cv2.circle(image_bgr, (x, y), radius, (0, 0, 255), -1, cv2.LINE_AA)
