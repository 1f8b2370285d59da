"""Export speed and ONNX Runtime CPU latency vs PyTorch eager, full-size yolov7 and yolov7-tiny, in one run.

The architectures come from the cfg embedded in the official-format fixtures (tests/data/official), scaled
back to full width (width_multiple 1.0) with 80 classes; weights are random (no downloads). Latency numbers
don't depend on the weights' values. Reported per model:
  export_s      wall time of fuse + ONNX export + simplify + check (what `yolo7-export` spends after loading)
  onnx_nodes    node count of the simplified graph
  ort_ms        ONNX Runtime CPU median latency (batch 1, 640x640) of our fused ONNX
  torch_ms      PyTorch eager median latency of the *unfused* model (what users run before exporting)
  ratio         ort_ms / torch_ms (target <= 0.6), both measured in this run on this machine
Run:  python benchmarks/export_cpu.py [--runs 30] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.artifacts import versions, write_bytes_atomic, write_json_atomic  # noqa: E402
from exporter.check.environment import cpu_name  # noqa: E402
from exporter.evaluation.latency import warm_and_time  # noqa: E402
from exporter.checkpoint import load_checkpoint  # noqa: E402
from exporter.fuse import fuse_model  # noqa: E402
from exporter.model import BuildSpec, YoloModel  # noqa: E402
from exporter.onnx_export import ExportConfig, export_onnx  # noqa: E402
from runtimes.contract import ModelInfo  # noqa: E402

FIXTURES = {"yolov7": "dev_yolov7_w0125_nc80.pt", "yolov7-tiny": "dev_yolov7-tiny_w050_nc5.pt"}
COCO_ANCHORS = [[[12, 16], [19, 36], [40, 28]], [[36, 75], [76, 55], [72, 146]], [[142, 110], [192, 243], [459, 401]]]
TINY_ANCHORS = [[[10, 13], [16, 30], [33, 23]], [[30, 61], [62, 45], [59, 119]], [[116, 90], [156, 198], [373, 326]]]


def full_size_model(name: str) -> YoloModel:
    cfg = copy.deepcopy(load_checkpoint(ROOT / "tests/data/official" / FIXTURES[name]).yaml)
    cfg.update(width_multiple=1.0, depth_multiple=1.0, nc=80)
    anchors = TINY_ANCHORS if name == "yolov7-tiny" else COCO_ANCHORS
    torch.manual_seed(0)
    model = YoloModel(cfg, BuildSpec(nc=80, anchors_px=anchors, stride=[8.0, 16.0, 32.0]))
    return model.eval()


def median_ms(fn, runs: int, warmup: int = 5) -> tuple[float, float]:
    t = warm_and_time(fn, runs, warmup)
    return t["p50"], t["p90"]


def bench(name: str, runs: int, threads: int) -> dict:
    model = full_size_model(name)
    params = sum(p.numel() for p in model.parameters())
    x = torch.rand(1, 3, 640, 640)
    with torch.no_grad():
        torch_ms, torch_p90 = median_ms(lambda: model(x), runs)
    t0 = time.perf_counter()
    fused = copy.deepcopy(model)
    fuse_model(fused)
    info = ModelInfo(names=[str(i) for i in range(80)], stride=[8.0, 16.0, 32.0], imgsz=(640, 640))
    proto = export_onnx(fused, info, ExportConfig(imgsz=(640, 640)))
    export_s = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    ort_ms, ort_p90 = median_ms(lambda: sess.run(None, {"images": xn}), runs)
    with torch.no_grad():
        err = float(np.abs(sess.run(None, {"images": xn})[0] - model(x).numpy())[..., :4].max())
    return {"model": name, "params_M": round(params / 1e6, 2), "export_s": round(export_s, 2),
            "onnx_nodes": len(proto.graph.node), "onnx_MB": round(proto.ByteSize() / 1e6, 1),
            "ort_ms": round(ort_ms, 1), "ort_p90_ms": round(ort_p90, 1), "torch_ms": round(torch_ms, 1),
            "torch_p90_ms": round(torch_p90, 1), "ratio": round(ort_ms / torch_ms, 3), "max_box_err_px": err}


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(), "versions": versions()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(name, args.runs, args.threads) for name in FIXTURES]
    result = {"benchmark": "export_cpu", "date": time.strftime("%Y-%m-%d"), "runs": args.runs,
              "input": "1x3x640x640", "targets": {"ratio_max": 0.6, "export_s_max_yolov7": 15.0},
              "machine": machine(), "results": rows}
    write_json_atomic(args.out / "export_cpu.json", result)
    lines = [f"# export_cpu ({result['date']}, {result['machine']['cpu']}, {result['machine']['cores']} cores)", "",
             "| model | params (M) | export s | ONNX nodes | ORT ms (p50) | PyTorch eager ms (p50, unfused) | ratio |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params_M']} | {r['export_s']} | {r['onnx_nodes']} | {r['ort_ms']} | {r['torch_ms']} | "
              f"{r['ratio']} |" for r in rows]
    lines += ["", f"Targets: ratio <= 0.6; full yolov7 export <= 15 s. Median of {args.runs} runs after 5 warm-up, "
              f"batch 1, 640x640, {args.threads} threads; random weights, architecture from the embedded cfgs."]
    write_bytes_atomic(args.out / "export_cpu.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
