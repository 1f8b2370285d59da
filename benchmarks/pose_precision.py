"""Keypoint accuracy of FP16 and INT8 pose graphs against FP32 (ONNX Runtime, CPU), and which head convs
INT8 should leave in float.

Why keypoints need their own look: box centres pass through a sigmoid (``(2*sigmoid(t) - 0.5 + g) * s``), whose
slope is at most 1/2, but keypoint x/y use the raw conv output (``(2*t - 0.5 + g) * s``), so an error e in
the keypoint conv's output moves the keypoint by 2*e*stride px: 128*e px on the stride-64 level.

Protocol: three disjoint generated stick-figure sets (tests/pose_data.py): calibration (seed 101), held-out
evaluation (seed 202). The pose fixture's own image is added to the evaluation images. Rows compared: those the
FP32 graph scores above 0.25 (obj*cls), i.e. what NMS would see. Errors in input pixels.

Variants: fp16; int8 as the pipeline builds it (``exporter.precision.int8.quantize_int8``, the public entry);
int8 with the keypoint output convs in float; int8 with every head output conv (det + keypoint) in float. The
variants use the same calibration through ``QdqBuilder`` (measurement only; the pipeline uses quantize_int8).

    python benchmarks/pose_precision.py [--fixture NAME] [--img H W]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default="dev_yolov7-w6-pose_w00625")
    ap.add_argument("--img", type=int, nargs=2, default=(256, 448))
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort

    from exporter.options import CalibOptions, ExportOptions
    from exporter.pipeline import run
    from exporter.precision.calib_data import resolve_images
    from exporter.precision.calibrate import calibrate
    from exporter.precision.graph import head_convs
    from exporter.precision.int8 import QdqBuilder
    from pose_data import make_pose_set
    from runtimes.metadata import read_info
    from runtimes.preprocess import preprocess, read_image

    ckpt = ROOT / "tests" / "data" / "pose" / f"{args.fixture}.pt"
    imgsz = tuple(args.img)
    tmp = Path(tempfile.mkdtemp(prefix="pose_prec_"))
    calib_set = make_pose_set(tmp / "calib", n_images=args.images, size=imgsz, seed=101)
    eval_set = make_pose_set(tmp / "eval", n_images=args.images, size=imgsz, seed=202)
    fixture = np.load(ROOT / "tests" / "data" / "pose" / f"{args.fixture}.npz")
    images = [read_image(p) for p in sorted(eval_set.images_dir.iterdir())]
    batch, _ = preprocess(images, imgsz)
    if tuple(fixture["image_u8"].shape[2:]) == imgsz:
        batch = np.concatenate([batch, fixture["image_u8"].astype(np.float32) / 255])

    def export(precision: str) -> onnx.ModelProto:
        opts = ExportOptions(checkpoint=ckpt, out_dir=tmp / precision, imgsz=imgsz, precision=precision,
                             dynamic_batch=True,
                             calib=CalibOptions(source=calib_set.images_dir, num_images=args.images))
        t0 = time.perf_counter()
        path = run(opts).onnx_path
        print(f"export {precision}: {time.perf_counter() - t0:.1f} s", flush=True)
        return onnx.load(str(path))

    def infer(proto: onnx.ModelProto) -> np.ndarray:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {"images": batch[i:i + 1]})[0] for i in range(len(batch))])

    fp32 = export("fp32")
    ref = infer(fp32)
    info = read_info(fp32)
    nkpt, nc = info.nkpt, info.nc
    k0 = 5 + nc
    rows = (ref[..., 4] * ref[..., 5:k0].max(-1)) > 0.25
    kx = [k0 + 3 * j for j in range(nkpt)]
    ky = [k0 + 3 * j + 1 for j in range(nkpt)]
    kv = [k0 + 3 * j + 2 for j in range(nkpt)]

    def stats(out: np.ndarray) -> str:
        r, o = ref[rows], out[rows]
        kerr = np.hypot(o[:, kx] - r[:, kx], o[:, ky] - r[:, ky])
        berr = np.abs(o[:, :2] - r[:, :2]).max(-1)
        return (f"rows {rows.sum():4d} | keypoint px max {kerr.max():8.3f} mean {kerr.mean():7.3f} | "
                f"box centre px max {berr.max():7.3f} mean {berr.mean():6.3f} | "
                f"visibility max {np.abs(o[:, kv] - r[:, kv]).max():.4f} | score max {np.abs(o[:, 4] - r[:, 4]).max():.4f}")

    results = {"fp16": stats(infer(export("fp16"))), "int8 (pipeline default)": stats(infer(export("int8")))}
    builder = QdqBuilder(fp32, info)
    cal = calibrate(fp32, resolve_images(calib_set.images_dir, args.images), "percentile", imgsz, 1,
                    builder.tensors, None)
    builder.calibration = cal
    heads = [c for c in head_convs(fp32) if c in builder.convs]
    kpt_heads = [c for c in heads if "m_kpt" in c]
    results["int8, keypoint output convs float"] = stats(infer(builder.build(kpt_heads)))
    results["int8, all head output convs float"] = stats(infer(builder.build(heads)))
    branch = [c for c in builder.convs if "m_kpt" in c]
    results["int8, whole keypoint branch float"] = stats(infer(builder.build(branch)))
    results["int8, every conv excluded (non-conv Q/DQ stay)"] = stats(infer(builder.build(list(builder.convs))))

    import exporter.precision.fp16 as fp16_mod  # measurement only: AutoCast with the keypoint convs kept FP32

    decode = fp16_mod.decode_nodes
    fp16_mod.decode_nodes = lambda proto: decode(proto) + [c for c in head_convs(proto) if "m_kpt" in c]
    try:
        results["fp16, keypoint output convs FP32"] = stats(infer(fp16_mod.convert_fp16(fp32)))
    finally:
        fp16_mod.decode_nodes = decode
    print(f"\n{args.fixture} @ {imgsz[0]}x{imgsz[1]}, {len(batch)} eval images; head convs: {heads}")
    for name, line in results.items():
        print(f"{name:36s} {line}")


if __name__ == "__main__":
    main()
