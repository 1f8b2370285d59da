"""Checks before any TensorRT work: options, NMS tails an engine cannot carry, library and RTX targets.

Separate from trt_build.py (the builder itself) so the CLI and the pipeline can refuse bad input in one line
before minutes of export, importing nothing of TensorRT. ``preflight`` is where ``--trt-lib auto`` is
resolved to the library that will build ('tensorrt' or 'rtx'), so the NMS choice can depend on it.
"""
from __future__ import annotations

import logging

from runtimes import trt_env

from .errors import UserError
from .options import TrtOptions

log = logging.getLogger("yolo7_export")

# Without a GPU to target, RTX engines are built for the set TensorRT-RTX itself documents as its portable
# default (Ampere 8.0/8.6, Ada 8.9, Blackwell 12.0), named explicitly so the sidecar can say what was built.
# Turing (sm75) is left out as the library does: mixing it in costs the other targets speed; ask for it with
# --trt-arch sm75.
DEFAULT_RTX_TARGETS = ("sm80", "sm86", "sm89", "sm120")
HARDWARE_COMPAT = {"ampere+": "AMPERE_PLUS"}  # CLI value -> tensorrt.HardwareCompatibilityLevel member


def parse_arch(value: str | None) -> tuple[str, ...] | None:
    """'sm86,sm89,sm120' (also '8.6', '86', 'all') -> ('sm86', 'sm89', 'sm120'); None when not given."""
    if value is None or not str(value).strip():
        return None
    out: list[str] = []
    for raw in str(value).replace(" ", ",").split(","):
        item = raw.strip().lower()
        if not item:
            continue
        if item == "all":
            out += [t for t in trt_env.RTX_TARGETS if t not in out]
            continue
        digits = item.removeprefix("sm_").removeprefix("sm").replace(".", "")
        name = f"sm{digits}"
        if not digits.isdigit() or name not in trt_env.RTX_TARGETS:
            raise UserError(f"--trt-arch {raw.strip()!r}: expected compute capabilities among "
                            f"{','.join(trt_env.RTX_TARGETS)} (or 'all')")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError("--trt-arch is empty: name at least one compute capability, e.g. sm86")
    return tuple(out)


def check_options(opts: TrtOptions) -> None:
    """Option errors that need no TensorRT: reported before any export work."""
    if opts.hardware_compat not in ("none", *HARDWARE_COMPAT):
        raise UserError(f"--hardware-compat {opts.hardware_compat!r}: expected one of none, {', '.join(HARDWARE_COMPAT)}")
    if opts.workspace_gib is not None and not opts.workspace_gib > 0:
        raise UserError(f"--workspace must be > 0 GiB (got {opts.workspace_gib})")
    if opts.opt_level is not None and not 0 <= opts.opt_level <= 5:
        raise UserError(f"--opt-level must be within 0..5 (got {opts.opt_level})")
    if opts.lib not in trt_env.LIBS:
        raise UserError(f"--trt-lib {opts.lib!r}: expected one of {', '.join(trt_env.LIBS)}")
    if opts.arch is not None:
        parse_arch(",".join(opts.arch))
        if opts.lib == "tensorrt":
            raise UserError("--trt-arch needs TensorRT-RTX (--trt-lib rtx): TensorRT 10/11 builds for the GPU of "
                            "the machine it runs on")


def check_efficient_nms(conf: float, iou: float, topk: int) -> None:
    """Values EfficientNMS_TRT's plugin creator rejects (score_threshold >= 0, iou_threshold > 0,
    max_output_boxes > 0): refused at the command line instead of as a parse error after the export."""
    if not iou > 0:
        raise UserError(f"--iou {iou}: EfficientNMS_TRT needs an IoU threshold > 0 (--nms efficient); use e.g. "
                        f"--iou 0.45, or --nms onnx / --nms portable, which accept 0")
    if not conf >= 0:
        raise UserError(f"--conf {conf}: EfficientNMS_TRT needs a score threshold >= 0")
    if not topk > 0:
        raise UserError(f"--topk {topk}: EfficientNMS_TRT needs at least one output box")


