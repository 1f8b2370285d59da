"""The whole job, one stage after the other: load -> fuse -> export -> precision -> NMS tail -> build -> check.

Each stage is a function in its own module; this file only orders them, names the files and keeps the
manifest. Later stages are imported lazily so that e.g. a plain ONNX export never imports TensorRT.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import onnx

from runtimes.contract import ModelInfo

from . import __version__
from .artifacts import Manifest, invalidate_manifest, refuse_replacing, write_bytes_atomic
from .checkpoint import check_task
from .errors import UserError
from .loading import check_image_size, default_imgsz, load_fused  # noqa: F401 - load_fused re-exported
from .onnx_export import ExportConfig, export_onnx, finalize
from .options import ExportOptions

log = logging.getLogger("yolo7_export")


@dataclass
class PipelineResult:
    onnx_path: Path
    manifest_path: Path
    engine_path: Path | None = None
    info: ModelInfo | None = None
    reports: dict = field(default_factory=dict)



def artifact_stem(opts: ExportOptions) -> str:
    """<checkpoint stem>[.fp16|.int8]: one name per precision, so runs side by side don't collide."""
    stem = opts.checkpoint.stem
    return stem if opts.precision == "fp32" else f"{stem}.{opts.precision}"


def resolve_nms_mode(opts: ExportOptions) -> str:
    """'auto' with an engine: the plugin-free ``portable`` tail for TensorRT-RTX (no plugin library) and for
    ``--version-compatible`` (plugins are not serialized into the engine); EfficientNMS_TRT for other
    TensorRT 10/11 builds: a fused, tuned kernel on the GPU whose cost does not grow with a [cap,cap] IoU
    matrix, with ~5000 candidates instead of the portable cap (on a GPU host, compare the two with
    yolo7-bench). Without an engine: raw output (runs in any ONNX runtime; NMS on the host).
    Reads ``opts.trt.lib`` when present ('rtx' once preflight resolved it).
    """
    if opts.nms.mode == "auto":
        if not opts.trt.enabled:
            return "none"
        if getattr(opts.trt, "lib", "tensorrt") == "rtx" or opts.trt.version_compatible:
            return "portable"
        return "efficient"
    return opts.nms.mode


