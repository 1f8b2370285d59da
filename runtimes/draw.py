"""Draw detections on an image: boxes, class names and scores, one fixed colour per class.

People look at boxes before they trust numbers; colours depend only on the class id, so the same class
has the same colour in every image and every run.
"""
from __future__ import annotations

import cv2
import numpy as np

from .base import Detections

# 20 well-separated colours (RGB hex); class k uses PALETTE[k % 20].
_PALETTE_HEX = ("e6194b", "3cb44b", "4363d8", "f58231", "911eb4", "42d4f4", "f032e6", "bfef45", "fabed4", "469990",
                "dcbeff", "9a6324", "fffac8", "800000", "aaffc3", "808000", "ffd8b1", "000075", "a9a9a9", "ffe119")


def class_color(class_id: int) -> tuple[int, int, int]:
    """BGR colour of a class (OpenCV order)."""
    h = _PALETTE_HEX[int(class_id) % len(_PALETTE_HEX)]
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return b, g, r


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    b, g, r = bg
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _place_labels(dets: Detections, names: list[str], w: int, font, font_scale: float, weight: int) -> dict:
    """Where each label goes: above its box when it fits, else just inside the top edge; never off the right
    edge. A label that would cover one already placed (two classes on one box with --multi-label, or boxes
    sharing a corner) moves down one label height at a time while it stays within its box, so both stay
    readable. Placed in descending score order: the most confident label keeps the preferred spot."""
    placed: list[tuple[int, int, int, int]] = []
    out = {}
    for i in np.argsort(-np.asarray(dets.scores), kind="stable"):
        x1, y1, _, y2 = (int(round(float(v))) for v in dets.boxes[i])
        cls = int(dets.classes[i])
        name = names[cls] if 0 <= cls < len(names) else str(cls)
        label = f"{name} {float(dets.scores[i]):.2f}"
        (tw, th), base = cv2.getTextSize(label, font, font_scale, weight)
        lh = th + base + 2
        left = min(max(0, x1), max(0, w - tw - 2))
        top = first = y1 - lh if y1 - lh >= 0 else y1
        while any(left < r[2] and r[0] < left + tw + 2 and top < r[3] and r[1] < top + lh for r in placed):
            top = max(top + lh, y1)
            if top + lh > max(y2, first + lh):  # no free slot inside the box: keep the preferred spot
                top = first
                break
        placed.append((left, top, left + tw + 2, top + lh))
        out[int(i)] = (label, (left, top, tw, th, base))
    return out


def draw_detections(image_bgr: np.ndarray, dets: Detections, names: list[str]) -> np.ndarray:
    """A copy of the image with each detection drawn; boxes in the image's own pixels."""
    out = np.ascontiguousarray(image_bgr.copy())
    if out.ndim == 2:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
    h, w = out.shape[:2]
    if dets.masks is not None and dets.masks.dtype == bool and dets.masks.shape[1:] == (h, w):
        from .masks import draw_masks  # instance masks under the boxes, in the class colour

        out = draw_masks(out, dets.masks, [class_color(int(c)) for c in dets.classes])
    thickness = max(1, round((h + w) / 600))
    font_scale = max(0.35, thickness / 3)
    font = cv2.FONT_HERSHEY_SIMPLEX
    labels = _place_labels(dets, names, w, font, font_scale, max(1, thickness // 2))
    # Draw low scores first so the most confident boxes and labels end up on top.
    for i in np.argsort(dets.scores, kind="stable"):
        x1, y1, x2, y2 = (int(round(float(v))) for v in dets.boxes[i])
        cls = int(dets.classes[i])
        color = class_color(cls)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness, cv2.LINE_8)  # crisp edges
        label, (left, top, tw, th, base) = labels[int(i)]
        cv2.rectangle(out, (left, top), (left + tw + 2, top + th + base + 2), color, -1)
        cv2.putText(out, label, (left + 1, top + th + 1), font, font_scale, _text_color(color),
                    max(1, thickness // 2), cv2.LINE_AA)
        if dets.keypoints is not None:  # pose: skeleton (COCO limbs for 17 keypoints) and visible points
            from .keypoints import draw_keypoints

            draw_keypoints(out, dets.keypoints[i], thickness)
    return out
