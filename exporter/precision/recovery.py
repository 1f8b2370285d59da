"""``--int8-max-drop AP``: keep INT8's mAP50-95 drop vs FP32 within a budget by moving layers back to float.

1. Measure mAP50-95 of the FP32 graph and the Q/DQ graph in ONNX Runtime on CPU with the project's one
   evaluator (exporter.evaluation.evaluate: conf 0.001, IoU 0.65, multi-label, 300 detections) on ``--data``,
   which must share no image with the calibration images (checked by content hash; refused otherwise):
   mAP measured on the images the ranges were fitted to overstates INT8 (issue 12 measured 0.2-0.4 AP).
2. If the drop exceeds the budget, rank the quantized convs by **sensitivity**: the error the detections
   get when *only that conv* is quantized (FP32 everywhere else), on a few calibration images:
       relative MSE of the class scores (objectness x class probability, what NMS ranks and thresholds)
     + confidence-weighted squared box error relative to each box's size (what IoU matching sees; boxes
       of background anchors are weighted by their ~0 confidence and do not count).
   Why this measure: it is measured where mAP is decided (after the decode), it includes how a layer's
   noise propagates through the rest of the network (a per-layer quantization SNR does not: a late layer
   with little local error can hurt more than an early one), and for small, nearly independent noise the
   per-layer contributions add up, so removing the largest ones first removes the most error per layer
   moved back. It costs one ONNX Runtime run per conv on a few images, not one mAP evaluation per conv.
3. Move the k most sensitive convs back to float (FP16: modelopt places Q/DQ again with them excluded,
   same calibrated ranges), for k = 1, 2, 4, ... until the drop is within budget, then bisect for the
   smallest such k. Every number reported was measured.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time

import numpy as np
import onnx

from runtimes.contract import RAW_OUTPUT, ModelInfo

from ..errors import UserError
from ..options import CalibOptions
from .calib_data import CalibImages, load_batch

log = logging.getLogger("yolo7_export")

SENSITIVITY_IMAGES = 16


def recover_accuracy(fp32: onnx.ModelProto, qproto: onnx.ModelProto, builder, info: ModelInfo,
                     calib: CalibOptions, images: CalibImages) -> tuple[onnx.ModelProto, dict]:
    """Return the Q/DQ graph that meets ``calib.max_drop`` with the fewest convs moved back, and the report."""
    t0 = time.perf_counter()
    budget = float(calib.max_drop)
    dataset = eval_set(calib, images)
    check_disjoint(dataset, images)  # quantize_int8 checked it before calibrating; cheap, and this is public
    base = _map(fp32, dataset)
    history = []

    def measure(exclude: list[str], proto: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, float]:
        proto = proto if proto is not None else builder.build(exclude)
        result = _map(proto, dataset)
        drop = round((base.map50_95 - result.map50_95) * 100, 3)
        history.append({"excluded": len(exclude), "map50_95": round(result.map50_95 * 100, 3),
                        "map50": round(result.map50 * 100, 3), "drop": drop})
        log.info("int8 recovery: %d conv(s) in float -> mAP50-95 %.2f (drop %.2f AP, budget %.2f)",
                 len(exclude), result.map50_95 * 100, drop, budget)
        return proto, drop

    best, drop = measure([], qproto)
    ranking: list[tuple[str, float]] = []
    excluded: list[str] = []
    if drop > budget:
        ranking = layer_sensitivity(fp32, builder.build([], fp16=False), builder.convs, images, info)
        order = [name for name, _ in ranking]
        tried: dict[int, tuple[onnx.ModelProto, float]] = {}
        lo, hi, k = 0, None, 1
        while hi is None:
            k = min(k, len(order))
            tried[k] = measure(order[:k])
            if tried[k][1] <= budget:
                hi = k
            else:
                lo, k = k, k * 2
                if lo == len(order):  # cannot happen for budget >= 0 (all float == FP32), kept as a guard
                    raise RuntimeError("INT8 recovery: all convs in float and the drop still exceeds the budget")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            tried[mid] = measure(order[:mid])
            lo, hi = (lo, mid) if tried[mid][1] <= budget else (mid, hi)
        best, drop = tried[hi]
        excluded = order[:hi]
    report = {"budget_ap": budget, "eval_set": str(dataset.source), "eval_images": len(dataset),
              "eval_disjoint_from_calibration": True,
              "fp32_map50_95": round(base.map50_95 * 100, 3), "fp32_map50": round(base.map50 * 100, 3),
              "final_drop_ap": drop, "excluded_layers": excluded,
              "sensitivity": [{"layer": n, "score": float(f"{s:.4g}")} for n, s in ranking[:max(10, len(excluded))]],
              "sensitivity_measure": "detection output error with only that conv quantized "
                                     f"({min(SENSITIVITY_IMAGES, len(images.paths))} calibration images)",
              "steps": history, "seconds": round(time.perf_counter() - t0, 2)}
    return best, report


def eval_set(calib: CalibOptions, images: CalibImages):
    from ..evaluation.dataset import DatasetError, load_dataset

    if calib.eval_data is None:
        raise UserError("--int8-max-drop measures mAP on a labelled set that shares no image with the calibration "
                        f"images: pass --data (calibrating on {images.source})")
    try:
        return load_dataset(calib.eval_data)
    except DatasetError as exc:
        raise UserError(f"--int8-max-drop: {exc}") from exc


def check_disjoint(dataset, images: CalibImages) -> None:
    """Refuse an eval set that shares images (same bytes) with the calibration images."""
    calib = {hashlib.sha256(p.read_bytes()).digest(): p for p in images.paths}
    shared = [rec.path for rec in dataset.images if hashlib.sha256(rec.path.read_bytes()).digest() in calib]
    if shared:
        raise UserError(f"--int8-max-drop: {len(shared)} of the {len(dataset)} --data images are also calibration "
                        f"images (e.g. {shared[0].name}); evaluate on images the calibration never saw")
    log.info("int8 recovery: eval set %s (%d images) shares no image with the %d calibration images",
             dataset.source, len(dataset), len(images.paths))


@contextlib.contextmanager
def _detector(proto: onnx.ModelProto):
    """An in-memory graph behind the project's ONNX Runtime backend (it takes the ModelProto: no temp file),
    closed as soon as the measurement is done."""
    from runtimes.base import Detector
    from runtimes.onnx_backend import OnnxBackend

    with Detector(OnnxBackend(proto)) as detector:
        yield detector


def _map(proto: onnx.ModelProto, dataset):
    from ..evaluation.evaluate import evaluate_map

    with _detector(proto) as detector:
        return evaluate_map(detector, dataset, progress=False)


def _run(proto: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    """Raw output on ``batch``; Detector.run splits it into the graph's fixed batch size where it has one."""
    with _detector(proto) as detector:
        return detector.run(batch)[RAW_OUTPUT]


