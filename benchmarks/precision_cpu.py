"""FP32 vs FP16 vs INT8 ONNX (ONNX Runtime, CPU) on three disjoint splits: calibrate, tune, report.

Protocol (issue 12): nothing is tuned or calibrated on the images the figures are reported on.
  calibrate  1024 generated train-split images  tools/make_shapes_dataset.py --split train --n 1024 --seed 1000
             --start-id 100001 (the model's own training distribution; ids 100001-101024; the first 512
             are the 512-image set of earlier runs: each image depends only on the seed and its index)
  tune       the 200 stored validation images, tests/data/shapes (seed 2000, ids 1-200): the defaults
             (calibration method, image count, layers kept in FP16) were chosen on these together with
             300 generated --split tune --n 300 --seed 4000 --start-id 400001 images (figures in
             exporter/precision/calibrate.py); the --int8-max-drop run measures its budget on the 200
  report     500 generated test-split images     --split test --n 500 --seed 3000 --start-id 300001
             (ids 300001-300500): used for nothing but the figures below
The generated splits are written under --cache (default /tmp/yolo7_shapes_splits) and reused; the script
checks that no image (by content) is in two splits. Backgrounds: the 6 photos of the official repo's
inference/images (--bg-dir), as the stored validation set was made.

Measured in one run on this machine, for each variant: mAP50-95 / mAP50 on the report split (the project's
evaluator: conf 0.001, IoU 0.65, multi-label, 300 detections), mAP50-95 on the tune split, the drop vs
FP32 on both, calibration time, and the model-only ONNX Runtime latency (median and p90 of >= 30 runs after
10 warm-up runs, batch 1, one letterboxed image). CPU latency is not what FP16/INT8 are for (TensorRT is);
it is recorded because ONNX Runtime users see it.
Run:  python benchmarks/precision_cpu.py [--runs 30] [--max-drop 0.3] [--methods percentile,max]
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.artifacts import write_bytes_atomic, write_json_atomic  # noqa: E402
from exporter.check.environment import describe_device, report_versions  # noqa: E402
from exporter.evaluation.dataset import load_dataset  # noqa: E402
from exporter.evaluation.evaluate import evaluate_map  # noqa: E402
from exporter.evaluation.latency import warm_and_time  # noqa: E402
from exporter.onnx_export import ExportConfig, export_onnx  # noqa: E402
from exporter.options import CalibOptions  # noqa: E402
from exporter.pipeline import load_fused  # noqa: E402
from exporter.precision.audit import audit_int8  # noqa: E402
from exporter.precision.fp16 import convert_fp16  # noqa: E402
from exporter.precision.int8 import quantize_int8  # noqa: E402
from runtimes.base import Detector  # noqa: E402
from runtimes.contract import ModelInfo  # noqa: E402
from runtimes.onnx_backend import OnnxBackend  # noqa: E402
from runtimes.preprocess import preprocess, read_image  # noqa: E402

CKPT = ROOT / "tests/data/yolov7-tiny-shapes.pt"
TUNE = ROOT / "tests/data/shapes"
IMGSZ = (320, 320)
GENERATED = {  # name: generator arguments
    "calibrate": {"split": "train", "n": 1024, "seed": 1000, "start_id": 100001},
    "report": {"split": "test", "n": 500, "seed": 3000, "start_id": 300001},
}
SHARED_BG = Path("/work/shared/fixtures/images")


def generate(name: str, cache: Path, bg_dir: Path) -> Path:
    """The split's dataset root (images/<split>, labels/<split>, annotations/), generated once."""
    spec = GENERATED[name]
    root = cache / f"{spec['split']}_n{spec['n']}_seed{spec['seed']}_id{spec['start_id']}"
    images = root / "images" / spec["split"]
    if not (images.is_dir() and len(list(images.glob("*.jpg"))) == spec["n"]):
        cmd = [sys.executable, str(ROOT / "tools/make_shapes_dataset.py"), "--out", str(root), "--split", spec["split"],
               "--n", str(spec["n"]), "--seed", str(spec["seed"]), "--start-id", str(spec["start_id"]),
               "--bg-dir", str(bg_dir)]
        logging.info("generating %s split: %s", name, " ".join(cmd[1:]))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return root


