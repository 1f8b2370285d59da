"""Stage 5: ONNX -> TensorRT engine with the TensorRT Python API; one code path for TensorRT 10.x and 11.x.

Precision is not a builder setting here: it is written into the ONNX (FP16 casts, INT8 Q/DQ) and the
network is built strongly typed, so TensorRT keeps exactly those types. TensorRT 11 removed the FP16/INT8
builder flags and weak typing; on 10.x the same behaviour needs ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
(on 11.x that flag is deprecated and ignored, so no flag is passed). Everything TensorRT is imported lazily.

Dynamic batch profile (``--dynamic-batch``): min 1, opt ``TrtOptions.opt_batch`` or ``--batch``, max
``TrtOptions.max_batch`` or max(opt, 32). 32 covers the usual serving batch sizes; a larger max costs build
time and activation memory, a smaller one makes larger batches fail at run time.

Two libraries, one code path (``--trt-lib``, resolved by ``trt_env.import_library``):

* TensorRT 10/11 builds on (and for) the GPU of this machine.
* TensorRT-RTX builds ahead of time WITHOUT a GPU, for the compute capabilities named by ``--trt-arch``
  (default: this machine's GPU when it has one, else ``DEFAULT_RTX_TARGETS``); kernels are compiled at run
  time on the RTX GPU. It has no plugin library (no EfficientNMS_TRT): the portable NMS tail builds there.

``build_plan`` is the parse + configure + build core shared by ``build_engine`` (files + sidecar) and the
test helper ``tests/rtx_util.py``, so the tests that build real engines run the production code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from runtimes import trt_env
from runtimes.contract import ModelInfo

from .artifacts import atomic_path, write_bytes_atomic
from .checkpoint import sha256_file
from .errors import UserError
from .options import TrtOptions
from .trt_checks import (DEFAULT_RTX_TARGETS, HARDWARE_COMPAT, _check_hardware_compat, check_efficient_nms,  # noqa: F401
                         check_nms, check_options, parse_arch, preflight, resolve_targets, warn_if_cannot_run)

log = logging.getLogger("yolo7_export")

DEFAULT_MAX_BATCH = 32


@dataclass(frozen=True)
class Profile:
    """The optimization profile of one input: shapes for min, opt and max (batch, and H/W with --dynamic)."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass
class Plan:
    """A serialized engine fresh from the builder, with what built it (no files written yet)."""

    data: bytes
    library: str  # 'tensorrt' | 'tensorrt-rtx'
    version: str
    targets: list[str]  # RTX: the compute capabilities compiled for ('sm86', ...); TensorRT 10/11: []
    io: list[dict]
    profiles: list[Profile]
    plugins: list
    network_flags: int
    device: trt_env.CudaDevice | None
    parse_s: float
    build_s: float


@dataclass
class BuildResult:
    engine_path: Path
    sidecar_path: Path
    trtexec_command: str
    tensorrt_version: str
    profile: Profile | None
    parse_s: float
    build_s: float
    total_s: float
    library: str = "tensorrt"
    targets: tuple[str, ...] = ()


def resolve_profile(input_name: str, shape: tuple[int, ...], info: ModelInfo, opts: TrtOptions, batch: int,
                    dynamic: bool, sizes: tuple[tuple[int, int], tuple[int, int]] | None = None) -> Profile | None:
    """Profile for a dynamic input; None for a fully static input (TensorRT needs no profile then).

    Batch: min 1, opt ``opt_batch`` or ``batch``, max ``max_batch`` or max(opt, 32). Height/width (dynamic-size
    exports): min/max from ``sizes`` ((min_h, min_w), (max_h, max_w)), opt = the export size ``info.imgsz``.
    """
    dims = list(shape)
    if len(dims) != 4:
        raise UserError(f"input {input_name!r} has shape {tuple(shape)}; expected [batch, 3, height, width]")
    if dims[1] < 0:
        dims[1] = 3
    hw_dynamic = dims[2] < 0 or dims[3] < 0
    if dims[0] >= 0 and not hw_dynamic:  # fully static: TensorRT needs no profile (one would have to match it)
        if dynamic:
            log.warning("%s has a fixed batch of %d; building a fixed-batch engine", input_name, dims[0])
        return None
    if dims[0] >= 0:
        lo_b = opt_b = top_b = dims[0]
    else:
        lo_b, opt_b = 1, opts.opt_batch or batch
        top_b = opts.max_batch or max(opt_b, DEFAULT_MAX_BATCH)
        if not 1 <= opt_b <= top_b:
            raise UserError(f"dynamic batch profile needs 1 <= opt ({opt_b}) <= max ({top_b})")
    opt_hw = tuple(info.imgsz)
    if hw_dynamic:
        lo_hw, top_hw = sizes if sizes is not None else (opt_hw, opt_hw)
        if not all(lo <= o <= hi for lo, o, hi in zip(lo_hw, opt_hw, top_hw)):
            raise UserError(f"dynamic size profile needs min {lo_hw} <= opt {opt_hw} <= max {top_hw} (H, W)")
    else:
        lo_hw = opt_hw = top_hw = (dims[2], dims[3])
    return Profile(input_name, (lo_b, dims[1], *lo_hw), (opt_b, dims[1], *opt_hw), (top_b, dims[1], *top_hw))


