"""NMS inside the graph vs on the host, ONNX Runtime CPU: the portable tail, the onnx tail, host numpy NMS.

What is measured, all in this run on this machine (one thread for ONNX Runtime, shared machine: noisy):
  tail alone   the NMS tail on a raw-prediction graph (``output = Identity(images)``, 80 classes) fed with
               clustered synthetic predictions (~1-2 % confident anchors, COCO-like), N = 6300 and 25200
               anchors (320 and 640 input), batch 1 and 8. Host: ``runtimes.nms_reference.non_max_suppression``
               on the same array (what yolo7-detect runs for a raw-output artifact).
  end to end   the trained yolov7-tiny-shapes model (5 classes) at 320 (N = 6300) and 640 (N = 25200) on
               letterboxed shapes images, batch 1 and 8: raw graph + host NMS vs the graph with each tail.
Settings: multi-label, conf 0.25, IoU 0.45, 100 detections, portable candidate cap 1024 (the defaults).
Latency: median (p90) of --runs runs after 3 warm-up runs. Ratios are portable / other, in this run.
Run:  python benchmarks/nms_cpu.py [--runs 20]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.artifacts import write_bytes_atomic, write_json_atomic  # noqa: E402
from exporter.check.environment import describe_device, report_versions  # noqa: E402
from exporter.evaluation.latency import warm_and_time  # noqa: E402
from exporter.nms_tail import append_nms  # noqa: E402
from exporter.onnx_export import ExportConfig, export_onnx, finalize  # noqa: E402
from exporter.options import NmsOptions  # noqa: E402
from exporter.pipeline import load_fused  # noqa: E402
from runtimes.contract import ModelInfo  # noqa: E402
from runtimes.nms_reference import non_max_suppression  # noqa: E402
from runtimes.preprocess import preprocess, read_image  # noqa: E402

CKPT = ROOT / "tests/data/yolov7-tiny-shapes.pt"
IMAGES = ROOT / "tests/data/shapes/images/val"
CONF, IOU, TOPK = 0.25, 0.45, 100
TAILS = ("portable", "onnx")


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def raw_graph(nc: int, anchors: int) -> onnx.ModelProto:
    shape = ["batch", anchors, 5 + nc]
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "raw",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return finalize(model, ModelInfo(names=[f"c{i}" for i in range(nc)], stride=[8.0, 16.0, 32.0], imgsz=(640, 640),
                                     batch=None))


def synthetic(rng: np.random.Generator, batch: int, anchors: int, nc: int) -> np.ndarray:
    """Objects as clusters of anchors; most anchors background (low objectness), like a trained detector."""
    pred = np.zeros((batch, anchors, 5 + nc), np.float32)
    side = 320 if anchors <= 6300 else 640
    for b in range(batch):
        k = int(rng.integers(5, 25))
        centers, sizes = rng.uniform(0, side, (k, 2)), rng.uniform(10, side / 3, (k, 2))
        which = rng.integers(0, k, anchors)
        pred[b, :, :2] = centers[which] + rng.normal(0, 4, (anchors, 2))
        pred[b, :, 2:4] = sizes[which] * rng.lognormal(0, 0.1, (anchors, 2))
        pred[b, :, 4] = rng.beta(0.25, 12.0, anchors)
        pred[b, :, 5:] = rng.beta(0.2, 6.0, (anchors, nc))
        obj_cls = rng.integers(0, nc, k)
        pred[b, np.arange(anchors), 5 + obj_cls[which]] = rng.beta(8.0, 1.5, anchors)
    return pred


def timed(fn, runs: int) -> dict:
    t = warm_and_time(fn, runs, 3)
    return {"p50_ms": t["p50"], "p90_ms": t["p90"]}


def host_nms(raw: np.ndarray):
    return non_max_suppression(raw, CONF, IOU, multi_label=True, max_det=TOPK)


def tail_alone(runs: int) -> list[dict]:
    rows = []
    for anchors in (6300, 25200):
        raw = raw_graph(80, anchors)
        sessions = {t: session(append_nms(raw, NmsOptions(mode=t, conf=CONF, iou=IOU, topk=TOPK), 80)) for t in TAILS}
        for batch in (1, 8):
            pred = synthetic(np.random.default_rng(anchors + batch), batch, anchors, 80)
            row = {"part": "tail alone", "anchors": anchors, "batch": batch, "classes": 80,
                   "candidates_per_image": float(np.mean([(p[:, 5:] * p[:, 4:5] > CONF).sum() for p in pred]))}
            host = host_nms(pred)
            for t, s in sessions.items():
                num = s.run(["num_dets"], {"images": pred})[0]
                assert [int(n) for n in num[:, 0]] == [min(len(h), TOPK) for h in host], t  # same work done
                row[t] = timed(lambda s=s: s.run(None, {"images": pred}), runs)
            row["host"] = timed(lambda: host_nms(pred), runs)
            rows.append(row)
            print(row, flush=True)
    return rows


def end_to_end(runs: int) -> list[dict]:
    rows = []
    ckpt, model = load_fused(CKPT)
    paths = sorted(IMAGES.glob("*.jpg"))[:8]
    for side in (320, 640):
        info = ModelInfo(names=ckpt.names, stride=ckpt.stride, imgsz=(side, side), batch=None)
        raw = export_onnx(model, info, ExportConfig(imgsz=(side, side), dynamic_batch=True))
        nc = len(ckpt.names)
        raw_sess = session(raw)
        sessions = {t: session(append_nms(raw, NmsOptions(mode=t, conf=CONF, iou=IOU, topk=TOPK), nc)) for t in TAILS}
        for batch in (1, 8):
            x = preprocess([read_image(p) for p in paths[:batch]], (side, side))[0]
            anchors = raw_sess.run(None, {"images": x})[0].shape[1]
            row = {"part": "end to end", "anchors": anchors, "batch": batch, "classes": nc}
            for t, s in sessions.items():
                row[t] = timed(lambda s=s: s.run(None, {"images": x}), runs)
            row["host"] = timed(lambda: host_nms(raw_sess.run(None, {"images": x})[0]), runs)
            row["raw graph only"] = timed(lambda: raw_sess.run(None, {"images": x}), runs)
            rows.append(row)
            print(row, flush=True)
    return rows


def markdown(rows: list[dict], device: dict, versions: dict, runs: int) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# NMS inside the graph vs on the host, ONNX Runtime CPU",
        "",
        f"Run {date} with `python benchmarks/nms_cpu.py --runs {runs}`. Machine: {device['summary']}; "
        f"onnxruntime {versions.get('onnxruntime', '?')} with 1 intra-op thread. The CPU is shared with other jobs: "
        "latencies are noisy, ratios come from the same run.",
        f"Settings: multi-label, conf {CONF}, IoU {IOU}, {TOPK} detections, portable candidate cap 1024. "
        "Median (p90) ms of the call; host = `non_max_suppression` in numpy on the raw output "
        "(end to end: raw graph + host NMS).",
        "",
        "| part | anchors | batch | classes | portable ms | onnx ms | host ms | portable / onnx | portable / host |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, o, h = r["portable"]["p50_ms"], r["onnx"]["p50_ms"], r["host"]["p50_ms"]
        fmt = lambda d: f"{d['p50_ms']:.1f} ({d['p90_ms']:.1f})"  # noqa: E731
        lines.append(f"| {r['part']} | {r['anchors']} | {r['batch']} | {r['classes']} | {fmt(r['portable'])} | "
                     f"{fmt(r['onnx'])} | {fmt(r['host'])} | {p / o:.2f} | {p / h:.2f} |")
    raw_only = [r for r in rows if "raw graph only" in r]
    if raw_only:
        lines += ["", "Raw graph alone (no NMS) in the end-to-end rows: " + ", ".join(
            f"N={r['anchors']} batch {r['batch']}: {r['raw graph only']['p50_ms']:.1f} ms" for r in raw_only) + "."]
    cands = [r for r in rows if "candidates_per_image" in r]
    if cands:
        lines += ["", "Candidates (anchor, class) above --conf per image in the tail-alone inputs: " + ", ".join(
            f"N={r['anchors']} batch {r['batch']}: {r['candidates_per_image']:.0f}" for r in cands) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    rows = tail_alone(args.runs) + end_to_end(args.runs)
    device, versions = describe_device(threads=1), report_versions()
    write_json_atomic(args.out / "nms_cpu.json", {"rows": rows, "device": device, "versions": versions,
                                                 "runs": args.runs})
    write_bytes_atomic(args.out / "nms_cpu.md", markdown(rows, device, versions, args.runs).encode())


if __name__ == "__main__":
    main()
