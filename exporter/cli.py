"""`yolo7-export`: official YOLOv7 checkpoint -> checked ONNX / TensorRT engine, in one command."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from runtimes.cli_common import invoke, join_img_args, parse_imgsz, run_cli  # noqa: F401 - shared by the CLIs
from runtimes.contract import HARDWARE_COMPAT, NMS_MODES
from runtimes.cli_common import positive as _positive, unit_interval as _unit_interval

from .errors import UserError
from .options import CalibOptions, CheckOptions, ExportOptions, NmsOptions, TrtOptions

EPILOG = """\b
Examples:
  yolo7-export best.pt                          # fused FP32 ONNX, raw output, 640x640
  yolo7-export best.pt --img 384 640 --nms onnx # rectangular input, NMS inside the graph (any runtime)
  yolo7-export best.pt --nms portable --best-class  # exact NMS in the graph, every TensorRT + ONNX runtime
  yolo7-export best.pt --fp16 --dynamic-batch   # FP16 ONNX, batch chosen at run time
  yolo7-export best.pt --int8 --calib images/   # INT8 Q/DQ calibrated on your images (CPU)
  yolo7-export best.pt --trt --fp16             # + engine: TensorRT-RTX (no GPU needed) or TensorRT 10/11
  yolo7-export yolov7-w6-pose.pt --img 960 --nms portable  # pose: keypoints through NMS (det_kpts)