def run(opts: ExportOptions) -> PipelineResult:
    t0 = time.perf_counter()
    requested_nms = opts.nms.mode
    if opts.trt.enabled:  # fail before minutes of export/calibration if no engine can be built here
        from .trt_checks import preflight

        preflight(opts.trt)  # also resolves opts.trt.lib ('auto' -> 'tensorrt' | 'rtx') for the NMS choice
    nms = replace(opts.nms, mode=resolve_nms_mode(opts))  # the effective NMS settings, a value (opts is not changed)
    if opts.trt.enabled or nms.mode == "efficient":  # plugin limits, RTX / --version-compatible refusals
        from .trt_checks import check_nms

        check_nms(opts.trt, nms.mode, nms.conf, nms.iou, nms.topk)
    if opts.precision == "int8":  # fail at once on a bad --calib, not after export
        from .precision.calib_data import check_source

        check_source(opts.calib.source, opts.calib.num_images)
        if opts.calib.max_drop is not None and opts.calib.eval_data is None:
            raise UserError("--int8-max-drop measures mAP on --data, a labelled set that shares no image with --calib")
    ckpt, model = load_fused(opts.checkpoint)
    check_task(ckpt, opts.task)  # --task detect on a seg checkpoint (and the reverse): one line, nothing written
    if ckpt.task == "segment":  # masks need det_indices: no EfficientNMS_TRT; u7 seg NMS scores obj*cls always
        from .nms_masks import seg_nms_options

        nms = seg_nms_options(nms, requested_nms)
    if ckpt.task == "pose":  # keypoints need det_indices: no EfficientNMS_TRT; the kpt NMS scores obj*cls always
        from .nms_keypoints import pose_nms_options

        nms = pose_nms_options(nms, requested_nms)
    imgsz = check_image_size(opts.imgsz or default_imgsz(ckpt), ckpt.max_stride)
    info = ModelInfo(names=ckpt.names, stride=ckpt.stride, imgsz=imgsz, nms="none", precision="fp32",
                     batch=None if opts.dynamic_batch else opts.batch, source_sha256=ckpt.sha256,
                     tool_version=__version__, task=ckpt.task, nm=ckpt.nm, nkpt=ckpt.nkpt)
    sizes = None
    if opts.dynamic:  # batch, H and W chosen at run time; the range feeds the engine profile and the runtimes
        from .onnx_export import resolve_dynamic_sizes

        sizes = resolve_dynamic_sizes(imgsz, opts.min_imgsz, opts.max_imgsz, ckpt.max_stride)
        info = replace(info, batch=None, dynamic_hw=True, min_imgsz=sizes[0])
    cfg = ExportConfig(imgsz=imgsz, batch=opts.batch, dynamic_batch=opts.dynamic_batch or opts.dynamic,
                       dynamic_size=opts.dynamic, opset=opts.opset, simplify=opts.simplify)
    refuse_replacing(Path(opts.out_dir) / f"{artifact_stem(opts)}.onnx", {  # before minutes of export
        "imgsz": imgsz, "batch": info.batch, "dynamic_hw": info.dynamic_hw, "nms": nms.mode,
        "nms_params": asdict(nms) if nms.mode != "none" else {}, "precision": opts.precision,
        "task": info.task}, getattr(opts, "overwrite", False))
    log.info("exporting %s (%d classes, strides %s) at %dx%d", opts.checkpoint.name, ckpt.nc,
             [int(s) for s in ckpt.stride], *imgsz)
    proto = export_onnx(model, info, cfg)
    manifest = Manifest(input_path=str(opts.checkpoint), input_sha256=ckpt.sha256, flags=_flags(replace(opts, nms=nms)))
    reports: dict = {}

    proto, info = _apply_precision(proto, info, opts, reports)
    if nms.mode != "none":
        from .nms_tail import append_nms

        if info.task == "segment":
            from .nms_masks import append_masks

            proto = append_nms(proto, nms, len(info.names), keep_raw=True)
            proto = append_masks(proto, info.nc, info.nm, None if opts.dynamic else imgsz)
        elif info.task == "pose":
            from .nms_keypoints import append_keypoints

            proto = append_nms(proto, nms, len(info.names), keep_raw=True)
            proto = append_keypoints(proto, info.nc, info.nkpt)
        else:
            proto = append_nms(proto, nms, len(info.names))
        info = replace(info, nms=nms.mode, nms_params=asdict(nms))
    proto = finalize(proto, info)

    out_dir = Path(opts.out_dir)
    onnx_path = out_dir / f"{artifact_stem(opts)}.onnx"
    manifest.previous = invalidate_manifest(out_dir)  # a kill until manifest.write: no manifest, never a stale one
    write_bytes_atomic(onnx_path, proto.SerializeToString())
    manifest.add_output(onnx_path, "onnx", precision=info.precision, nms=info.nms, nodes=len(proto.graph.node))
    log.info("wrote %s (%d nodes, %.1f MB)", onnx_path, len(proto.graph.node), onnx_path.stat().st_size / 1e6)
    result = PipelineResult(onnx_path=onnx_path, manifest_path=out_dir / "manifest.json", info=info, reports=reports)

    if opts.trt.enabled:
        from .trt_build import build_engine

        engine_path = onnx_path.with_suffix(".engine")
        build = build_engine(onnx_path, engine_path, info, opts.trt, batch=opts.batch,
                             dynamic=opts.dynamic_batch or opts.dynamic, sizes=sizes)
        manifest.add_output(engine_path, "tensorrt_engine", precision=info.precision, library=build.library,
                            version=build.tensorrt_version, targets=list(build.targets))
        manifest.add_output(build.sidecar_path, "engine_sidecar")
        manifest.extra["trtexec"] = build.trtexec_command
        result.engine_path = engine_path
    if opts.triton:
        from .triton import write_triton_repository

        repo = write_triton_repository(opts.triton, result.engine_path or onnx_path, info)
        manifest.extra["triton_repository"] = str(repo)
        for path in sorted(f for f in repo.rglob("*") if f.is_file()):
            manifest.add_output(path, "triton", name=_relative(path, out_dir))
        log.info("wrote Triton model %s (%s)", repo, ", ".join(str(f.relative_to(repo)) for f in
                                                             sorted(repo.rglob("*")) if f.is_file()))
    manifest.extra["reports"] = reports
    try:
        if opts.check.enabled:
            _check(opts, result, manifest, reports, (ckpt, model))
    finally:  # the manifest is written even when a CI gate fails
        manifest.extra["seconds"] = round(time.perf_counter() - t0, 2)
        manifest.extra["model"] = asdict(info)  # effective settings (imgsz when --img was omitted, NMS, batch)
        result.manifest_path = manifest.write(out_dir)
    return result


def _check(opts: ExportOptions, result: PipelineResult, manifest: Manifest, reports: dict, loaded: tuple) -> None:
    """--check: the harness on what was just written (PyTorch reference: the model this run loaded and fused,
    not a second load); its report files join the manifest."""
    from .check.harness import check_after_export

    try:
        reports["check"] = check_after_export(opts, result, reference=loaded)
    except UserError as exc:
        reports["check"] = {"passed": False, "error": str(exc)}
        raise
    finally:
        report_dir = Path(reports.get("check", {}).get("report_dir") or Path(opts.out_dir) / "check")
        for path in sorted(report_dir.glob("report.*")) + sorted(report_dir.glob("*.png")):
            manifest.add_output(path, "check_report", name=str(path.relative_to(opts.out_dir)))


def _apply_precision(proto: onnx.ModelProto, info: ModelInfo, opts: ExportOptions,
                     reports: dict) -> tuple[onnx.ModelProto, ModelInfo]:
    """FP16 casts or INT8 Q/DQ written into the raw graph (before the NMS tail, which stays FP32); the graph and
    its ModelInfo, a new value (the raw graph's info is not changed)."""
    if opts.precision == "fp32":
        return proto, info
    if opts.precision == "fp16":
        from .precision.fp16 import convert_fp16

        proto = convert_fp16(proto)
    elif opts.precision == "int8":
        from .precision.int8 import quantize_int8

        proto, reports["int8"] = quantize_int8(proto, info, opts.calib)
    else:
        raise UserError(f"unknown precision {opts.precision!r}")
    return proto, replace(info, precision=opts.precision)


def _relative(path: Path, base: Path) -> str:
    """A manifest path: relative to the manifest's folder when inside it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _flags(opts: ExportOptions) -> dict:
    flags = asdict(opts)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
