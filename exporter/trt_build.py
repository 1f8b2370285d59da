"""Stage 5: ONNX -> TensorRT engine with the TensorRT Python API; one code path for TensorRT 10.x and 11.x.

Precision is not a builder setting here: it is written into the ONNX (FP16 casts, INT8 Q/DQ) and the
network is built strongly typed, so TensorRT keeps exactly those types. TensorRT 11 removed the FP16/INT8
builder flags and weak typing; on 10.x the same behaviour needs ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
(on 11.x that flag is deprecated and ignored, so no flag is passed). Everything TensorRT is imported lazily.

Dynamic batch profile (``--dynamic-batch``): min 1, opt ``TrtOptions.opt_batch`` or ``--batch``, max
``TrtOptions.max_batch`` or max(opt, 32). 32 covers the usual serving batch sizes; a larger max costs build
time and activation memory, a smaller one makes larger batches fail at run time.
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

log = logging.getLogger("yolo7_export")

DEFAULT_MAX_BATCH = 32
HARDWARE_COMPAT = {"ampere+": "AMPERE_PLUS"}  # CLI value -> tensorrt.HardwareCompatibilityLevel member


@dataclass(frozen=True)
class Profile:
    """The optimization profile of the (single) image input: shapes for min, opt and max batch."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


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


def check_options(opts: TrtOptions) -> None:
    """Option errors that need no TensorRT: reported before any export work."""
    if opts.hardware_compat not in (None, "none", *HARDWARE_COMPAT):
        raise UserError(f"--hardware-compat {opts.hardware_compat!r}: expected one of none, {', '.join(HARDWARE_COMPAT)}")
    if opts.workspace_gib is not None and not opts.workspace_gib > 0:
        raise UserError(f"--workspace must be > 0 GiB (got {opts.workspace_gib})")
    if opts.opt_level is not None and not 0 <= opts.opt_level <= 5:
        raise UserError(f"--opt-level must be within 0..5 (got {opts.opt_level})")


def preflight(opts: TrtOptions):
    """Fail fast (before a long export or calibration) if no engine can be built on this machine."""
    check_options(opts)
    trt = trt_env.import_tensorrt()
    device = trt_env.require_gpu()
    _check_hardware_compat(opts, device)
    trt_env.create(trt, trt.Builder, trt_env.make_logger(trt), "builder")
    return trt


def resolve_profile(input_name: str, shape: tuple[int, ...], info: ModelInfo, opts: TrtOptions, batch: int,
                    dynamic: bool) -> Profile | None:
    """Profile for a dynamic-batch input; None for a fully static input (TensorRT needs no profile then)."""
    dims = list(shape)
    if len(dims) != 4:
        raise UserError(f"input {input_name!r} has shape {tuple(shape)}; expected [batch, 3, height, width]")
    fixed = [3, *info.imgsz]
    for i in (1, 2, 3):
        if dims[i] < 0:
            dims[i] = fixed[i - 1]
    if dims[0] >= 0:  # static batch in the ONNX: TensorRT needs no profile (one would have to match it)
        if dynamic:
            log.warning("%s has a fixed batch of %d; building a fixed-batch engine", input_name, dims[0])
        return None
    opt = opts.opt_batch or batch
    top = opts.max_batch or max(opt, DEFAULT_MAX_BATCH)
    if not 1 <= opt <= top:
        raise UserError(f"dynamic batch profile needs 1 <= opt ({opt}) <= max ({top})")
    return Profile(input_name, (1, *dims[1:]), (opt, *dims[1:]), (top, *dims[1:]))


def _shape_arg(profile: Profile, which: str) -> str:
    return f"{profile.input_name}:" + "x".join(str(d) for d in getattr(profile, which))


def trtexec_command(onnx_path: Path, engine_path: Path, opts: TrtOptions, profile: Profile | None,
                    trt_major: int) -> str:
    """The trtexec command line that builds the same engine (for the manifest, and for users who prefer it)."""
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--skipInference"]
    if trt_major < 11:  # 11.x: strongly typed always, --stronglyTyped is a deprecated no-op
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
    if opts.hardware_compat not in (None, "none"):
        args.append(f"--hardwareCompatibilityLevel={opts.hardware_compat}")
    return shlex.join(args)


def network_flags(trt) -> int:
    """Strongly typed network: the flag on 10.x; on 11.x every network is strongly typed (flag deprecated)."""
    if trt_env.trt_major(trt) >= 11:
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


def _check_hardware_compat(opts: TrtOptions, device: trt_env.CudaDevice) -> None:
    if opts.hardware_compat == "ampere+" and device.compute_capability < (8, 0):
        raise UserError(f"--hardware-compat ampere+ must be built on an Ampere or newer GPU; {device.name} has "
                        f"compute capability {device.cc}")