Outputs go to --out (default ./out): <name>[.fp16|.int8].onnx, .engine + .engine.json, manifest.json;
an artifact there made with other settings is not replaced unless --overwrite (use one -o per setting).
"""


# option -> what it needs; given without it, it would be silently ignored, so it is refused (exit 2)
NEEDS = {"calib": "--int8", "calib_images": "--int8", "calib_method": "--int8", "calib_cache": "--int8",
         "int8_max_drop": "--int8", "max_batch": "--trt", "workspace": "--trt", "opt_level": "--trt",
         "timing_cache": "--trt", "version_compatible": "--trt", "hardware_compat": "--trt", "trt_lib": "--trt",
         "max_map_drop": "--check", "max_latency_ms": "--check", "min_parity_cos": "--check",
         "data": "--check or --int8-max-drop", "conf": "an NMS tail (--nms onnx/efficient/portable, or --trt)",
         "iou": "an NMS tail (--nms onnx/efficient/portable, or --trt)",
         "topk": "an NMS tail (--nms onnx/efficient/portable, or --trt)",
         "agnostic": "an NMS tail (--nms onnx/efficient/portable, or --trt)"}


def refuse_ignored_options(present: dict[str, bool]) -> None:
    """One line and exit 2 for an option typed on the command line that this run would ignore."""
    ctx = click.get_current_context()
    for param in ctx.command.params:
        need = NEEDS.get(param.name or "")
        if need is None or present.get(need, True):
            continue
        if ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE:
            flag = max((o for o in param.opts if o.startswith("--")), key=len)
            raise UserError(f"{flag} has no effect without {need}")


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
@click.option("--nms", type=click.Choice(["auto", *NMS_MODES]), default="auto",
              show_default=True,
              help="NMS tail: portable = exact greedy NMS from standard ops (TensorRT 10/11/RTX, any ONNX runtime, "
                   "returns det_indices); efficient = TensorRT EfficientNMS_TRT plugin; onnx = standard "
                   "NonMaxSuppression (ONNX runtimes, TensorRT 10/11); none = raw [B,N,5+nc] output. auto = portable "
                   "for TensorRT-RTX or --version-compatible, efficient for other --trt builds, else none. Pose "
                   "models: portable or onnx add det_kpts [B,K,nkpt,3] (auto picks portable with --trt).")
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
@click.option("--calib-images", type=int, default=CalibOptions.num_images, show_default=True, callback=_positive,
              help="Number of calibration images (fewer if the source has fewer; 1024 measured better than 512).")
@click.option("--calib-method", type=click.Choice(["percentile", "max", "entropy"]), default="percentile", show_default=True,
              help="INT8 range per tensor: 99.999th percentile of |x|, max |x|, or TensorRT-style KL entropy.")
@click.option("--calib-cache", type=click.Path(path_type=Path), default=None,
              help="Calibration result file: reused when it matches the model and images, written otherwise.")
@click.option("--int8-max-drop", type=float, default=None, metavar="AP",
              help="Max mAP50-95 drop (AP points) vs FP32, measured on --data (which must share no image with "
                   "--calib); sensitive layers go back to FP16 until it holds.")
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
@click.option("--hardware-compat", type=click.Choice(HARDWARE_COMPAT), default="none", show_default=True)
@click.option("--check", "do_check", is_flag=True, help="Check the artifacts against PyTorch and write the report.")
@click.option("--max-map-drop", type=float, default=None, metavar="AP", help="(--check) gate: max mAP50-95 drop vs PyTorch.")
@click.option("--max-latency-ms", type=float, default=None, help="(--check) gate: max median latency.")
@click.option("--min-parity-cos", type=float, default=None, help="(--check) gate: min raw-output cosine similarity.")
@click.option("--triton", type=click.Path(path_type=Path), default=None, help="Also write a Triton model repository here.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing artifact of the same name that was exported with other settings.")
@click.option("--task", type=click.Choice(["auto", "detect", "segment", "pose"]), default="auto", show_default=True,
              help="What the checkpoint must be (auto: whatever it is); another task is refused with one line.")
@click.option("-v", "--verbose", is_flag=True, help="More log lines.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def export_command(checkpoint, out_dir, img, batch, dynamic_batch, opset, simplify, nms, conf, iou, topk, agnostic,
                   best_class, fp16, int8, calib, calib_images, calib_method, calib_cache, int8_max_drop, data, trt,
                   max_batch, workspace, opt_level, timing_cache, version_compatible, hardware_compat, do_check, max_map_drop,
                   max_latency_ms, min_parity_cos, triton, verbose, debug, dynamic=False, min_img=None, max_img=None,
                   trt_lib="auto", trt_arch=None, nms_candidates=1024, overwrite=False, task="auto"):
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
        from .trt_checks import check_efficient_nms, parse_arch

        if nms == "efficient":
            check_efficient_nms(conf, iou, topk)
        if (min_imgsz or max_imgsz) and not dynamic:
            raise UserError("--min-img/--max-img need --dynamic")
        if trt_arch is not None and not trt:
            raise UserError("--trt-arch needs --trt")
        refuse_ignored_options({"--int8": int8, "--trt": trt, "--check": do_check,
                                "--check or --int8-max-drop": do_check or int8_max_drop is not None,
                                "an NMS tail (--nms onnx/efficient/portable, or --trt)": nms not in ("none", "auto") or trt})
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"-o {out_dir} is an existing file; -o names the output folder")
        if nms == "efficient" and not trt:
            logging.getLogger("yolo7_export").warning(
                "note: --nms efficient without --trt writes a graph that only TensorRT can run (EfficientNMS_TRT "
                "plugin); use --nms onnx for ONNX Runtime and other runtimes")
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
                           hardware_compat=hardware_compat),
            check=CheckOptions(enabled=do_check, data=data, max_map_drop=max_map_drop, max_latency_ms=max_latency_ms,
                               min_parity_cos=min_parity_cos),
            triton=triton, overwrite=overwrite, task=task,
        )
        from runtimes.files import scratch_in

        from .pipeline import run

        with scratch_in(out_dir):  # temp folders inside -o: a killed run's are removed by the next one there
            result = run(opts)
        click.echo(f"done: {result.onnx_path}" + (f", {result.engine_path}" if result.engine_path else "")
                   + f" (manifest: {result.manifest_path})")

    run_cli(body, debug)


def main(argv: list[str] | None = None) -> None:
    invoke(export_command, "yolo7-export", argv)


if __name__ == "__main__":  # pragma: no cover
    main()
