"""`yolo7-export`: official YOLOv7 checkpoint -> checked ONNX / TensorRT engine, in one command."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from .errors import UserError
from .options import CalibOptions, CheckOptions, ExportOptions, NmsOptions, TrtOptions

EPILOG = """\b
Examples:
  yolo7-export best.pt                          # fused FP32 ONNX, raw output, 640x640
  yolo7-export best.pt --img 384 640 --nms onnx # rectangular input, NMS inside the graph (any runtime)
  yolo7-export best.pt --fp16 --dynamic-batch   # FP16 ONNX, batch chosen at run time
  yolo7-export best.pt --int8 --calib images/   # INT8 Q/DQ calibrated on your images (CPU)
  yolo7-export best.pt --trt --fp16             # + TensorRT engine (GPU host with TensorRT 10/11)
Outputs go to --out (default ./out): <name>[.fp16|.int8].onnx, .engine + .engine.json, manifest.json.
"""


def run_cli(fn, debug: bool) -> None:
    """Run a command body: user errors become one line and exit 2; bugs one line and exit 1."""
    try:
        fn()
    except UserError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        if debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


def parse_imgsz(value: str | None, hint: str = "--img") -> tuple[int, int] | None:
    """'640' -> (640, 640); '384,640' / '384x640' -> (384, 640) as (H, W)."""
    if value is None:
        return None
    parts = [p for p in re.split(r"[,x ]+", value.strip()) if p]
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise click.BadParameter(f"expected H or H W (e.g. 640 or 384 640), got {value!r}", param_hint=hint)
    h = int(parts[0])
    return h, int(parts[-1])


def join_img_args(argv: list[str]) -> list[str]:
    """Let `--img H W` work (click options take a fixed number of values): join two numbers after --img."""
    out, i = [], 0
    while i < len(argv):
        pair = argv[i + 1:i + 3]
        if argv[i] in ("--img", "--imgsz", "--min-img", "--max-img") and len(pair) == 2 and all(p.isdigit() for p in pair):
            out += [argv[i], ",".join(pair)]
            i += 3
        else:
            out.append(argv[i])
            i += 1
    return out


def _unit_interval(ctx, param, value):
    if value is not None and not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"must be within [0, 1], got {value}")
    return value


def _positive(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}")
    return value


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("out"), show_default=True,
              help="Output folder; files are named after the checkpoint.")
@click.option("--img", "--imgsz", "img", metavar="H [W]", default=None,
              help="Network input size; a multiple of the max stride (32, or 64 for P6). Default 640 (1280 for P6).")
@click.option("--batch", type=int, default=1, show_default=True, callback=_positive,
              help="Fixed batch size (or the optimal batch with --dynamic-batch).")
@click.option("--dynamic-batch", is_flag=True, help="Batch dimension chosen at run time.")
@click.option("--dynamic", is_flag=True, help="Batch, height and width chosen at run time (multiples of the max stride); "
                                               "--img is the optimum, --min-img/--max-img the range.")
@click.option("--min-img", metavar="H [W]", default=None, help="(--dynamic) Smallest input size [default: half of --img].")
@click.option("--max-img", metavar="H [W]", default=None, help="(--dynamic) Largest input size [default: --img].")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--simplify/--no-simplify", default=True, show_default=True, help="Constant-fold and clean the graph (onnxslim).")
@click.option("--nms", type=click.Choice(["auto", "none", "efficient", "onnx", "portable"]), default="auto",
              show_default=True,
              help="NMS tail: portable = exact greedy NMS from standard ops (TensorRT 10/11/RTX, any ONNX runtime, "
                   "returns det_indices); efficient = TensorRT EfficientNMS_TRT plugin; onnx = standard "
                   "NonMaxSuppression (ONNX runtimes, TensorRT 10/11); none = raw [B,N,5+nc] output. auto = portable "
                   "for TensorRT-RTX or --version-compatible, efficient for other --trt builds, else none.")
@click.option("--conf", type=float, default=0.25, show_default=True, callback=_unit_interval, help="NMS score threshold.")
@click.option("--iou", type=float, default=0.45, show_default=True, callback=_unit_interval, help="NMS IoU threshold.")
@click.option("--topk", type=int, default=100, show_default=True, callback=_positive, help="Max detections per image.")
@click.option("--agnostic", is_flag=True, help="Class-agnostic NMS (boxes of different classes suppress each other).")
@click.option("--best-class", is_flag=True,
              help="(--nms onnx|portable) Keep only each box's best class, like the official NMS.")
@click.option("--nms-candidates", type=click.IntRange(1, 3840), default=1024, show_default=True,
              help="(--nms portable) Pre-NMS cap: when more boxes pass --conf, the highest-scoring ones enter NMS.")
@click.option("--fp16", is_flag=True, help="FP16 weights/compute in the ONNX (FP32 inputs, outputs, box decode).")
@click.option("--int8", is_flag=True, help="INT8 explicit Q/DQ in the ONNX, calibrated on CPU from --calib images.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration images: a folder, a .txt list, or a COCO json (required with --int8).")
@click.option("--calib-images", type=int, default=512, show_default=True, callback=_positive,
              help="Number of calibration images (fewer if the source has fewer).")
@click.option("--calib-method", type=click.Choice(["percentile", "max", "entropy"]), default="percentile", show_default=True,
              help="INT8 range per tensor: 99.999th percentile of |x|, max |x|, or TensorRT-style KL entropy.")
@click.option("--calib-cache", type=click.Path(path_type=Path), default=None,
              help="Calibration result file: reused when it matches the model and images, written otherwise.")
@click.option("--int8-max-drop", type=float, default=None, metavar="AP",
              help="Max mAP50-95 drop (AP points) vs FP32; sensitive layers go back to FP16/FP32 until it holds.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Labelled set (COCO json or images+YOLO labels) for --int8-max-drop and --check.")
@click.option("--trt", is_flag=True, help="Also build a TensorRT engine: TensorRT 10/11 on a GPU host, or TensorRT-RTX "
                                           "(builds without a GPU, for the --trt-arch targets).")
@click.option("--trt-lib", type=click.Choice(["auto", "tensorrt", "rtx"]), default="auto", show_default=True,
              help="Which TensorRT builds the engine; auto = TensorRT 10/11 on a GPU host, else TensorRT-RTX.")
@click.option("--trt-arch", default=None, metavar="LIST",
              help="(TensorRT-RTX) Target compute capabilities, e.g. sm86,sm89,sm120 or all "
                   "[default: this GPU, else sm80,sm86,sm89,sm120].")
@click.option("--max-batch", type=int, default=None, callback=_positive,
              help="(--trt --dynamic-batch) Largest batch of the engine's optimization profile [default: max(--batch, 32)].")
@click.option("--workspace", type=float, default=None, metavar="GiB", help="TensorRT workspace limit.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="TensorRT builder optimization level.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="TensorRT timing cache (loaded and saved).")
@click.option("--version-compatible", is_flag=True, help="Engine runs on later TensorRT versions (lean runtime).")
@click.option("--hardware-compat", type=click.Choice(["none", "ampere+"]), default="none", show_default=True)
@click.option("--check", "do_check", is_flag=True, help="Check the artifacts against PyTorch and write the report.")
@click.option("--max-map-drop", type=float, default=None, metavar="AP", help="(--check) gate: max mAP50-95 drop vs PyTorch.")
@click.option("--max-latency-ms", type=float, default=None, help="(--check) gate: max median latency.")
@click.option("--min-parity-cos", type=float, default=None, help="(--check) gate: min raw-output cosine similarity.")
@click.option("--triton", type=click.Path(path_type=Path), default=None, help="Also write a Triton model repository here.")
@click.option("-v", "--verbose", is_flag=True, help="More log lines.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def export_command(checkpoint, out_dir, img, batch, dynamic_batch, opset, simplify, nms, conf, iou, topk, agnostic,
                   best_class, fp16, int8, calib, calib_images, calib_method, calib_cache, int8_max_drop, data, trt,
                   max_batch, workspace, opt_level, timing_cache, version_compatible, hardware_compat, do_check, max_map_drop,
                   max_latency_ms, min_parity_cos, triton, verbose, debug, dynamic=False, min_img=None, max_img=None,
                   trt_lib="auto", trt_arch=None, nms_candidates=1024):
    """Export an official YOLOv7 checkpoint (tiny, v7, X, W6, E6, D6, E6E; training or deploy form) to a
    fused, simplified ONNX, optionally FP16/INT8 and with NMS inside, optionally a TensorRT engine.

    The checkpoint is read without running any code from its pickle; the official repository is not needed.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    imgsz = parse_imgsz(img)  # outside run_cli: click reports a bad value as a usage error (exit 2)
    min_imgsz, max_imgsz = parse_imgsz(min_img, "--min-img"), parse_imgsz(max_img, "--max-img")

    def body():
        if fp16 and int8:
            raise UserError("choose one of --fp16 and --int8")
        if best_class and nms not in ("onnx", "portable"):
            raise UserError("--best-class needs --nms onnx or portable (EfficientNMS_TRT is always multi-label)")
        if nms == "portable" and topk > nms_candidates:
            raise UserError(f"--topk {topk} is more than --nms-candidates {nms_candidates}; raise --nms-candidates")
        from .trt_build import check_efficient_nms, parse_arch

        if nms == "efficient":
            check_efficient_nms(conf, iou, topk)
        if (min_imgsz or max_imgsz) and not dynamic:
            raise UserError("--min-img/--max-img need --dynamic")
        if trt_arch is not None and not trt:
            raise UserError("--trt-arch needs --trt")
        arch = parse_arch(trt_arch)
        opts = ExportOptions(
            checkpoint=checkpoint, out_dir=out_dir, imgsz=imgsz, batch=batch, dynamic_batch=dynamic_batch,
            dynamic=dynamic, min_imgsz=min_imgsz, max_imgsz=max_imgsz,
            opset=opset, simplify=simplify, precision="fp16" if fp16 else "int8" if int8 else "fp32",
            nms=NmsOptions(mode=nms, conf=conf, iou=iou, topk=topk, agnostic=agnostic, best_class=best_class,
                           candidates=nms_candidates),
            calib=CalibOptions(source=calib, num_images=calib_images, method=calib_method, cache=calib_cache,
                               max_drop=int8_max_drop, eval_data=data),
            trt=TrtOptions(enabled=trt, max_batch=max_batch, workspace_gib=workspace, opt_level=opt_level, timing_cache=timing_cache,
                           version_compatible=version_compatible, lib=trt_lib, arch=arch,
                           hardware_compat=None if hardware_compat == "none" else hardware_compat),
            check=CheckOptions(enabled=do_check, data=data, max_map_drop=max_map_drop, max_latency_ms=max_latency_ms,
                               min_parity_cos=min_parity_cos),
            triton=triton,
        )
        from .pipeline import run

        result = run(opts)
        click.echo(f"done: {result.onnx_path}" + (f", {result.engine_path}" if result.engine_path else "")
                   + f" (manifest: {result.manifest_path})")

    run_cli(body, debug)


def invoke(command: click.Command, prog_name: str, argv: list[str] | None) -> None:
    """The body of every console script: `--img H W` support, then click (shared by all three commands)."""
    command.main(args=join_img_args(list(sys.argv[1:] if argv is None else argv)), prog_name=prog_name)


def main(argv: list[str] | None = None) -> None:
    invoke(export_command, "yolo7-export", argv)


if __name__ == "__main__":  # pragma: no cover
    main()