def _shape_arg(profile: Profile, which: str) -> str:
    return f"{profile.input_name}:" + "x".join(str(d) for d in getattr(profile, which))


def trtexec_command(onnx_path: Path, engine_path: Path, opts: TrtOptions, profile: Profile | None,
                    trt_major: int, targets: list[str] | None = None) -> str:
    """The trtexec command line that builds the same engine (for the manifest, and for users who prefer it).

    With TensorRT-RTX the tool is ``tensorrt_rtx`` (its trtexec). Its flag for target compute capabilities is
    not verified here, so that line builds for the tool's default targets; the sidecar's ``targets`` records
    what our build compiled for.
    """
    rtx = bool(targets)
    args = ["tensorrt_rtx" if rtx else "trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
            "--skipInference"]
    if not rtx and trt_major < 11:  # 11.x and RTX: strongly typed always, --stronglyTyped is a no-op
        args.append("--stronglyTyped")
    if profile is not None:
        args += [f"--minShapes={_shape_arg(profile, 'min')}", f"--optShapes={_shape_arg(profile, 'opt')}",
                 f"--maxShapes={_shape_arg(profile, 'max')}"]
    if opts.workspace_gib is not None:
        args.append(f"--memPoolSize=workspace:{max(1, round(opts.workspace_gib * 1024))}")  # MiB
    if opts.opt_level is not None:
        args.append(f"--builderOptimizationLevel={opts.opt_level}")
    if opts.timing_cache is not None:
        args.append(f"--timingCacheFile={opts.timing_cache}")
    if opts.version_compatible:
        args.append("--versionCompatible")
    if opts.hardware_compat != "none":
        args.append(f"--hardwareCompatibilityLevel={opts.hardware_compat}")
    return shlex.join(args)


def network_flags(trt) -> int:
    """Strongly typed network: the flag on 10.x; 11.x and TensorRT-RTX are strongly typed only (no flag)."""
    if trt_env.is_rtx(trt) or trt_env.trt_major(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def parser_errors(parser) -> str:
    msgs = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        if err is None:
            continue
        where = err.node_name() or (f"node {err.node()}" if err.node() >= 0 else "")
        op = err.node_operator()
        prefix = f"{where} ({op}): " if where and op else f"{where}: " if where else ""
        msgs.append(prefix + " ".join(str(err.desc()).split()))
    return "; ".join(msgs) or "no details from the parser"


def _tensors(network, inputs: bool) -> list[dict]:
    count = network.num_inputs if inputs else network.num_outputs
    get = network.get_input if inputs else network.get_output
    out = []
    for i in range(count):
        t = get(i)
        out.append({"name": t.name, "mode": "input" if inputs else "output", "shape": [int(d) for d in t.shape],
                    "dtype": t.dtype.name})
    return out


def _configure(trt, builder, network, config, opts: TrtOptions, profiles: list[Profile],
               targets: list[str]) -> None:
    if opts.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * (1 << 30)))
    if opts.opt_level is not None:
        trt_env.require_attr(trt, "IBuilderConfig.builder_optimization_level", "--opt-level")
        config.builder_optimization_level = int(opts.opt_level)
    if opts.version_compatible:
        config.set_flag(trt_env.require_attr(trt, "BuilderFlag.VERSION_COMPATIBLE", "--version-compatible"))
    if opts.hardware_compat != "none":
        member = HARDWARE_COMPAT[opts.hardware_compat]
        config.hardware_compatibility_level = trt_env.require_attr(
            trt, f"HardwareCompatibilityLevel.{member}", f"--hardware-compat {opts.hardware_compat}")
    if targets:
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            if not config.set_compute_capability(getattr(trt.ComputeCapability, t.upper()), i):
                raise UserError(f"TensorRT-RTX {trt.__version__} refused target {t}")
    if profiles:
        p = builder.create_optimization_profile()
        for prof in profiles:
            p.set_shape(prof.input_name, prof.min, prof.opt, prof.max)
        config.add_optimization_profile(p)


