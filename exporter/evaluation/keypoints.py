"""Keypoint accuracy of a pose artifact: COCO keypoint AP (OKS) and keypoint parity with PyTorch.

* **AP**: detections with keypoints -> COCO keypoint results -> faster-coco-eval's ``keypoints`` mode
  (pycocotools is accepted as the reference evaluator and gives the same numbers; tests/test_pose_eval.py).
  OKS constants: COCO's 17 per-keypoint sigmas when nkpt == 17, else one constant 0.05 for every keypoint
  (said in the result, since AP values are only comparable under the same sigmas). The ground truth is the
  labelled set's COCO dict: a COCO person-keypoints json as is, or YOLO-pose txt labels (dataset.py turns
  ``cls cx cy w h x1 y1 v1 ...`` into COCO ``keypoints`` in pixels). Same NMS protocol as the box mAP.
* **Parity**: on the same letterboxed batch, the artifact's detections are matched one-to-one to PyTorch's
  (same class, box IoU >= 0.9); for matched pairs, keypoint position error (Euclidean, input pixels) max and
  mean, and visibility-score max difference.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from runtimes.base import DetectConfig, Detections, Detector
from runtimes.keypoints import COCO_SIGMAS
from runtimes.preprocess import read_image

from ..errors import UserError
from ..evaluation.dataset import Dataset, DatasetError
from ..evaluation.evaluate import EVAL_CONFIG, EVALUATORS, run_cocoeval
from ..evaluation.parity import MATCH_IOU, box_iou

DEFAULT_SIGMA = 0.05  # OKS constant per keypoint when the layout is not COCO's 17


@dataclass
class KeypointMapResult:
    ap50_95: float  # COCO keypoint AP (OKS 0.50:0.95)
    ap50: float
    n_images: int
    n_instances: int  # labelled instances with at least one labelled keypoint
    n_detections: int
    evaluator: str = "faster-coco-eval"
    sigmas: str = "coco17"  # coco17 | uniform0.05
    stats: list[float] = field(default_factory=list)  # the 10 COCO keypoint summary numbers
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class KeypointParity:
    matched: int  # detections matched to PyTorch's (same class, IoU >= 0.9)
    n_reference: int
    max_px: float  # largest keypoint position error among matched detections (input pixels)
    mean_px: float
    visibility_max_abs: float

    def to_dict(self) -> dict:
        return asdict(self)


def sigmas_for(nkpt: int) -> tuple[np.ndarray, str]:
    if nkpt == len(COCO_SIGMAS):
        return np.asarray(COCO_SIGMAS, np.float64), "coco17"
    return np.full(nkpt, DEFAULT_SIGMA), f"uniform{DEFAULT_SIGMA:g}"


def keypoint_gt(dataset: Dataset, nkpt: int) -> dict:
    """The set's COCO ground truth, checked to carry ``nkpt`` keypoints per labelled instance.

    One clear line when the set has no keypoints (a detection set given to a pose model) or a different
    keypoint count than the model predicts."""
    anns = [a for a in dataset.gt["annotations"] if not a.get("iscrowd", 0)]
    with_kpts = [a for a in anns if isinstance(a.get("keypoints"), list)]
    if anns and not with_kpts:
        raise DatasetError(f"dataset {dataset.source} has no keypoint labels but the model is a pose model "
                           f"({nkpt} keypoints): pass a COCO person-keypoints json or YOLO-pose labels "
                           f"('cls cx cy w h x1 y1 v1 ...')")
    for a in with_kpts:
        if len(a["keypoints"]) != 3 * nkpt:
            raise DatasetError(f"dataset {dataset.source}: annotation {a.get('id')} has "
                               f"{len(a['keypoints']) // 3} keypoints but the model predicts {nkpt}")
    gt = {k: ([dict(x) for x in v] if isinstance(v, list) else v) for k, v in dataset.gt.items()}
    for a in gt["annotations"]:
        kp = a.get("keypoints")
        if isinstance(kp, list):
            a.setdefault("num_keypoints", sum(1 for v in kp[2::3] if v > 0))
            a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
        else:  # an instance without keypoint labels takes no part in keypoint AP
            a["keypoints"], a["num_keypoints"] = [0] * (3 * nkpt), 0
            a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
    return gt


def detections_to_coco_keypoints(det: Detections, image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's pose detections as COCO keypoint results (image pixels; visibility score as v)."""
    if det.keypoints is None:
        raise ValueError("detections carry no keypoints (not a pose artifact)")
    out = []
    for (x1, y1, x2, y2), s, c, k in zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(),
                                         det.keypoints):
        if 0 <= c < len(category_ids):
            out.append({"image_id": image_id, "category_id": category_ids[c], "score": float(s),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "keypoints": [float(v) for v in np.asarray(k, np.float64).reshape(-1)]})
    return out


