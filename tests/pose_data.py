"""A generated, labelled keypoint set for tests: drawn articulated stick figures with the 17 COCO keypoints.

No trained pose weights exist here, so this set tests the *evaluation* (AP 1.0 when predictions equal the
labels, lower with jitter, equal to pycocotools) and the harness/CLI plumbing, not a model's accuracy.
Each image (PNG, lossless) holds 1-3 figures: a torso, a head (nose, eyes, ears), arms and legs whose joint
angles are drawn at random; joints outside the image are unlabelled (0, 0, 0). Written twice:

* ``<root>/annotations/person_keypoints.json``: COCO person-keypoints (category 1 'person', pixels,
  v = 2 visible, 1 labelled but occluded);
* ``<root>/images/*.png`` + ``<root>/labels/*.txt``: YOLO-pose rows ``0 cx cy w h x1 y1 v1 ...`` (normalised).
Deterministic for a given seed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from runtimes.keypoints import COCO_KEYPOINTS, COCO_SKELETON

NKPT = len(COCO_KEYPOINTS)


@dataclass
class PoseSet:
    root: Path
    coco_json: Path
    images_dir: Path
    gt: dict  # the COCO dict written to coco_json


def _figure(rng: np.random.Generator, cx: float, cy: float, s: float) -> np.ndarray:
    """[17, 2] joint positions of one figure of height ~s centred at (cx, cy) (y down)."""
    tilt = rng.uniform(-0.25, 0.25)
    up = np.array([math.sin(tilt), -math.cos(tilt)])
    right = np.array([-up[1], up[0]])
    hip_c = np.array([cx, cy + 0.1 * s])
    sh_c = hip_c + 0.33 * s * up
    nose = sh_c + 0.14 * s * up
    k = np.zeros((NKPT, 2))
    k[0] = nose
    k[1], k[2] = nose + 0.03 * s * (up + right), nose + 0.03 * s * (up - right)  # left/right eye
    k[3], k[4] = nose + 0.06 * s * right, nose - 0.06 * s * right  # ears
    k[5], k[6] = sh_c + 0.12 * s * right, sh_c - 0.12 * s * right  # shoulders (person's left = +right)
    k[11], k[12] = hip_c + 0.08 * s * right, hip_c - 0.08 * s * right  # hips

    def limb(start: np.ndarray, length: float, angle: float) -> np.ndarray:  # angle 0 = straight down
        return start + length * np.array([math.sin(angle), math.cos(angle)])

    for side, (sh, el, wr) in ((1, (5, 7, 9)), (-1, (6, 8, 10))):
        a1 = side * rng.uniform(0.2, 2.2)
        k[el] = limb(k[sh], 0.17 * s, a1 + tilt)
        k[wr] = limb(k[el], 0.15 * s, a1 + side * rng.uniform(-0.3, 1.2) + tilt)
    for side, (hp, kn, an) in ((1, (11, 13, 15)), (-1, (12, 14, 16))):
        a1 = side * rng.uniform(0.0, 0.5)
        k[kn] = limb(k[hp], 0.22 * s, a1 + tilt)
        k[an] = limb(k[kn], 0.22 * s, a1 + rng.uniform(-0.35, 0.35) + tilt)
    return k


def _draw(img: np.ndarray, k: np.ndarray, s: float, color: tuple[int, int, int]) -> None:
    t = max(2, int(round(s / 28)))
    pts = [tuple(int(round(v)) for v in p) for p in k]
    for a, b in COCO_SKELETON:
        if max(a, b) <= 4 and {a, b} != {0, 1} and {a, b} != {0, 2}:
            continue  # ears/eyes are drawn as the head circle
        cv2.line(img, pts[a], pts[b], color, t, cv2.LINE_AA)
    cv2.line(img, pts[5], pts[11], color, t, cv2.LINE_AA)
    cv2.line(img, pts[6], pts[12], color, t, cv2.LINE_AA)
    cv2.circle(img, pts[0], max(3, int(round(0.07 * s))), color, t, cv2.LINE_AA)
    for p in pts[5:]:
        cv2.circle(img, p, t + 1, (255 - color[0], 255 - color[1], 255 - color[2]), -1, cv2.LINE_AA)


def make_pose_set(root: str | Path, n_images: int = 6, size: tuple[int, int] = (320, 320), seed: int = 0,
                  max_figures: int = 3) -> PoseSet:
    """Write the set under ``root`` (images/, labels/, annotations/person_keypoints.json)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    images, annotations = [], []
    for i in range(n_images):
        base = rng.integers(40, 200, size=3)
        img = np.empty((h, w, 3), np.uint8)
        img[:] = base.astype(np.uint8)
        img = cv2.add(img, rng.integers(0, 25, size=(h, w, 3), dtype=np.uint8))
        lines = []
        for _ in range(int(rng.integers(1, max_figures + 1))):
            s = float(rng.uniform(0.35, 0.8) * h)
            cx, cy = float(rng.uniform(0.15, 0.85) * w), float(rng.uniform(0.35, 0.65) * h)
            k = _figure(rng, cx, cy, s)
            color = tuple(int(c) for c in rng.integers(0, 256, size=3))
            _draw(img, k, s, color)
            inside = (k[:, 0] >= 0) & (k[:, 0] < w) & (k[:, 1] >= 0) & (k[:, 1] < h)
            if inside.sum() < 5:
                continue
            v = np.where(inside, np.where(rng.random(NKPT) < 0.1, 1, 2), 0)
            pad = 0.05 * s
            x1, y1 = max(0.0, k[inside, 0].min() - pad), max(0.0, k[inside, 1].min() - 0.08 * s)
            x2, y2 = min(float(w), k[inside, 0].max() + pad), min(float(h), k[inside, 1].max() + pad)
            flat = []
            for (x, y), vis in zip(k, v):
                flat += [round(float(x), 2), round(float(y), 2), int(vis)] if vis else [0, 0, 0]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0,
                                "keypoints": flat, "num_keypoints": int((v > 0).sum())})
            row = [0, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
            for (x, y), vis in zip(k, v):
                row += [x / w, y / h, int(vis)] if vis else [0, 0, 0]
            lines.append(" ".join(f"{r:.6f}" if isinstance(r, float) else str(r) for r in row))
        name = f"{i + 1:06d}.png"
        cv2.imwrite(str(root / "images" / name), img)
        (root / "labels" / f"{i + 1:06d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    gt = {"info": {"description": "generated stick figures (tests/pose_data.py)"}, "images": images,
          "annotations": annotations,
          "categories": [{"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_KEYPOINTS),
                          "skeleton": [[a + 1, b + 1] for a, b in COCO_SKELETON]}]}
    coco_json = root / "annotations" / "person_keypoints.json"
    coco_json.write_text(json.dumps(gt))
    return PoseSet(root=root, coco_json=coco_json, images_dir=root / "images", gt=gt)


if __name__ == "__main__":  # python tests/pose_data.py OUT_DIR [N_IMAGES]: a labelled keypoint set to try things on
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tests/pose_data.py OUT_DIR [N_IMAGES]")
    made = make_pose_set(sys.argv[1], n_images=int(sys.argv[2]) if len(sys.argv) == 3 else 6)
    print(f"wrote {len(made.gt['images'])} images, {len(made.gt['annotations'])} figures: {made.coco_json}, "
          f"{made.images_dir} (+ labels/)")
