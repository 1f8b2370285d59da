"""Instance-segmentation checks: mask mAP (COCO ``segm``) and mask parity with the PyTorch reference.

* **Labels**: a COCO json whose annotations carry ``segmentation`` (polygons or RLE), or an image folder with
  YOLO-seg txt labels (``cls x1 y1 x2 y2 ...``, normalised polygon vertices, as the official u7 seg trainer
  reads them; plain ``cls cx cy w h`` lines have no mask and are refused here). A polygon's box is its
  vertices' min/max (the official ``segments2boxes``).
* **Protocol**: the official seg ``val.py``: conf 0.001, IoU 0.6, multi-label, 300 detections; masks by
  ``process_mask`` (crop at prototype resolution, then upsample) mapped back to the image
  (runtimes/masks.py), encoded as RLE. Scored by faster-coco-eval; pycocotools is the reference evaluator
  (tests check they agree).
* **Parity**: reference and artifact detections on the same images are matched (same class, box IoU >= 0.9,
  greedy by score); the masks of matched pairs are compared by IoU in image pixels.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtimes.base import DetectConfig, Detections, Detector
from runtimes.masks import rle_encode
from runtimes.preprocess import read_image

from ..errors import UserError
from ..evaluation.dataset import Dataset, DatasetError, ImageRecord, label_lines, label_path, load_dataset
from ..evaluation.evaluate import EVALUATORS, run_cocoeval

SEG_EVAL_CONFIG = DetectConfig(conf=0.001, iou=0.6, max_det=300, multi_label=True, agnostic=False)
MATCH_IOU = 0.9


@dataclass
class MaskMapResult:
    """Box and mask mAP of one artifact over one labelled set, from the same detections."""

    mask_map50_95: float
    mask_map50: float
    box_map50_95: float
    box_map50: float
    n_images: int
    n_labels: int
    n_detections: int
    evaluator: str = "faster-coco-eval"
    mask_stats: list[float] = field(default_factory=list)
    seconds: float = 0.0
    protocol: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MaskParity:
    """Masks of an artifact vs the PyTorch reference on the same images (IoU of matched detections)."""

    n_images: int
    n_reference: int
    matched: int
    mean_iou: float
    min_iou: float
    share_iou_099: float  # matched pairs with mask IoU >= 0.99

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- labels
def load_segment_dataset(path: str | Path) -> Dataset:
    """A labelled set with instance masks: COCO json (segmentation) or images + YOLO-seg polygon txt."""
    path = Path(path)
    is_json = path.suffix.lower() == ".json" or (path.is_dir() and any((path / "annotations").glob("*.json")))
    if is_json:
        ds = load_dataset(path)
        missing = [a.get("id") for a in ds.gt["annotations"] if not a.get("segmentation")]
        if missing:
            raise DatasetError(f"{ds.source}: {len(missing)} annotation(s) have no 'segmentation' (e.g. id "
                               f"{missing[0]}); mask mAP needs polygon or RLE masks")
        return ds
    if not path.is_dir():
        raise DatasetError(f"dataset {path}: expected a COCO .json file or a folder of images with YOLO-seg labels")
    return _load_yolo_seg(path)


def _load_yolo_seg(folder: Path) -> Dataset:
    from ..evaluation.dataset import _image_shape, _images_in

    files = _images_in(folder)
    labels = [label_path(f) for f in files]
    if not any(p.is_file() for p in labels):
        raise DatasetError(f"no YOLO-seg labels for the images in {folder}: expected e.g. {labels[0]}")
    numeric = all(f.stem.isdigit() for f in files) and len({int(f.stem) for f in files}) == len(files)
    images, annotations, seen = [], [], set()
    for k, (img, lbl) in enumerate(zip(files, labels)):
        h, w = _image_shape(img)
        image_id = int(img.stem) if numeric else k + 1
        images.append(ImageRecord(image_id, img, int(w), int(h)))
        for cls, poly in _read_polygons(lbl) if lbl.is_file() else []:
            pts = poly.reshape(-1, 2) * np.array([w, h])
            x1, y1 = pts.min(0)
            x2, y2 = pts.max(0)
            seen.add(cls)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                "area": float(_polygon_area(pts)), "iscrowd": 0,
                                "segmentation": [pts.reshape(-1).astype(float).tolist()]})
    nc = max(seen) + 1 if seen else 1
    gt = {"info": {}, "images": [{"id": r.id, "file_name": r.path.name, "width": r.width, "height": r.height}
                                 for r in images],
          "annotations": annotations, "categories": [{"id": i, "name": str(i)} for i in range(nc)]}
    return Dataset(source=folder, kind="yolo", images=images, category_ids=list(range(nc)), gt=gt,
                   names=[str(i) for i in range(nc)])


def _read_polygons(path: Path) -> list[tuple[int, np.ndarray]]:
    rows = []
    for n, parts, line in label_lines(path):
        try:
            cls, values = int(parts[0]), np.array([float(v) for v in parts[1:]], np.float64)
        except ValueError:
            raise DatasetError(f"{path}:{n}: expected 'class x1 y1 x2 y2 ...' (numbers), got {line.strip()[:80]!r}") from None
        if len(values) < 6 or len(values) % 2 or cls < 0 or not np.all((values >= -0.01) & (values <= 1.01)):
            raise DatasetError(f"{path}:{n}: a YOLO-seg label is 'class x1 y1 x2 y2 x3 y3 ...' (>= 3 vertices, "
                               f"normalised to 0..1); got {len(values)} values{' (a box label, no mask)' if len(values) == 4 else ''}")
        rows.append((cls, values))
    return rows


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# ---------------------------------------------------------------------------------------------- mask mAP
def detections_to_coco_segm(det: Detections, image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's detections (with image-sized boolean masks) as COCO results with bbox and RLE."""
    if det.masks is None:
        raise UserError("mask mAP needs a segmentation artifact (its detections carry no masks)")
    out = []
    for (x1, y1, x2, y2), s, c, m in zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(), det.masks):
        if 0 <= c < len(category_ids):
            out.append({"image_id": image_id, "category_id": category_ids[c], "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(s), "segmentation": rle_encode(m)})
    return out


def score_segm(gt: dict, preds: list[dict], iou_type: str = "segm",
               evaluator: str = "faster-coco-eval") -> np.ndarray:
    """COCO evaluation of ``iou_type`` ('segm' or 'bbox') -> the 12 summary numbers; no predictions -> zeros."""
    if evaluator not in EVALUATORS:
        raise UserError(f"unknown evaluator {evaluator!r}; choose from {', '.join(EVALUATORS)}")
    if not preds:
        return np.zeros(12)
    preds = [dict(p, bbox=list(p["bbox"]), segmentation=dict(p["segmentation"])) for p in preds]
    if evaluator == "pycocotools":  # its RLE decoder wants bytes
        for p in preds:
            p["segmentation"]["counts"] = p["segmentation"]["counts"].encode("ascii")
    return np.asarray(run_cocoeval(gt, preds, iou_type, evaluator).stats[:12], dtype=np.float64)


def evaluate_mask_map(detector: Detector, dataset: Dataset, batch_size: int = 8, config: DetectConfig | None = None,
                      evaluator: str = "faster-coco-eval", progress: bool = False) -> MaskMapResult:
    """Run a seg artifact over a labelled set once; score its boxes and its masks (COCO bbox and segm)."""
    from tqdm import tqdm

    config = config or SEG_EVAL_CONFIG
    if detector.info.task != "segment":
        raise UserError(f"mask mAP needs a segmentation model; this artifact's task is '{detector.info.task}'")
    dataset = dataset.for_model(detector.info.names)
    t0 = time.perf_counter()
    preds: list[dict] = []
    records = dataset.images
    with tqdm(total=len(records), desc="mask mAP", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            for rec, det in zip(chunk, detector.detect([read_image(r.path) for r in chunk], config)):
                preds += detections_to_coco_segm(det, rec.id, dataset.category_ids)
            bar.update(len(chunk))
    mask = score_segm(dataset.gt, preds, "segm", evaluator)
    box = score_segm(dataset.gt, preds, "bbox", evaluator)
    return MaskMapResult(mask_map50_95=float(mask[0]), mask_map50=float(mask[1]), box_map50_95=float(box[0]),
                         box_map50=float(box[1]), n_images=len(dataset), n_labels=dataset.n_labels,
                         n_detections=len(preds), evaluator=evaluator,
                         mask_stats=[round(float(s), 6) for s in mask], seconds=round(time.perf_counter() - t0, 2),
                         protocol=asdict(config) | {"imgsz": list(detector.info.imgsz)})


# ------------------------------------------------------------------------------------------- mask parity
def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), 2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), 1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def match_masks(ref: Detections, out: Detections) -> list[float]:
    """Mask IoU of each reference detection matched to an artifact detection (same class, box IoU >= 0.9 or
    every side within 1 px)."""
    if not len(ref) or not len(out):
        return []
    ious = _box_iou(ref.boxes, out.boxes)
    # boxes clipped to a zero-width sliver have IoU 0 with themselves: within 1 px on every side is a match too
    near = np.abs(ref.boxes[:, None, :] - out.boxes[None, :, :]).max(2) <= 1.0
    ious = np.where(near, np.maximum(ious, 1.0), ious)
    ious[ref.classes[:, None] != out.classes[None, :]] = 0
    used, result = set(), []
    for i in np.argsort(-ref.scores, kind="stable"):
        cand = ious[i].copy()
        cand[list(used)] = -1.0
        j = int(np.argmax(cand))
        if cand[j] < MATCH_IOU:
            continue
        used.add(j)
        a, b = ref.masks[i], out.masks[j]
        union = np.logical_or(a, b).sum()
        result.append(float(np.logical_and(a, b).sum() / union) if union else 1.0)
    return result


def mask_parity(ref: Detector, det: Detector, images: list[np.ndarray], config: DetectConfig | None = None) -> MaskParity:
    """Both detectors on the same images with the same NMS settings; IoU of the matched masks."""
    if det.info.nms != "none":  # an NMS tail has its own settings: give the reference the same ones
        p = det.info.nms_params or {}
        config = DetectConfig(conf=float(p.get("conf", 0.25)), iou=float(p.get("iou", 0.45)),
                              max_det=int(p.get("topk", 100)), multi_label=not p.get("best_class", False),
                              agnostic=bool(p.get("agnostic", False)))
    config = config or DetectConfig()
    ref_dets, out_dets = ref.detect(images, config), det.detect(images, config)
    ious = [v for r, o in zip(ref_dets, out_dets) for v in match_masks(r, o)]
    n_ref = sum(len(r) for r in ref_dets)
    return MaskParity(n_images=len(images), n_reference=n_ref, matched=len(ious),
                      mean_iou=round(float(np.mean(ious)), 6) if ious else 0.0,
                      min_iou=round(float(np.min(ious)), 6) if ious else 0.0,
                      share_iou_099=round(float(np.mean(np.asarray(ious) >= 0.99)), 6) if ious else 0.0)


def load_labels(path: str | Path) -> Dataset:
    """Box labels as evaluation/dataset.py reads them; an image folder whose txt labels are YOLO-seg polygons is
    read here instead (boxes from the polygons, masks kept), so a seg set serves box and mask mAP alike."""
    try:
        return load_dataset(path)
    except DatasetError as exc:
        if not Path(path).is_dir():
            raise
        try:
            return _load_yolo_seg(Path(path))
        except DatasetError:
            raise exc from None


def has_masks(dataset: Dataset) -> bool:
    anns = dataset.gt.get("annotations") or []
    return bool(anns) and all(a.get("segmentation") for a in anns)
