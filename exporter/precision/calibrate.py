"""INT8 calibration on CPU with ONNX Runtime's calibrators, and the ``--calib-cache`` file.

Methods (all symmetric, zero-point 0 as TensorRT requires):
* ``percentile`` (default): the 99.999th percentile of |x| from a 2048-bin histogram. Clips the rare
  outliers that make ``max`` waste resolution, without ``entropy``'s aggressive clipping.
* ``max``: the largest |x| seen. Never clips; fastest.
* ``entropy``: ONNX Runtime's version of TensorRT's KL-divergence threshold (2048-bin histogram, 128
  quantized bins). It is computed in Python, ~1 s per tensor: the slowest of the three.
Default image count and percentile, chosen on two tune splits only (yolov7-tiny-shapes at 320; calibration
images: generated train split, seed 1000; tune: the 200 stored val images (seed 2000) / 300 generated
``--split tune --seed 4000`` images; mAP50-95 drop vs FP32 in AP, 200 / 300 / image-weighted over the 500;
head convs in FP16 unless said):
    512 images   percentile 99.99     0.26 / 0.67 / 0.50
    512 images   percentile 99.999   -0.12 / 0.28 / 0.12   (the previous default)
    512 images   percentile 99.9999   0.15 / 0.30 / 0.24
    512 images   99.999, + the most sensitive conv in FP16 (recovery.py's ranking on the tune split) -0.07 / 0.28 / 0.14
    512 images   99.999, + the two most sensitive convs in FP16                                      -0.14 / 0.25 / 0.09
    512 images   99.999, + the first conv in FP16                                                     0.00 / 0.08 / 0.05
    1024 images  percentile 99.999    0.02 / 0.06 / 0.05   (default: best, with no extra layer in FP16)
    1024 images  percentile 99.9999   0.24 / 0.48 / 0.38
    1024 images  99.999, + the first conv in FP16                                                     0.15 / 0.09 / 0.12
    512 images   max                  0.12 / 0.50 / 0.35
Differences under ~0.1 AP are within what these 500 images resolve; 99.999 beat both neighbours at both
image counts. The report split's figure is in benchmarks/results/precision_cpu.md (measured once, after the
choice).
An earlier measurement with the previous placement had entropy 2.6 AP worse: it clips the activations
feeding the head convs to ~30 % of their range.

Only the tensors that get an activation Q/DQ (placement.py: conv inputs, Concat/MaxPool/Resize inputs
and outputs, residual Add inputs and outputs) are calibrated and stored, as amax = max(|lo|, |hi|) of
ONNX Runtime's symmetric range, with a key: sha256 of the FP32 graph, the images' bytes, the method and its
settings, the tensor list, the input size and the onnxruntime version. A cache whose key matches is used
without running calibration; any other is recomputed and overwritten.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..artifacts import write_json_atomic
from ..errors import UserError
from .calib_data import CalibImages, ImageFeed

log = logging.getLogger("yolo7_export")

METHODS = ("percentile", "max", "entropy")
DEFAULT_METHOD = "percentile"
CACHE_FORMAT = "yolo7-export/int8-calibration/2"
MAX_CHUNK = 16  # images per collect_data call: ORT keeps every calibrated tensor of a call in memory,
CHUNK_BYTES = 1 << 30  # so big models at big sizes get fewer images per call (at most ~1 GiB of them)
_OPTIONS = {
    "max": {"symmetric": True},
    "entropy": {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
}


@dataclass
class Calibration:
    """Calibrated amax (max |x| after the method's clipping) per tensor, and where it came from."""

    method: str
    amax: dict[str, float]
    key: str
    n_images: int
    seconds: float  # time the calibration itself took (when it ran; the cached value otherwise)
    cache: str  # off | hit | miss (computed and written) | stale (key differed; recomputed and written)


def ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown --calib-method {method!r}; choose from {', '.join(METHODS)}")
    return method


def cache_key(proto: onnx.ModelProto, images: CalibImages, method: str, imgsz: tuple[int, int], batch: int,
              tensors: list[str]) -> str:
    import onnxruntime

    model = hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()
    spec = {"format": CACHE_FORMAT, "model": model, "images": images.fingerprint(), "method": method,
            "options": _OPTIONS[method], "imgsz": list(imgsz), "batch": batch, "chunk": chunk_size(proto, batch),
            "tensors": hashlib.sha256("\n".join(sorted(tensors)).encode()).hexdigest(),
            "onnxruntime": onnxruntime.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def calibrate(proto: onnx.ModelProto, images: CalibImages, method: str, imgsz: tuple[int, int], batch: int,
              tensors: list[str], cache: Path | None = None) -> Calibration:
    """Ranges of ``tensors`` over ``images`` (from ``cache`` when it matches); writes the cache if given."""
    check_method(method)
    tensors = sorted(tensors)
    key = cache_key(proto, images, method, imgsz, batch, tensors)
    status = "off"
    if cache is not None:
        cache = check_cache_path(cache)
        cached = _read_cache(cache)
        if cached is not None and cached.get("key") == key:
            log.info("calibration: using cache %s (%d images, %s)", cache, cached["n_images"], method)
            return Calibration(method, {t: float(v) for t, v in cached["amax"].items()}, key, int(cached["n_images"]),
                               float(cached.get("seconds", 0.0)), "hit")
        status = "stale" if cached is not None else "miss"
        if cached is not None:
            log.info("calibration: cache %s was made for another model, image set or method; recalibrating", cache)
    t0 = time.perf_counter()
    amax = _run_calibration(proto, images, method, imgsz, batch, tensors)
    seconds = round(time.perf_counter() - t0, 2)
    log.info("calibration: %s over %d images in %.1f s", method, len(images.paths), seconds)
    result = Calibration(method, amax, key, len(images.paths), seconds, status)
    if cache is not None:
        import onnxruntime

        write_json_atomic(cache, {"format": CACHE_FORMAT, "key": key, "method": method, "n_images": len(images.paths),
                                  "source": str(images.source), "seconds": seconds,
                                  "onnxruntime": onnxruntime.__version__, "amax": amax})
    return result


def check_cache_path(cache: Path) -> Path:
    cache = Path(cache)
    if cache.is_dir():
        raise UserError(f"--calib-cache {cache} is a folder; give a file path")
    return cache


def chunk_size(proto: onnx.ModelProto, batch: int) -> int:
    """Images per ``collect_data`` call (a multiple of the model's batch): ORT's calibrators hold every
    input and output of every Conv for all images of a call, ~0.5 GB per image for yolov7 at 640."""
    per_image = 0
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
        inits = {t.name for t in proto.graph.initializer}
        tensors = {t for n in proto.graph.node if n.op_type == "Conv" for t in (n.input[0], n.output[0])
                   if t not in inits}
        for t in tensors:
            dims = shapes.get(t, [])
            per_image += 4 * int(np.prod(dims[1:])) if dims and all(d > 0 for d in dims[1:]) else 0
    except Exception:  # noqa: BLE001 - an estimate only; fall back to a small chunk
        per_image = 0
    images = MAX_CHUNK if not per_image else max(1, min(MAX_CHUNK, CHUNK_BYTES // per_image))
    return max(images // batch, 1) * batch


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("calibration cache %s is unreadable (%s); recalibrating", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("amax"), dict):
        log.warning("calibration cache %s is not a yolo7-export calibration cache; recalibrating", path)
        return {}
    return data


def _calibrator(model_path: Path, augmented: Path, method: str, wanted: set[str]):
    """ONNX Runtime's calibrator for ``method`` that records exactly ``wanted`` (create_calibrator would record
    every input and output of every node of the given op types: ~3x the tensors, ~3x the time)."""
    from onnxruntime.quantization.calibrate import EntropyCalibrater, MinMaxCalibrater, PercentileCalibrater

    base = {"max": MinMaxCalibrater, "entropy": EntropyCalibrater, "percentile": PercentileCalibrater}[method]

    class Selected(base):
        def select_tensors_to_calibrate(self, model):
            tensors, value_infos = super().select_tensors_to_calibrate(model)
            return {t for t in tensors if t in wanted}, value_infos

    calibrator = Selected(str(model_path), None, str(augmented), **_OPTIONS[method])
    calibrator.augment_graph()
    calibrator.create_inference_session()
    return calibrator


def _run_calibration(proto: onnx.ModelProto, images: CalibImages, method: str, imgsz: tuple[int, int],
                     batch: int, tensors: list[str]) -> dict[str, float]:
    wanted = set(tensors)
    with tempfile.TemporaryDirectory(prefix="yolo7_calib_") as tmp, contextlib.redirect_stdout(io.StringIO()):
        model_path = Path(tmp) / "model.onnx"
        onnx.save_model(proto, str(model_path))
        calibrator = _calibrator(model_path, Path(tmp) / "augmented.onnx", method, wanted)
        step = chunk_size(proto, batch)
        for start in range(0, len(images.paths), step):
            calibrator.collect_data(ImageFeed(images.paths[start:start + step], imgsz, batch))
        collector = getattr(calibrator, "collector", None)
        if collector is not None and hasattr(collector, "histogram_dict"):
            # thresholds only for the tensors that get Q/DQ (entropy costs ~1 s per tensor)
            collector.histogram_dict = {k: v for k, v in collector.histogram_dict.items() if k in wanted}
        computed = calibrator.compute_data()
        missing = [t for t in tensors if t not in computed.data]
        if missing:
            raise RuntimeError(f"calibration produced no range for {missing[:3]}")
        amax = {}
        for t in tensors:
            lo, hi = computed.data[t].range_value
            amax[t] = float(f"{max(abs(float(np.min(lo))), abs(float(np.max(hi)))):.9g}")
        return amax
