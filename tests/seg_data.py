"""Test helpers for instance segmentation: the official seg fixtures (tests/data/seg) and generated polygons.

Fixture npz (trimmed copies of ../shared/fixtures/seg, made by the official u7 ``seg/`` code): ``image_u8``
[1,3,H,W], ``out_fused`` [1,N,5+nc+nm] and ``proto_fused`` [1,nm,H/4,W/4] (official fused eval outputs),
``nms`` [n,6+nm] (official ``non_max_suppression`` as ``segment/predict.py`` calls it), ``masks`` uint8
[n,H,W] (official ``process_mask(..., upsample=True)``), ``names`` (JSON).
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

SEG = Path(__file__).parent / "data" / "seg"
SEG_NAMES = sorted(p.stem for p in SEG.glob("*.pt"))


def seg_reference(name: str) -> dict:
    with np.load(SEG / f"{name}.npz") as d:
        ref = {k: d[k] for k in d.files}
    ref["names"] = json.loads(str(ref["names"]))
    ref["input"] = ref["image_u8"].astype(np.float32) / np.float32(255)
    return ref


def proto_masks(protos: np.ndarray, coefs: np.ndarray, boxes: np.ndarray, imgsz: tuple[int, int]) -> np.ndarray:
    """Independent numpy version of the official ``process_mask`` before upsampling: soft [n,Hp,Wp]."""
    nm, hp, wp = protos.shape
    h, w = imgsz
    m = 1.0 / (1.0 + np.exp(-(coefs.astype(np.float64) @ protos.reshape(nm, -1).astype(np.float64))))
    m = m.reshape(-1, hp, wp)
    b = boxes.astype(np.float64) * np.array([wp / w, hp / h, wp / w, hp / h])
    cols, rows = np.arange(wp)[None, None, :], np.arange(hp)[None, :, None]
    inside = ((cols >= b[:, 0, None, None]) & (cols < b[:, 2, None, None])
              & (rows >= b[:, 1, None, None]) & (rows < b[:, 3, None, None]))
    return (m * inside).astype(np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-instance IoU of two boolean stacks [n,...]; 1.0 where both are empty."""
    a, b = a.reshape(len(a), -1).astype(bool), b.reshape(len(b), -1).astype(bool)
    inter, union = (a & b).sum(1), (a | b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# --- generated polygon dataset --------------------------------------------------------------------------

def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float, kind: int) -> np.ndarray:
    """A closed polygon [k,2]: kind 0 a regular-ish convex blob, 1 a star (concave), 2 a rectangle."""
    if kind == 2:
        w, h = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0)
        return np.array([[cx - w, cy - h], [cx + w, cy - h], [cx + w, cy + h], [cx - w, cy + h]], np.float64)
    k = 12 if kind == 0 else 10
    ang = np.sort(rng.uniform(0, 2 * np.pi, k)) if kind == 0 else np.linspace(0, 2 * np.pi, k, endpoint=False)
    rad = r * (rng.uniform(0.75, 1.0, k) if kind == 0 else np.where(np.arange(k) % 2 == 0, 1.0, 0.45))
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)


def make_polygon_dataset(root: Path, n_images: int = 6, size: tuple[int, int] = (160, 224), seed: int = 0,
                         names: tuple[str, ...] = ("blob", "star", "box")) -> dict:
    """Images with filled polygons, labelled three ways: COCO polygons json, COCO RLE json, YOLO-seg txt.

    Returns {"images": dir, "coco_poly": path, "coco_rle": path, "labels": dir, "names": [...]}. Objects do
    not overlap (drawn in separate cells), so every polygon is exactly the pixels its label describes.
    """
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    h, w = size
    img_dir, lbl_dir = root / "images" / "val", root / "labels" / "val"
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    images, ann_poly, ann_rle = [], [], []
    cells = [(r, c) for r in range(2) for c in range(3)]
    for i in range(n_images):
        image = np.full((h, w, 3), 60, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
        lines = []
        for r, c in rng.permutation(cells)[: rng.integers(2, 5)]:
            cw, ch = w / 3, h / 2
            cx, cy = (c + 0.5) * cw + rng.uniform(-4, 4), (r + 0.5) * ch + rng.uniform(-4, 4)
            cls = int(rng.integers(0, len(names)))
            poly = _polygon(rng, cx, cy, min(cw, ch) * rng.uniform(0.3, 0.45), cls)
            color = tuple(int(v) for v in rng.integers(120, 255, 3))
            cv2.fillPoly(image, [np.round(poly).astype(np.int32)], color)
            # the drawn pixels are the truth: their mask gives the RLE and the polygon (same rasterization)
            m = np.zeros((h, w), np.uint8)
            cv2.fillPoly(m, [np.round(poly).astype(np.int32)], 1)
            x, y, bw, bh = cv2.boundingRect(m)
            pts = np.round(poly).astype(np.float64)
            ann_id = len(ann_poly) + 1
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            base = {"id": ann_id, "image_id": i + 1, "category_id": cls + 1, "bbox": [x, y, bw, bh],
                    "area": float(m.sum()), "iscrowd": 0}
            ann_poly.append(base | {"segmentation": [pts.reshape(-1).tolist()]})
            ann_rle.append(base | {"segmentation": rle})
            norm = (pts / np.array([w, h])).reshape(-1)
            lines.append(f"{cls} " + " ".join(f"{v:.6f}" for v in norm))
        name = f"{i + 1:06d}.png"
        cv2.imwrite(str(img_dir / name), image)
        (lbl_dir / f"{i + 1:06d}.txt").write_text("\n".join(lines) + "\n")
        images.append({"id": i + 1, "file_name": f"val/{name}", "width": w, "height": h})  # under images/
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
    out = {"images": img_dir, "labels": lbl_dir, "names": list(names)}
    for key, anns in (("coco_poly", ann_poly), ("coco_rle", ann_rle)):
        path = root / f"instances_{key}.json"
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        out[key] = path
    return out


if __name__ == "__main__":  # python tests/seg_data.py OUT [N]: the generated polygon set, for the README example
    import sys

    made = make_polygon_dataset(Path(sys.argv[1]), n_images=int(sys.argv[2]) if len(sys.argv) > 2 else 6)
    print(f"{made['images']} (+ YOLO-seg labels in {made['labels']}), {made['coco_poly']}, {made['coco_rle']}")