def _attach_timing_cache(config, path: Path | None):
    """Load the timing cache (or start an empty one); a cache from another GPU/TensorRT is replaced, not fatal."""
    if path is None:
        return None
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        log.info("timing cache: %s (%d bytes loaded)", path, len(data))
        return cache
    log.warning("timing cache %s does not match this GPU/TensorRT; starting an empty one", path)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    return cache


def _plugins_of(source: bytes | Path, name: str) -> list[trt_env.PluginOp]:
    import onnx

    try:
        if isinstance(source, (bytes, bytearray)):
            import tempfile

            model = onnx.load_from_string(bytes(source))
            with tempfile.TemporaryDirectory() as tmp:  # plugin_ops reads a file
                path = Path(tmp) / "m.onnx"
                onnx.save(model, str(path))
                return trt_env.plugin_ops(path)
        return trt_env.plugin_ops(Path(source))
    except Exception as exc:  # protobuf DecodeError, onnx errors, unreadable file: one line, not a traceback
        module = type(exc).__module__
        if isinstance(exc, (ValueError, OSError)) or module.startswith(("google.protobuf", "onnx")):
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise UserError(f"{name} is not a readable ONNX model ({type(exc).__name__}: {first})") from exc
        raise


def _fill_profile(name: str, shape: tuple[int, ...]) -> Profile:
    """Test default for a dynamic input without given shapes: every dynamic dim 1 (min/opt) .. 2 (max)."""
    lo = tuple(d if d >= 0 else 1 for d in shape)
    hi = tuple(d if d >= 0 else 2 for d in shape)
    return Profile(name, lo, lo, hi)


def build_plan(source: bytes | Path, *, lib: str = "auto", opts: TrtOptions | None = None,
               targets: tuple[str, ...] | None = None, shapes: dict | None = None, profile_for=None,
               fill_profile: bool = False, name: str = "model.onnx") -> Plan:
    """Parse + build an ONNX (file path or serialized bytes) into a serialized engine, nothing written.

    Profiles: ``profile_for(input_name, shape) -> Profile | None`` (the exporter's rule), else ``shapes``
    ({input: (min, opt, max)}), else with ``fill_profile`` a small default; a dynamic input left without a
    profile is an error. ``targets`` (RTX) defaults to ``resolve_targets``.
    """
    t0 = time.perf_counter()
    opts = opts or TrtOptions(enabled=True, lib=lib)
    check_options(opts)
    trt = trt_env.import_library(lib if lib != "auto" else opts.lib)
    rtx = trt_env.is_rtx(trt)
    device = None
    if rtx:
        if opts.hardware_compat != "none":
            raise UserError("--hardware-compat is a TensorRT 10/11 option; with TensorRT-RTX name the target GPUs "
                            "with --trt-arch")
        chosen = resolve_targets(trt, tuple(targets) if targets else opts.arch)
    else:
        device = trt_env.require_gpu()
        _check_hardware_compat(opts, device)
        chosen = []
    logger = trt_env.make_logger(trt)
    builder = trt_env.create(trt, trt.Builder, logger, "builder")
    plugins = _plugins_of(source, name)
    if plugins and rtx:
        raise UserError(f"{name} uses the TensorRT plugin(s) {', '.join(p.op_type for p in plugins)}, and "
                        f"TensorRT-RTX has no plugin library: export with --nms portable (plugin-free NMS tail)")
    if plugins and opts.version_compatible:
        check_nms(opts, "efficient")
    if not rtx:
        trt_env.init_plugins(trt, logger, plugins)  # before parsing: the parser resolves EfficientNMS_TRT there

    flags = network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(bytes(source)) if isinstance(source, (bytes, bytearray)) else parser.parse_from_file(str(source))
    if not ok:
        raise UserError(f"{trt_env.library(trt)} {trt.__version__} could not parse {name}: {parser_errors(parser)}")
    t_parse = time.perf_counter()
    profiles = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(int(d) for d in tensor.shape)
        prof = None
        if profile_for is not None:
            prof = profile_for(tensor.name, shape)
        elif shapes and tensor.name in shapes:
            lo, opt, hi = shapes[tensor.name]
            prof = Profile(tensor.name, tuple(lo), tuple(opt), tuple(hi))
        elif fill_profile and any(d < 0 for d in shape):
            prof = _fill_profile(tensor.name, shape)
        if prof is None and any(d < 0 for d in shape):
            raise UserError(f"input {tensor.name!r} of {name} has dynamic shape {shape} and no profile")
        if prof is not None:
            profiles.append(prof)

    config = builder.create_builder_config()
    _configure(trt, builder, network, config, opts, profiles, chosen)
    cache = _attach_timing_cache(config, opts.timing_cache)
    where = f"for {','.join(chosen)}" if rtx else f"on {device.name}"
    log.info("building %s %s engine %s; this can take minutes", trt_env.library(trt), trt.__version__, where)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"{trt_env.library(trt)} {trt.__version__} could not build the engine for {name}: "
                        f"{logger.last_error or 'see the TensorRT log above'}")
    data = bytes(plan)
    t_build = time.perf_counter()
    if cache is not None:
        write_bytes_atomic(Path(opts.timing_cache), bytes(config.get_timing_cache().serialize()))
    return Plan(data, trt_env.library(trt), trt.__version__, chosen, _tensors(network, True) + _tensors(network, False),
                profiles, plugins, flags, device, t_parse - t0, t_build - t_parse)


