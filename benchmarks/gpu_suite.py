"""The GPU checks in one command, for any machine with an NVIDIA GPU (and, for its TensorRT part, TensorRT 10/11).

    python benchmarks/gpu_suite.py                      # fixtures checkpoint, FP32/FP16/INT8, batch 1 and 32
    python benchmarks/gpu_suite.py --dry-run            # only say what would run here and what is skipped, and why

What it does, on the trained fixture checkpoint and the shapes validation images:
1. exports FP32 / FP16 / INT8 ONNX with ``exporter.pipeline.run`` (raw output, dynamic batch; INT8 calibrated on
   the images), and checks each in ONNX Runtime (CPU) against the PyTorch FP32 CPU reference;
2. PyTorch on CUDA (fused model; FP32, and FP16 autocast): parity against the CPU reference and latency;
3. TensorRT: one engine per precision and batch size (profile opt = max = batch), parity against the same
   reference and against ONNX Runtime of the same precision, latency of the engine alone and with CUDA graphs.
Latency: CUDA events around the device work only (input already on the GPU), median of ``--runs`` after
``--warmup``. Parts that cannot run here are skipped with the reason in the results, never faked.
Writes ``results.json`` and ``results.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DEFAULT_CKPT = ROOT / "tests" / "data" / "yolov7-tiny-shapes.pt"
DEFAULT_IMAGES = ROOT / "tests" / "data" / "shapes" / "images" / "val"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="images for parity, timing and INT8 calibration")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gpu-<date>")
    p.add_argument("--img", type=int, default=320, help="square network input size")
    p.add_argument("--precisions", default="fp32,fp16,int8")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--calib-images", type=int, default=200)
    p.add_argument("--dry-run", action="store_true", help="report what would run and what is skipped, then stop")
    a = p.parse_args(argv)
    a.precisions = [s for s in a.precisions.split(",") if s]
    bad = [s for s in a.precisions if s not in ("fp32", "fp16", "int8")]
    if bad:
        p.error(f"--precisions: unknown {bad}; choose from fp32, fp16, int8")
    try:
        a.batches = [int(s) for s in a.batches.split(",") if s]
    except ValueError:
        p.error(f"--batches: expected comma-separated integers, got {a.batches!r}")
    if not a.batches or min(a.batches) < 1 or a.runs < 1 or a.warmup < 0:
        p.error("--batches must be >= 1, --runs >= 1, --warmup >= 0")
    for path in (a.checkpoint, a.images):
        if not path.exists():
            p.error(f"not found: {path}")
    a.out = a.out or ROOT / "benchmarks" / "results" / f"gpu-{dt.date.today().isoformat()}"
    return a


def environment() -> dict:
    """What this machine can run: the skip reasons are part of the results."""
    import torch

    from exporter.artifacts import versions
    from runtimes import trt_env

    env = {"date": dt.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "versions": versions()}
    if torch.cuda.is_available():
        env["cuda"] = {"available": True, "gpu": torch.cuda.get_device_name(0),
                       "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    else:
        env["cuda"] = {"available": False, "reason": "no CUDA GPU visible to PyTorch (CPU build of torch, or no GPU)"}
    reason = trt_env.unavailable_reason()
    if reason is None:
        import tensorrt

        env["tensorrt"] = {"available": True, "version": tensorrt.__version__}
    else:
        env["tensorrt"] = {"available": False, "reason": reason}
    return env


def load_batch(images: Path, imgsz: int, n: int) -> np.ndarray:
    from runtimes.preprocess import list_images, preprocess, read_image

    paths = list_images(images)[:n]
    if not paths:
        raise SystemExit(f"error: no images in {images}")
    paths = [paths[i % len(paths)] for i in range(n)]
    return preprocess([read_image(p) for p in paths], (imgsz, imgsz))[0]


def cuda_latency(fn, stream, runs: int, warmup: int) -> dict:
    """Median device time of ``fn`` (which only queues work on ``stream``), with CUDA events: the same clock as
    the harness's TensorRT latency (exporter.evaluation.latency.device_times / engine_latency)."""
    from exporter.evaluation.latency import device_times

    ms = np.asarray(device_times(fn, stream, runs, warmup)) * 1000.0
    return {"median_ms": round(float(np.median(ms)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "min_ms": round(float(ms.min()), 4), "runs": runs}


def export_all(args, out: Path, results: dict) -> dict:
    from exporter.options import CalibOptions, ExportOptions, NmsOptions
    from exporter.pipeline import run

    made = {}
    for precision in args.precisions:
        t0 = time.perf_counter()
        opts = ExportOptions(checkpoint=args.checkpoint, out_dir=out / "artifacts", imgsz=(args.img, args.img),
                             batch=1, dynamic_batch=True, precision=precision, nms=NmsOptions(mode="none"),
                             calib=CalibOptions(source=args.images, num_images=args.calib_images,
                                                cache=out / "artifacts" / "calib.cache"))
        made[precision] = run(opts)
        results["exports"][precision] = {"onnx": made[precision].onnx_path.name,
                                         "seconds": round(time.perf_counter() - t0, 1)}
        print(f"exported {precision}: {made[precision].onnx_path}", flush=True)
    return made


def torch_cuda_part(args, reference: dict, batches: dict, results: dict) -> None:
    import torch

    from exporter.evaluation.parity import compare_raw
    from exporter.pipeline import load_fused

    _, model = load_fused(args.checkpoint)
    model = model.cuda().eval()
    stream = torch.cuda.current_stream()
    for mode in ("fp32", "fp16_autocast"):
        for b, x in batches.items():
            xt = torch.from_numpy(x).cuda()

            def fwd(xt=xt, mode=mode):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=mode != "fp32"):
                    return model(xt)

            out = fwd().float().cpu().numpy()
            key = f"pytorch_cuda_{mode}_b{b}"
            results["parity"][key] = compare_raw(reference[b], out)
            results["latency"][key] = cuda_latency(fwd, stream, args.runs, args.warmup)
            print(f"{key}: {results['latency'][key]['median_ms']} ms, cosine {results['parity'][key]['cosine']:.6f}",
                  flush=True)


def tensorrt_part(args, made: dict, reference: dict, ort_out: dict, batches: dict, out: Path, results: dict) -> None:
    from exporter.evaluation.parity import compare_raw
    from exporter.options import TrtOptions
    from exporter.trt_build import build_engine
    from runtimes.contract import RAW_OUTPUT
    from runtimes.trt_backend import TrtBackend

    cache = out / "artifacts" / "timing.cache"
    for precision, made_p in made.items():
        for b, x in batches.items():
            engine = made_p.onnx_path.with_name(f"{made_p.onnx_path.stem}.b{b}.engine")
            build = build_engine(made_p.onnx_path, engine, made_p.info,
                                 TrtOptions(enabled=True, opt_batch=b, max_batch=b, timing_cache=cache), batch=b,
                                 dynamic=True)
            results["builds"][f"{precision}_b{b}"] = {"engine": engine.name, "seconds": round(build.total_s, 1),
                                                      "trtexec": build.trtexec_command}
            for graph in (False, True):
                backend = TrtBackend(engine, cuda_graph=graph)
                key = f"tensorrt_{precision}_b{b}" + ("_cudagraph" if graph else "")
                got = backend.infer(x)[RAW_OUTPUT].astype(np.float32)
                results["parity"][key] = compare_raw(reference[b], got)
                results["parity"][key + "_vs_ort"] = compare_raw(ort_out[(precision, b)], got)
                results["latency"][key] = cuda_latency(lambda: backend.enqueue(b), backend.stream, args.runs,
                                                       args.warmup)
                print(f"{key}: {results['latency'][key]['median_ms']} ms, cosine vs PyTorch "
                      f"{results['parity'][key]['cosine']:.6f}", flush=True)


def write_results(results: dict, out: Path) -> None:
    from exporter.artifacts import write_bytes_atomic, write_json_atomic

    write_json_atomic(out / "results.json", results)
    env = results["environment"]
    lines = [f"# GPU suite: {env['cuda'].get('gpu', 'no GPU')}, {env['date']}", "",
             f"torch {env['torch']} (CUDA {env['torch_cuda']}); TensorRT "
             f"{env['tensorrt'].get('version') or 'skipped: ' + env['tensorrt']['reason']}", ""]
    for part, why in results["skipped"].items():
        lines.append(f"* **{part} skipped**: {why}")
    if results["latency"]:
        lines += ["", "| run | median ms | p90 ms | images/s |", "|---|---:|---:|---:|"]
        for key, lat in results["latency"].items():
            b = int(key.rsplit("_b", 1)[1].split("_")[0])
            lines.append(f"| {key} | {lat['median_ms']:.3f} | {lat['p90_ms']:.3f} | {1000 * b / lat['median_ms']:.0f} |")
    if results["parity"]:
        lines += ["", "| parity vs PyTorch FP32 CPU | cosine | box max abs (px) | score max abs |", "|---|---:|---:|---:|"]
        for key, p in results["parity"].items():
            lines.append(f"| {key} | {p['cosine']:.6f} | {p['box_max_abs']:.3f} | {p['score_max_abs']:.4f} |")
    write_bytes_atomic(out / "results.md", ("\n".join(lines) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    results = {"environment": env, "config": {k: str(v) for k, v in vars(args).items()}, "skipped": {},
               "exports": {}, "builds": {}, "parity": {}, "latency": {}}
    if not env["cuda"]["available"]:
        results["skipped"]["PyTorch CUDA"] = env["cuda"]["reason"]
    if not env["tensorrt"]["available"]:
        results["skipped"]["TensorRT"] = env["tensorrt"]["reason"]
    print(f"PyTorch CUDA: {env['cuda'].get('gpu') or 'skipped (' + env['cuda'].get('reason', '') + ')'}")
    print(f"TensorRT: {env['tensorrt'].get('version') or 'skipped (' + env['tensorrt']['reason'] + ')'}", flush=True)
    out = Path(args.out)
    if args.dry_run:
        from exporter.artifacts import write_json_atomic

        write_json_atomic(out / "plan.json", results)
        print(f"dry run: nothing exported; plan written to {out / 'plan.json'}")
        return 0

    from exporter.evaluation.parity import compare_raw
    from exporter.pipeline import load_fused
    from runtimes.contract import RAW_OUTPUT
    from runtimes.onnx_backend import OnnxBackend

    import torch

    batches = {b: load_batch(args.images, args.img, b) for b in args.batches}
    _, cpu_model = load_fused(args.checkpoint)
    with torch.inference_mode():
        reference = {b: cpu_model(torch.from_numpy(x)).numpy() for b, x in batches.items()}
    made = export_all(args, out, results)
    ort_out = {}
    for precision, made_p in made.items():
        ort = OnnxBackend(made_p.onnx_path)
        for b, x in batches.items():
            ort_out[(precision, b)] = ort.infer(x)[RAW_OUTPUT].astype(np.float32)
            results["parity"][f"onnxruntime_cpu_{precision}_b{b}"] = compare_raw(reference[b], ort_out[(precision, b)])
    if env["cuda"]["available"]:
        torch_cuda_part(args, reference, batches, results)
    if env["tensorrt"]["available"]:
        tensorrt_part(args, made, reference, ort_out, batches, out, results)
    write_results(results, out)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    from exporter.errors import UserError

    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
