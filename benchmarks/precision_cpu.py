"""FP32 vs FP16 vs INT8 ONNX in ONNX Runtime on CPU: latency and mAP in one run (yolov7-tiny-shapes, 320).

What is measured, all in this run on this machine:
  latency   model-only median (and p90) of >= 30 runs after 10 warm-up runs, batch 1, 320x320, one
            letterboxed shapes image (Backend.infer: the ONNX Runtime call, no pre/post-processing)
  mAP       mAP50-95 / mAP50 on the 200 labelled shapes images (tests/data/shapes) with the project's
            evaluator (exporter.evaluation.evaluate: conf 0.001, IoU 0.65, multi-label, max 300 detections)
  INT8      calibrated on the same 200 images (--calib-images 512 asks for more than exist: all 200 are
            used), default method, calibration time; plus the --int8-max-drop run (same cached ranges)
  FP16      max |FP16 - FP32| on the raw output over the 200 images (boxes in px, probabilities)
CPU latency is not what FP16/INT8 are made for (ONNX Runtime's CPU provider has no fast FP16 convolution on
most x86 CPUs); the GPU numbers come from benchmarks/gpu_suite.py with TensorRT.
Run:  python benchmarks/precision_cpu.py [--runs 30] [--max-drop 0.5] [--methods percentile,max,entropy]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.artifacts import write_bytes_atomic, write_json_atomic  # noqa: E402
from exporter.evaluation.dataset import load_dataset  # noqa: E402
from exporter.check.environment import describe_device, report_versions  # noqa: E402
from exporter.evaluation.evaluate import evaluate_map  # noqa: E402
from exporter.evaluation.latency import warm_and_time  # noqa: E402
from exporter.onnx_export import ExportConfig, export_onnx  # noqa: E402
from exporter.options import CalibOptions  # noqa: E402
from exporter.pipeline import load_fused  # noqa: E402
from exporter.precision.fp16 import convert_fp16  # noqa: E402
from exporter.precision.int8 import quantize_int8  # noqa: E402
from runtimes.base import Detector  # noqa: E402
from runtimes.contract import ModelInfo  # noqa: E402
from runtimes.onnx_backend import OnnxBackend  # noqa: E402
from runtimes.preprocess import preprocess, read_image  # noqa: E402

CKPT = ROOT / "tests/data/yolov7-tiny-shapes.pt"
SHAPES = ROOT / "tests/data/shapes"
IMGSZ = (320, 320)


def latency_ms(backend: OnnxBackend, x: np.ndarray, runs: int, warmup: int = 10) -> tuple[float, float]:
    t = warm_and_time(lambda: backend.infer(x), runs, warmup)
    return t["p50"], t["p90"]


def fp16_deviation(fp32: OnnxBackend, fp16: OnnxBackend, dataset) -> dict:
    """Worst |FP16 - FP32| on the raw output: boxes (any anchor / confidence > 0.1) in px, probabilities."""
    worst = np.zeros(3)
    for rec in dataset.images:
        x = preprocess([read_image(rec.path)], IMGSZ)[0]
        f = fp32.infer(x)["output"]
        d = np.abs(f - fp16.infer(x)["output"])
        confident = f[..., 4] * f[..., 5:].max(-1) > 0.1
        worst = np.maximum(worst, [d[..., :4].max(), d[..., :4][confident].max(initial=0), d[..., 4:].max()])
    return {"max_abs_box_px": round(float(worst[0]), 4), "max_abs_box_px_conf_0.1": round(float(worst[1]), 4),
            "max_abs_prob": round(float(worst[2]), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--max-drop", type=float, default=0.5, help="budget of the --int8-max-drop run (AP)")
    ap.add_argument("--methods", default="percentile", help="calibration methods to run (the first is the default)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    if args.runs < 30:
        ap.error("--runs must be >= 30")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dataset = load_dataset(SHAPES)
    ckpt, model = load_fused(CKPT)
    info = ModelInfo(names=ckpt.names, stride=ckpt.stride, imgsz=IMGSZ)
    fp32 = export_onnx(model, info, ExportConfig(imgsz=IMGSZ))
    t = time.perf_counter()
    variants: dict[str, tuple[onnx.ModelProto, dict]] = {"fp32": (fp32, {}),
                                                         "fp16": (convert_fp16(fp32), {})}
    variants["fp16"][1]["convert_seconds"] = round(time.perf_counter() - t, 2)
    x = preprocess([read_image(dataset.images[0].path)], IMGSZ)[0]
    results, backends = {}, {}
    with tempfile.TemporaryDirectory(prefix="precision_bench_") as tmp:
        for i, method in enumerate(m.strip() for m in args.methods.split(",")):
            cache = Path(tmp) / f"calib_{method}.json"
            opts = CalibOptions(source=SHAPES / "images" / "val", num_images=512, method=method, cache=cache)
            variants[f"int8 {method}" + (" (default)" if i == 0 else "")] = quantize_int8(fp32, info, opts)
            opts.max_drop = args.max_drop
            variants[f"int8 {method} max-drop {args.max_drop:g}"] = quantize_int8(fp32, info, opts)
        for name, (proto, report) in variants.items():
            path = Path(tmp) / f"{name.replace(' ', '_')}.onnx"
            onnx.save_model(proto, str(path))
            backend = OnnxBackend(path, threads=args.threads)
            backends[name] = backend
            p50, p90 = latency_ms(backend, x, args.runs)
            m = evaluate_map(Detector(backend), dataset, progress=False)
            results[name] = {"latency_ms_p50": round(p50, 2), "latency_ms_p90": round(p90, 2),
                             "map50_95": round(m.map50_95 * 100, 3), "map50": round(m.map50 * 100, 3),
                             "bytes": path.stat().st_size, "report": report}
            logging.info("%-28s %7.2f ms  mAP50-95 %.2f  mAP50 %.2f", name, p50, m.map50_95 * 100, m.map50 * 100)
        results["fp16"]["fp16_vs_fp32"] = fp16_deviation(backends["fp32"], backends["fp16"], dataset)
    base = results["fp32"]["map50_95"]
    for r in results.values():
        r["drop_ap"] = round(base - r["map50_95"], 3)
    device = describe_device(args.threads)
    out = {"model": CKPT.name, "imgsz": list(IMGSZ), "batch": 1, "runs": args.runs, "warmup": 10,
           "eval_set": str(SHAPES.relative_to(ROOT)), "eval_images": len(dataset),
           "ort_threads": args.threads or "onnxruntime default", "device": device, "versions": report_versions(),
           "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "precision_cpu.json", out)
    write_bytes_atomic(args.out / "precision_cpu.md", markdown(out).encode())
    print(markdown(out))


def markdown(out: dict) -> str:
    v = out["versions"]
    lines = [f"# FP32 vs FP16 vs INT8, ONNX Runtime CPU ({out['model']}, {out['imgsz'][0]}x{out['imgsz'][1]}, batch 1)",
             "", f"Machine: {out['device']['summary']}; onnxruntime {v.get('onnxruntime')}, onnx {v.get('onnx')}, "
             f"torch {v.get('torch')}, modelopt {v.get('modelopt', '-')}, python {v.get('python')}. "
             f"The CPU is shared with other jobs: latencies are noisy.",
             f"Latency: median (p90) of {out['runs']} runs after {out['warmup']} warm-up runs, model only. "
             f"mAP: {out['eval_images']} images of {out['eval_set']}, conf 0.001, IoU 0.65, multi-label, 300 det.", "",
             "| variant | latency ms p50 (p90) | mAP50-95 | mAP50 | drop AP | size MB | notes |",
             "|---|---|---|---|---|---|---|"]
    for name, r in out["results"].items():
        rep, notes = r["report"], ""
        if "method" in rep:
            notes = f"calibration {rep['n_images']} images in {rep['calibration_seconds']} s"
            if "recovery" in rep:
                rec = rep["recovery"]
                notes = (f"budget {rec['budget_ap']} AP: {len(rec['excluded_layers'])} conv(s) moved back to float, "
                         f"{len(rec['steps'])} mAP evaluation(s), {rec['seconds']} s")
        if "fp16_vs_fp32" in r:
            d = r["fp16_vs_fp32"]
            notes = (f"max abs diff vs FP32: boxes {d['max_abs_box_px']} px (confidence > 0.1: "
                     f"{d['max_abs_box_px_conf_0.1']} px), objectness/class probabilities {d['max_abs_prob']}")
        lines.append(f"| {name} | {r['latency_ms_p50']:.2f} ({r['latency_ms_p90']:.2f}) | {r['map50_95']:.2f} | "
                     f"{r['map50']:.2f} | {r['drop_ap']:+.2f} | {r['bytes'] / 1e6:.1f} | {notes} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