def build_engine(onnx_path: Path, engine_path: Path, info: ModelInfo, opts: TrtOptions, batch: int,
                 dynamic: bool, sizes: tuple[tuple[int, int], tuple[int, int]] | None = None) -> BuildResult:
    """Build ``engine_path`` (+ ``<engine>.json`` sidecar) from ``onnx_path``; both written atomically."""
    t0 = time.perf_counter()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    check_options(opts)
    inputs: list[str] = []

    def profile_for(name: str, shape: tuple[int, ...]) -> Profile | None:
        inputs.append(name)
        if len(inputs) > 1:
            raise UserError(f"{onnx_path.name} has more than one input; expected one image input")
        return resolve_profile(name, shape, info, opts, batch, dynamic, sizes)

    plan = build_plan(onnx_path, lib=opts.lib, opts=opts, profile_for=profile_for, name=onnx_path.name)
    if len(inputs) != 1:
        raise UserError(f"{onnx_path.name} has {len(inputs)} inputs; expected one image input")
    profile = plan.profiles[0] if plan.profiles else None
    major = trt_env.version_tuple(plan.version)[0]
    command = trtexec_command(onnx_path, engine_path, opts, profile, major, plan.targets)
    device = plan.device
    sidecar = {
        "format": trt_env.SIDECAR_FORMAT,
        "engine": {"file": engine_path.name, "sha256": hashlib.sha256(plan.data).hexdigest(), "bytes": len(plan.data)},
        "tensorrt": {"library": plan.library, "version": plan.version,
                     "package": trt_env.bindings_package(plan.library)},
        "targets": plan.targets,
        "gpu": ({"name": device.name, "compute_capability": device.cc, "cuda_driver": device.driver}
                if device is not None else None),
        "precision": info.precision,
        "io": plan.io,
        "plugins": [asdict(p) for p in plan.plugins],
        "source_onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        "build": {"strongly_typed": True, "network_flags": plan.network_flags,
                  "workspace_gib": opts.workspace_gib, "opt_level": opts.opt_level,
                  "version_compatible": bool(opts.version_compatible),
                  "hardware_compat": opts.hardware_compat,
                  "profile": asdict(profile) if profile else None,
                  "timing_cache": str(opts.timing_cache) if opts.timing_cache else None},
        "model": asdict(info),
        "trtexec": command,
        "seconds": {"parse": round(plan.parse_s, 3), "build": round(plan.build_s, 3)},
    }
    side = trt_env.sidecar_path(engine_path)
    with atomic_path(engine_path) as tmp_engine, atomic_path(side) as tmp_side:
        tmp_engine.write_bytes(plan.data)
        tmp_side.write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n")
    total = time.perf_counter() - t0
    built_for = f" for {','.join(plan.targets)}" if plan.targets else ""
    log.info("wrote %s (%s %s%s, %.1f MB) in %.1f s; same build from the command line: %s", engine_path,
             plan.library, plan.version, built_for, len(plan.data) / 1e6, total, command)
    return BuildResult(engine_path, side, command, plan.version, profile, plan.parse_s, plan.build_s, total,
                       plan.library, tuple(plan.targets))