def check_disjoint(splits: dict[str, list[Path]]) -> None:
    seen: dict[bytes, str] = {}
    for name, paths in splits.items():
        for p in paths:
            digest = hashlib.sha256(p.read_bytes()).digest()
            if digest in seen:
                raise SystemExit(f"{p} ({name}) is also in the {seen[digest]} split")
            seen[digest] = name


def latency_ms(backend: OnnxBackend, x: np.ndarray, runs: int, warmup: int = 10) -> tuple[float, float]:
    t = warm_and_time(lambda: backend.infer(x), runs, warmup)
    return t["p50"], t["p90"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--max-drop", type=float, default=0.3, help="budget of the --int8-max-drop run (AP)")
    ap.add_argument("--methods", default="percentile,max", help="calibration methods (the first is the default)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "yolo7_shapes_splits")
    ap.add_argument("--bg-dir", type=Path, default=SHARED_BG,
                    help="background photos: the official repo's inference/images (6 jpg)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    if args.runs < 30:
        ap.error("--runs must be >= 30")
    if len(list(args.bg_dir.glob("*.jpg"))) != 6:
        ap.error(f"--bg-dir {args.bg_dir}: expected the 6 photos of the official repo's inference/images")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    roots = {name: generate(name, args.cache, args.bg_dir) for name in GENERATED}
    calib_dir = roots["calibrate"] / "images" / "train"
    report_set, tune_set = load_dataset(roots["report"]), load_dataset(TUNE)
    check_disjoint({"calibrate": sorted(calib_dir.glob("*.jpg")), "tune": [r.path for r in tune_set.images],
                    "report": [r.path for r in report_set.images]})
    ckpt, model = load_fused(CKPT)
    info = ModelInfo(names=ckpt.names, stride=ckpt.stride, imgsz=IMGSZ)
    fp32 = export_onnx(model, info, ExportConfig(imgsz=IMGSZ))
    variants: dict[str, tuple[onnx.ModelProto, dict]] = {"fp32": (fp32, {})}
    t = time.perf_counter()
    variants["fp16"] = (convert_fp16(fp32), {"convert_seconds": round(time.perf_counter() - t, 2)})
    x = preprocess([read_image(report_set.images[0].path)], IMGSZ)[0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="precision_bench_") as tmp:
        for i, method in enumerate(m.strip() for m in args.methods.split(",")):
            cache = Path(tmp) / f"calib_{method}.json"
            opts = CalibOptions(source=calib_dir, method=method, cache=cache)  # the default image count
            variants[f"int8 {method}" + (" (default)" if i == 0 else "")] = quantize_int8(fp32, info, opts)
            if i == 0:
                opts.max_drop, opts.eval_data = args.max_drop, TUNE  # budget measured on tune, never on report
                variants[f"int8 {method} --int8-max-drop {args.max_drop:g}"] = quantize_int8(fp32, info, opts)
        for name, (proto, report) in variants.items():
            path = Path(tmp) / f"{name.replace(' ', '_')}.onnx"
            onnx.save_model(proto, str(path))
            backend = OnnxBackend(path, threads=args.threads)
            p50, p90 = latency_ms(backend, x, args.runs)
            m = evaluate_map(Detector(backend), report_set, progress=False)
            mt = evaluate_map(Detector(backend), tune_set, progress=False)
            results[name] = {"latency_ms_p50": round(p50, 2), "latency_ms_p90": round(p90, 2),
                             "map50_95": round(m.map50_95 * 100, 3), "map50": round(m.map50 * 100, 3),
                             "tune_map50_95": round(mt.map50_95 * 100, 3), "bytes": path.stat().st_size,
                             "report": report}
            if name.startswith("int8"):
                results[name]["placement"] = audit_int8(proto).as_dict()
            logging.info("%-32s %7.2f ms  report mAP50-95 %.2f  tune %.2f", name, p50, m.map50_95 * 100,
                         mt.map50_95 * 100)
    base, tune_base = results["fp32"]["map50_95"], results["fp32"]["tune_map50_95"]
    for r in results.values():
        r["drop_ap"] = round(base - r["map50_95"], 3)
        r["tune_drop_ap"] = round(tune_base - r["tune_map50_95"], 3)
    splits = {"calibrate": {**GENERATED["calibrate"], "images": CalibOptions().num_images, "path": str(calib_dir)},
              "tune": {"split": "val", "n": len(tune_set), "seed": 2000, "start_id": 1,
                       "path": str(TUNE.relative_to(ROOT))},
              "report": {**GENERATED["report"], "images": len(report_set), "path": str(roots["report"])}}
    out = {"model": CKPT.name, "imgsz": list(IMGSZ), "batch": 1, "runs": args.runs, "warmup": 10, "splits": splits,
           "date": time.strftime("%Y-%m-%d", time.gmtime()), "ort_threads": args.threads or "onnxruntime default",
           "device": describe_device(args.threads), "versions": report_versions(), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "precision_cpu.json", out)
    write_bytes_atomic(args.out / "precision_cpu.md", markdown(out).encode())
    print(markdown(out))


def markdown(out: dict) -> str:
    v, s = out["versions"], out["splits"]
    gen = "python tools/make_shapes_dataset.py --split {split} --n {n} --seed {seed} --start-id {start_id}"
    lines = [f"# FP32 vs FP16 vs INT8, ONNX Runtime CPU ({out['model']}, {out['imgsz'][0]}x{out['imgsz'][1]}, batch 1)",
             "", f"Date {out['date']}. Machine: {out['device']['summary']}; onnxruntime {v.get('onnxruntime')}, "
             f"onnx {v.get('onnx')}, torch {v.get('torch')}, modelopt {v.get('modelopt', '-')}, python "
             f"{v.get('python')}. The CPU is shared with other jobs: latencies are noisy.", "",
             "Three disjoint splits (no image in two of them, checked by content):",
             f"- calibrate: {s['calibrate']['images']} images, `{gen.format(**s['calibrate'])} --bg-dir <official "
             "inference/images>`",
             f"- tune: the {s['tune']['n']} stored images of `{s['tune']['path']}` (seed 2000): defaults chosen "
             "here and on a second tune split (`--split tune --n 300 --seed 4000 --start-id 400001`; figures in "
             "exporter/precision/calibrate.py); the --int8-max-drop run measures its budget on the 200",
             f"- report: {s['report']['images']} images, `{gen.format(**s['report'])} --bg-dir <official "
             "inference/images>`: used only for the figures below", "",
             f"mAP: conf 0.001, IoU 0.65, multi-label, 300 det. Latency: median (p90) of {out['runs']} runs after "
             f"{out['warmup']} warm-up runs, model only.", "",
             "| variant | report mAP50-95 | mAP50 | drop AP | tune mAP50-95 (drop) | latency ms p50 (p90) | "
             "size MB | notes |", "|---|---|---|---|---|---|---|---|"]
    for name, r in out["results"].items():
        rep, notes = r["report"], ""
        if "method" in rep:
            notes = f"calibration {rep['n_images']} images in {rep['calibration_seconds']} s"
            if rep.get("float_convs"):
                notes += f"; {len(rep['float_convs'])} conv(s) in FP16"
            if "recovery" in rep:
                rec = rep["recovery"]
                notes = (f"budget {rec['budget_ap']} AP on tune: {len(rec['excluded_layers'])} conv(s) moved back to "
                         f"FP16, {len(rec['steps'])} mAP evaluation(s), {rec['seconds']} s")
            pl = r.get("placement", {})
            notes += (f"; placement: {pl.get('mismatched_concats')} mismatched Concats, {pl.get('mismatched_pools')} "
                      f"pools, {pl.get('fp32_compute')} FP32 nodes outside decode")
        lines.append(f"| {name} | {r['map50_95']:.2f} | {r['map50']:.2f} | {r['drop_ap']:+.2f} | "
                     f"{r['tune_map50_95']:.2f} ({r['tune_drop_ap']:+.2f}) | {r['latency_ms_p50']:.2f} "
                     f"({r['latency_ms_p90']:.2f}) | {r['bytes'] / 1e6:.1f} | {notes} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
