"""Parity of an artifact with the PyTorch reference on the *same* preprocessed batch.

Raw outputs ([B,N,5+nc]) are compared number by number: max/mean absolute error, relative error and cosine
similarity (over the whole output, which box coordinates in pixels dominate, and over the objectness/class
channels alone, which show score damage that the first hides). Relative error is normalised by the reference's magnitude (|a-b| / max|ref| and mean|a-b| /
mean|ref|) because an elementwise ratio explodes on the many near-zero class probabilities. Detections are
compared as a user sees them: the share of reference boxes that the artifact reproduces (IoU >= 0.9, same
class) and how much their scores differ. Artifacts with NMS inside the graph have no raw output to compare,
so only their detections are (the reference then runs NMS with the tail's own settings).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from runtimes.base import DetectConfig, Detections, Detector
from runtimes.contract import RAW_OUTPUT, ModelInfo

MATCH_IOU = 0.9


@dataclass
class ParityResult:
    n_images: int
    finite: bool  # no NaN/Inf in any output
    raw: dict = field(default_factory=dict)  # empty for NMS-tail artifacts
    detections: dict = field(default_factory=dict)
    detect_config: dict = field(default_factory=dict)

    @property
    def cosine(self) -> float | None:
        return self.raw.get("cosine")

    def to_dict(self) -> dict:
        return asdict(self) | {"cosine": self.cosine}


def compare_raw(ref: np.ndarray, out: np.ndarray) -> dict:
    """Error statistics of ``out`` against ``ref`` (same shape), overall and for boxes vs scores."""
    if ref.shape != out.shape:
        raise ValueError(f"raw output shapes differ: reference {ref.shape}, artifact {out.shape}")
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    diff = np.abs(ref64 - out64)
    finite = np.isfinite(diff)
    d = np.where(finite, diff, 0.0)
    a, b = ref64.ravel(), np.where(np.isfinite(out64), out64, 0.0).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cos = float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
    mag = np.abs(ref64)
    sa, sb = a.reshape(ref.shape)[..., 4:].ravel(), b.reshape(ref.shape)[..., 4:].ravel()
    s_denom = np.linalg.norm(sa) * np.linalg.norm(sb)
    return {
        "max_abs": float(d.max()) if d.size else 0.0,
        "mean_abs": float(d.mean()) if d.size else 0.0,
        "max_rel": float(d.max() / max(mag.max(), 1e-12)) if d.size else 0.0,
        "mean_rel": float(d.mean() / max(mag.mean(), 1e-12)) if d.size else 0.0,
        "cosine": cos,
        "score_cosine": float(sa @ sb / s_denom) if s_denom > 0 else float(np.array_equal(sa, sb)),
        "box_max_abs": float(d[..., :4].max()) if d.size else 0.0,  # input pixels
        "score_max_abs": float(d[..., 4:].max()) if d.size else 0.0,  # objectness and class probabilities
        "nonfinite": int((~finite).sum()),
    }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes [n,4] x [m,4]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def match_detections(ref: list[Detections], got: list[Detections], iou: float = MATCH_IOU) -> dict:
    """Greedy one-to-one matching, highest reference score first, same class and IoU >= ``iou``."""
    n_ref = sum(len(r) for r in ref)
    n_got = sum(len(g) for g in got)
    matched, score_diffs = 0, []
    for r, g in zip(ref, got):
        if not len(r) or not len(g):
            continue
        ious = box_iou(r.boxes, g.boxes)
        ious[r.classes[:, None] != g.classes[None, :]] = 0.0
        used = np.zeros(len(g), bool)
        for i in np.argsort(-r.scores, kind="stable"):
            cand = np.where(~used & (ious[i] >= iou))[0]
            if cand.size:
                j = cand[np.argmax(ious[i, cand])]
                used[j] = True
                matched += 1
                score_diffs.append(abs(float(r.scores[i]) - float(g.scores[j])))
    share = matched / n_ref if n_ref else float(n_got == 0)
    return {"n_reference": n_ref, "n_artifact": n_got, "matched": matched, "matched_share": share,
            "score_max_abs": max(score_diffs, default=0.0),
            "score_mean_abs": float(np.mean(score_diffs)) if score_diffs else 0.0, "iou": iou}


def reference_config(info: ModelInfo) -> DetectConfig:
    """The NMS the reference must run to be comparable: the artifact's own tail settings, or deployment defaults."""
    if info.nms == "none":
        return DetectConfig()
    p = info.nms_params or {}
    return DetectConfig(conf=float(p.get("conf", 0.25)), iou=float(p.get("iou", 0.45)),
                        max_det=int(p.get("topk", 100)), multi_label=not p.get("best_class", False),
                        agnostic=bool(p.get("agnostic", False)))


def check_parity(reference: Detector, candidate: Detector, batch: np.ndarray,
                 reference_outputs: dict[str, np.ndarray] | None = None) -> ParityResult:
    """Run both on ``batch`` (already letterboxed, [B,3,H,W] float32) and compare."""
    ref_out = reference_outputs if reference_outputs is not None else reference.run(batch)
    out = candidate.run(batch)
    finite = all(np.isfinite(v).all() for v in out.values() if np.issubdtype(v.dtype, np.floating))
    cfg = reference_config(candidate.info)
    raw = compare_raw(ref_out[RAW_OUTPUT], out[RAW_OUTPUT]) if RAW_OUTPUT in out else {}
    dets = match_detections(reference.postprocess(ref_out, cfg), candidate.postprocess(out, cfg))
    return ParityResult(n_images=len(batch), finite=bool(finite), raw=raw, detections=dets, detect_config=asdict(cfg))