# ------------------------------------------------------------------------------------------ sensitivity
def layer_sensitivity(fp32: onnx.ModelProto, qproto: onnx.ModelProto, convs: list[str], images: CalibImages,
                      info: ModelInfo) -> list[tuple[str, float]]:
    """(conv, error) for every quantized conv, most sensitive first (see the module docstring)."""
    index = np.unique(np.linspace(0, len(images.paths) - 1, min(SENSITIVITY_IMAGES, len(images.paths))).astype(int))
    batch = load_batch([images.paths[i] for i in index], info.imgsz)
    reference = _run(fp32, batch)
    producer = {o: n.op_type for n in qproto.graph.node for o in n.output}
    quantized = {n.name for n in qproto.graph.node if n.op_type == "Conv"
                 and any(producer.get(i) == "DequantizeLinear" for i in n.input[:2])}
    scores = [(name, detection_error(reference, _run(single_layer_variant(fp32, qproto, name), batch)))
              for name in convs if name in quantized]
    return sorted(scores, key=lambda item: -item[1])


def detection_error(ref: np.ndarray, out: np.ndarray) -> float:
    """Score relative MSE + confidence-weighted box error relative to box size, on raw [B,N,5+nc] outputs."""
    s_ref = ref[..., 4:5] * ref[..., 5:]
    s_out = out[..., 4:5] * out[..., 5:]
    score_err = float(((s_out - s_ref) ** 2).sum() / max(float((s_ref ** 2).sum()), 1e-12))
    conf = s_ref.max(-1)
    size = np.maximum(ref[..., 2:4], 1.0)
    rel = (out[..., :4] - ref[..., :4]) / np.concatenate([size, size], -1)
    box_err = float((conf * (rel ** 2).sum(-1)).sum() / max(float(conf.sum()), 1e-12))
    return score_err + box_err


def single_layer_variant(fp32: onnx.ModelProto, qproto: onnx.ModelProto, conv: str) -> onnx.ModelProto:
    """The FP32 graph with only ``conv`` quantized: its Q/DQ nodes and INT8 weights copied from ``qproto``."""
    producers = {o: n for n in qproto.graph.node for o in n.output}
    qconv = next(n for n in qproto.graph.node if n.name == conv)
    chain, stack, seen = [], list(qconv.input), set()
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.name in seen:
            continue
        seen.add(node.name)
        chain.append(node)
        stack.extend(node.input)
    needed = {i for n in chain for i in n.input}
    inits = [t for t in qproto.graph.initializer if t.name in needed]
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    # the INT8 weight keeps the float weight's name (modelopt's DQ-only weights): qproto's version wins
    replaced = {t.name for t in inits}
    kept = [t for t in out.graph.initializer if t.name not in replaced]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + inits)
    nodes = list(out.graph.node)
    pos = next(i for i, n in enumerate(nodes) if n.name == conv)
    del nodes[pos].input[:]
    nodes[pos].input.extend(qconv.input)
    order = {n.name: i for i, n in enumerate(qproto.graph.node)}  # qproto is topologically sorted
    nodes[pos:pos] = sorted(chain, key=lambda n: order[n.name])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
