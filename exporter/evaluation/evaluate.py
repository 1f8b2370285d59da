"""COCO mAP of any artifact under one protocol: the official evaluator's (test.py) settings.

conf 0.001, IoU 0.65, multi-label NMS, at most 300 detections per image, the shared square letterbox
(runtimes.preprocess), boxes mapped back to original pixels, scored by faster-coco-eval (a C++
pycocotools-compatible COCOeval; pycocotools is accepted as the reference evaluator). Artifacts with NMS
inside the graph keep their own thresholds: the result says so (``protocol_note``), since a conf 0.25 /
top-100 tail cannot reach the full-protocol mAP.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from runtimes.base import DetectConfig, Detections, Detector
from runtimes.preprocess import read_image

from ..errors import UserError
from .dataset import Dataset

EVAL_CONFIG = DetectConfig(conf=0.001, iou=0.65, max_det=300, multi_label=True, agnostic=False)
EVALUATORS = ("faster-coco-eval", "pycocotools")


@dataclass
class MapResult:
    map50_95: float
    map50: float
    n_images: int
    n_labels: int
    seconds: float = 0.0
    evaluator: str = "faster-coco-eval"
    stats: list[float] = field(default_factory=list)  # the 12 COCO summary numbers
    per_class: dict[str, float] = field(default_factory=dict)  # mAP50-95 per class (classes with labels)
    n_detections: int = 0
    protocol: dict = field(default_factory=dict)
    protocol_note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_map(detector: Detector, dataset: Dataset, batch_size: int = 8, progress: bool = True,
                 imgsz: tuple[int, int] | None = None, evaluator: str = "faster-coco-eval",
                 desc: str = "mAP", config: DetectConfig | None = None) -> MapResult:
    """Run ``detector`` over ``dataset`` and score it; ``imgsz``: the size the run was asked for (checked).

    ``config``: NMS settings instead of the protocol's, only to score a raw-output model the way an NMS-tail
    artifact is scored (the harness compares such artifacts with PyTorch under their own NMS settings).
    """
    config = config or EVAL_CONFIG
    info = detector.info
    if imgsz is not None and tuple(imgsz) != tuple(info.imgsz):
        raise UserError(f"artifact input size {info.imgsz[0]}x{info.imgsz[1]} differs from the requested "
                        f"--img {imgsz[0]}x{imgsz[1]}; re-export at that size or change --img")
    dataset = dataset.for_model(info.names)
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    preds = _predict(detector, dataset, batch_size, progress, desc, config)
    stats, per_class = score_coco(dataset.gt, preds, evaluator=evaluator)
    names = {cid: dataset.names[i] for i, cid in enumerate(dataset.category_ids)}
    note = ""
    if info.nms != "none":
        p = info.nms_params or {}
        note = (f"NMS inside the graph ({info.nms}: conf {p.get('conf')}, iou {p.get('iou')}, "
                f"top-{p.get('topk')}) instead of the protocol's conf 0.001 / iou 0.65 / 300")
    return MapResult(map50_95=float(stats[0]), map50=float(stats[1]), n_images=len(dataset),
                     n_labels=dataset.n_labels, seconds=round(time.perf_counter() - t0, 2), evaluator=evaluator,
                     stats=[round(float(s), 6) for s in stats],
                     per_class={names.get(c, str(c)): round(v, 6) for c, v in per_class.items()},
                     n_detections=len(preds), protocol=asdict(config) | {"imgsz": list(info.imgsz)},
                     protocol_note=note)


def _predict(detector: Detector, dataset: Dataset, batch_size: int, progress: bool, desc: str,
             config: DetectConfig) -> list[dict]:
    from tqdm import tqdm

    preds: list[dict] = []
    records = dataset.images
    with tqdm(total=len(records), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            images = [read_image(r.path) for r in chunk]
            for rec, det in zip(chunk, detector.detect(images, config)):
                preds += detections_to_coco(det, rec.id, dataset.category_ids)
            bar.update(len(chunk))
    return preds


def detections_to_coco(det: Detections, image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's detections as COCO results ([x, y, w, h]); classes the dataset lacks are dropped."""
    out = []
    for (x1, y1, x2, y2), s, c in zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist()):
        if 0 <= c < len(category_ids):
            out.append({"image_id": image_id, "category_id": category_ids[c],
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
    return out


def run_cocoeval(gt: dict, preds: list[dict], iou_type: str, evaluator: str = "faster-coco-eval",
                 kpt_oks_sigmas=None):
    """One COCO evaluation (``iou_type`` bbox, segm or keypoints) with faster-coco-eval or pycocotools (the
    reference), their console output silenced; returns the evaluator after ``summarize`` (``stats``, ``eval``).

    ``preds`` must be the caller's own copies: both evaluators add fields to them in place.
    """
    if evaluator not in EVALUATORS:
        raise UserError(f"unknown evaluator {evaluator!r}; choose from {', '.join(EVALUATORS)}")
    with contextlib.redirect_stdout(io.StringIO()):
        if evaluator == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            coco_gt = COCO()
            coco_gt.dataset = _copy_gt(gt)
            coco_gt.createIndex()
            ev = COCOeval(coco_gt, coco_gt.loadRes(preds), iou_type)
            if kpt_oks_sigmas is not None:
                ev.params.kpt_oks_sigmas = np.asarray(kpt_oks_sigmas, np.float64)
        else:
            from faster_coco_eval import COCO, COCOeval_faster

            extra = {} if kpt_oks_sigmas is None else {"kpt_oks_sigmas": [float(s) for s in kpt_oks_sigmas]}
            coco_gt = COCO(_copy_gt(gt), print_function=_quiet)
            ev = COCOeval_faster(coco_gt, coco_gt.loadRes(preds), iou_type, print_function=_quiet, **extra)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def score_coco(gt: dict, preds: list[dict], evaluator: str = "faster-coco-eval") -> tuple[np.ndarray, dict[int, float]]:
    """COCO bbox evaluation -> (12 summary stats, {category_id: AP50-95}); empty predictions score 0."""
    if evaluator not in EVALUATORS:
        raise UserError(f"unknown evaluator {evaluator!r}; choose from {', '.join(EVALUATORS)}")
    if not preds:
        return np.zeros(12), {}
    ev = run_cocoeval(gt, [dict(p, bbox=list(p["bbox"])) for p in preds], "bbox", evaluator)
    precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            per_class[int(cat)] = float(p[p > -1].mean())
    return np.asarray(ev.stats[:12], dtype=np.float64), per_class


def _quiet(*args, **kwargs) -> None:
    """faster-coco-eval logs its summary table at INFO; the report carries the numbers instead."""


def _copy_gt(gt: dict) -> dict:
    """Evaluators add keys to the dicts they index; keep the Dataset's own copy clean."""
    return {k: ([dict(x) for x in v] if isinstance(v, list) else v) for k, v in gt.items()}