def _tensors(network, inputs: bool) -> list[dict]:
    count = network.num_inputs if inputs else network.num_outputs
    get = network.get_input if inputs else network.get_output
    out = []
    for i in range(count):
        t = get(i)
        out.append({"name": t.name, "mode": "input" if inputs else "output", "shape": [int(d) for d in t.shape],
                    "dtype": t.dtype.name})
    return out


def _configure(trt, builder, network, config, opts: TrtOptions, profile: Profile | None) -> None:
    if opts.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * (1 << 30)))
    if opts.opt_level is not None:
        trt_env.require_attr(trt, "IBuilderConfig.builder_optimization_level", "--opt-level")
        config.builder_optimization_level = int(opts.opt_level)
    if opts.version_compatible:
        config.set_flag(trt_env.require_attr(trt, "BuilderFlag.VERSION_COMPATIBLE", "--version-compatible"))
    if opts.hardware_compat not in (None, "none"):
        member = HARDWARE_COMPAT[opts.hardware_compat]
        config.hardware_compatibility_level = trt_env.require_attr(
            trt, f"HardwareCompatibilityLevel.{member}", f"--hardware-compat {opts.hardware_compat}")
    if profile is not None:
        p = builder.create_optimization_profile()
        p.set_shape(profile.input_name, profile.min, profile.opt, profile.max)
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


def build_engine(onnx_path: Path, engine_path: Path, info: ModelInfo, opts: TrtOptions, batch: int,
                 dynamic: bool) -> BuildResult:
    """Build ``engine_path`` (+ ``<engine>.json`` sidecar) from ``onnx_path``; both written atomically."""
    t0 = time.perf_counter()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    check_options(opts)
    trt = trt_env.import_tensorrt()
    device = trt_env.require_gpu()
    _check_hardware_compat(opts, device)
    logger = trt_env.make_logger(trt)
    builder = trt_env.create(trt, trt.Builder, logger, "builder")
    plugins = trt_env.plugin_ops(onnx_path)
    trt_env.init_plugins(trt, logger, plugins)  # before parsing: the parser resolves EfficientNMS_TRT there

    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise UserError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}: {parser_errors(parser)}")
    t_parse = time.perf_counter()
    if network.num_inputs != 1:
        raise UserError(f"{onnx_path.name} has {network.num_inputs} inputs; expected one image input")
    image = network.get_input(0)
    profile = resolve_profile(image.name, tuple(int(d) for d in image.shape), info, opts, batch, dynamic)

    config = builder.create_builder_config()
    _configure(trt, builder, network, config, opts, profile)
    cache = _attach_timing_cache(config, opts.timing_cache)
    log.info("building TensorRT %s engine (%s) on %s; this can take minutes", trt.__version__, info.precision,
             device.name)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT could not build the engine: {logger.last_error or 'see the TensorRT log above'}")
    data = bytes(plan)
    t_build = time.perf_counter()
    if cache is not None:
        write_bytes_atomic(Path(opts.timing_cache), bytes(config.get_timing_cache().serialize()))

    command = trtexec_command(onnx_path, engine_path, opts, profile, trt_env.trt_major(trt))
    sidecar = {
        "format": trt_env.SIDECAR_FORMAT,
        "engine": {"file": engine_path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
        "tensorrt": {"version": trt.__version__, "package": trt_env.bindings_package()},
        "gpu": {"name": device.name, "compute_capability": device.cc, "cuda_driver": device.driver},
        "precision": info.precision,
        "io": _tensors(network, True) + _tensors(network, False),
        "plugins": [asdict(p) for p in plugins],
        "source_onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        "build": {"strongly_typed": True, "network_flags": network_flags(trt),
                  "workspace_gib": opts.workspace_gib, "opt_level": opts.opt_level,
                  "version_compatible": bool(opts.version_compatible),
                  "hardware_compat": opts.hardware_compat or "none",
                  "profile": asdict(profile) if profile else None,
                  "timing_cache": str(opts.timing_cache) if opts.timing_cache else None},
        "model": asdict(info),
        "trtexec": command,
        "seconds": {"parse": round(t_parse - t0, 3), "build": round(t_build - t_parse, 3)},
    }
    side = trt_env.sidecar_path(engine_path)
    with atomic_path(engine_path) as tmp_engine, atomic_path(side) as tmp_side:
        tmp_engine.write_bytes(data)
        tmp_side.write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n")
    total = time.perf_counter() - t0
    log.info("wrote %s (%.1f MB) in %.1f s; same build with trtexec: %s", engine_path, len(data) / 1e6, total,
             command)
    return BuildResult(engine_path, side, command, trt.__version__, profile, t_parse - t0, t_build - t_parse, total)