def score_keypoints(gt: dict, preds: list[dict], sigmas: np.ndarray,
                    evaluator: str = "faster-coco-eval") -> np.ndarray:
    """COCO keypoint evaluation -> the 10 summary stats (AP, AP50, AP75, APm, APl, AR, ...); 0 if no preds."""
    if evaluator not in EVALUATORS:
        raise UserError(f"unknown evaluator {evaluator!r}; choose from {', '.join(EVALUATORS)}")
    if not preds:
        return np.zeros(10)
    preds = [dict(p, keypoints=list(p["keypoints"]), bbox=list(p["bbox"])) for p in preds]
    return np.asarray(run_cocoeval(gt, preds, "keypoints", evaluator, kpt_oks_sigmas=sigmas).stats[:10], np.float64)


def evaluate_keypoints(detector: Detector, dataset: Dataset, batch_size: int = 8, progress: bool = False,
                       evaluator: str = "faster-coco-eval", config: DetectConfig | None = None,
                       desc: str = "keypoint AP") -> KeypointMapResult:
    """Run a pose ``detector`` over ``dataset`` under the evaluation protocol and score COCO keypoint AP."""
    from tqdm import tqdm

    info = detector.info
    if info.task != "pose" or not info.nkpt:
        raise DatasetError(f"keypoint AP needs a pose model; this artifact is a '{info.task}' model")
    dataset = dataset.for_model(info.names)
    gt = keypoint_gt(dataset, info.nkpt)
    sigmas, sigma_name = sigmas_for(info.nkpt)
    t0 = time.perf_counter()
    preds: list[dict] = []
    records = dataset.images
    with tqdm(total=len(records), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            for rec, det in zip(chunk, detector.detect([read_image(r.path) for r in chunk], config or EVAL_CONFIG)):
                preds += detections_to_coco_keypoints(det, rec.id, dataset.category_ids)
            bar.update(len(chunk))
    stats = score_keypoints(gt, preds, sigmas, evaluator)
    n_inst = sum(1 for a in gt["annotations"] if a.get("num_keypoints", 0) > 0 and not a.get("iscrowd", 0))
    return KeypointMapResult(ap50_95=float(stats[0]), ap50=float(stats[1]), n_images=len(dataset),
                             n_instances=n_inst, n_detections=len(preds), evaluator=evaluator, sigmas=sigma_name,
                             stats=[round(float(s), 6) for s in stats], seconds=round(time.perf_counter() - t0, 2))


def compare_keypoints(ref: list[Detections], got: list[Detections], iou: float = MATCH_IOU) -> KeypointParity:
    """Keypoint errors of ``got`` against ``ref`` over detections matched one-to-one (greedy by reference
    score, same class, box IoU >= ``iou``); both in the same (input) pixels."""
    errs, vis, matched, n_ref = [], [], 0, 0
    for r, g in zip(ref, got):
        n_ref += len(r)
        if not len(r) or not len(g) or r.keypoints is None or g.keypoints is None:
            continue
        ious = box_iou(r.boxes, g.boxes)
        ious[r.classes[:, None] != g.classes[None, :]] = 0.0
        used = np.zeros(len(g), bool)
        for i in np.argsort(-r.scores, kind="stable"):
            cand = np.flatnonzero(~used & (ious[i] >= iou))
            if not cand.size:
                continue
            j = cand[np.argmax(ious[i, cand])]
            used[j] = True
            matched += 1
            d = r.keypoints[i].astype(np.float64) - g.keypoints[j].astype(np.float64)
            errs.append(np.hypot(d[:, 0], d[:, 1]))
            vis.append(np.abs(d[:, 2]))
    e = np.concatenate(errs) if errs else np.zeros(0)
    v = np.concatenate(vis) if vis else np.zeros(0)
    return KeypointParity(matched=matched, n_reference=n_ref, max_px=float(e.max()) if e.size else 0.0,
                          mean_px=float(e.mean()) if e.size else 0.0,
                          visibility_max_abs=float(v.max()) if v.size else 0.0)


def keypoint_parity(reference: Detector, candidate: Detector, batch: np.ndarray, reference_outputs: dict,
                    config: DetectConfig) -> KeypointParity:
    """Both detectors' keypoints on the same letterboxed batch (input pixels), under ``config``."""
    ref = reference.postprocess(reference_outputs, config)
    got = candidate.postprocess(candidate.run(batch), config)
    return compare_keypoints(ref, got)