def check_nms(opts: TrtOptions, nms_mode: str, conf: float = 0.25, iou: float = 0.45, topk: int = 100) -> None:
    """NMS tails an engine cannot carry, refused before export (call after ``preflight`` resolved ``opts.lib``).

    TensorRT-RTX 1.7 parses ONNX NonMaxSuppression but has no runner for it ("has no runners that implement
    it" at build time), and has no plugin library for EfficientNMS_TRT: only the portable tail builds there.
    """
    if nms_mode == "onnx" and opts.enabled and opts.lib == "rtx":
        raise UserError("--nms onnx uses ONNX NonMaxSuppression, which TensorRT-RTX cannot build (no runner for "
                        "it): use --nms portable (plugin-free NMS tail), or --trt-lib tensorrt on a GPU host")
    if nms_mode != "efficient":
        return
    check_efficient_nms(conf, iou, topk)
    if not opts.enabled:
        return
    if opts.lib == "rtx":
        raise UserError("--nms efficient needs TensorRT's plugin library, which TensorRT-RTX does not have: use "
                        "--nms portable (plugin-free NMS tail), or --trt-lib tensorrt on a GPU host")
    if opts.version_compatible:
        raise UserError("--version-compatible with --nms efficient: the EfficientNMS_TRT plugin would be neither "
                        "serialized into the engine nor loadable by the lean runtime; use --nms portable "
                        "(plugin-free NMS tail) or drop --version-compatible")


def preflight(opts: TrtOptions):
    """Fail fast (before a long export or calibration) if no engine can be built on this machine.

    Resolves ``opts.lib`` ('auto' -> 'tensorrt' or 'rtx') so later stages (the NMS choice) know the library.
    """
    check_options(opts)
    trt = trt_env.import_library(opts.lib)
    opts.lib = "rtx" if trt_env.is_rtx(trt) else "tensorrt"
    check_options(opts)  # --trt-arch with a library resolved from auto
    if opts.lib == "rtx":
        if opts.hardware_compat != "none":
            raise UserError("--hardware-compat is a TensorRT 10/11 option; with TensorRT-RTX name the target GPUs "
                            "with --trt-arch")
        resolve_targets(trt, opts.arch, announce=False)
    else:
        device = trt_env.require_gpu()
        _check_hardware_compat(opts, device)
    trt_env.create(trt, trt.Builder, trt_env.make_logger(trt), "builder")
    warn_if_cannot_run()
    return trt


def warn_if_cannot_run() -> None:
    """Building works without CUDA torch; running or checking the engine here does not (say so once)."""
    try:
        import torch
    except ImportError:
        log.warning("PyTorch is not installed: running or checking the engine (yolo7-detect, yolo7-bench, "
                    "--check) needs a CUDA build of torch on a GPU host")
        return
    if not torch.version.cuda:
        log.warning("torch %s here is a CPU build: the engine can be built, but running or checking it "
                    "(yolo7-detect, yolo7-bench, --check) needs a CUDA build of torch on a GPU host "
                    "(or trtexec --loadEngine)", torch.__version__)


def resolve_targets(trt, arch: tuple[str, ...] | None, announce: bool = True) -> list[str]:
    """The compute capabilities an RTX engine is compiled for; [] for TensorRT 10/11 (the local GPU)."""
    if not trt_env.is_rtx(trt):
        return []
    if arch:
        targets, why = list(arch), "from --trt-arch"
    else:
        device = trt_env.cuda_device()
        local = f"sm{device.compute_capability[0]}{device.compute_capability[1]}" if device else None
        if local in trt_env.RTX_TARGETS:
            targets, why = [local], f"this machine's GPU ({device.name})"
        else:
            targets = list(DEFAULT_RTX_TARGETS)
            why = (f"default set; {device.name} (compute capability {device.cc}) is not an RTX target" if device
                   else "default set, no GPU here; choose with --trt-arch")
    for t in targets:
        if not hasattr(trt.ComputeCapability, t.upper()):
            raise UserError(f"TensorRT-RTX {trt.__version__} cannot build for {t}; it knows "
                            f"{', '.join(m.lower() for m in trt.ComputeCapability.__members__ if m.startswith('SM'))}")
    if announce:
        log.info("TensorRT-RTX targets: %s (%s)", ",".join(targets), why)
    return targets


def _check_hardware_compat(opts: TrtOptions, device: trt_env.CudaDevice) -> None:
    if opts.hardware_compat == "ampere+" and device.compute_capability < (8, 0):
        raise UserError(f"--hardware-compat ampere+ must be built on an Ampere or newer GPU; {device.name} has "
                        f"compute capability {device.cc}")
