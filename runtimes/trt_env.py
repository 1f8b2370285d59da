"""TensorRT and CUDA environment probes shared by the engine builder and the TensorRT runtime.

Why a module of its own: "import tensorrt works" does not mean TensorRT is usable. The bindings wheel can be
present without its native libraries (import fails with a libnvinfer error), or with stub libraries (import
works, every object creation fails), and a machine can have TensorRT but no CUDA GPU. Each case gets its
own one-line ``UserError`` naming what to install. Nothing here imports tensorrt at module level.
"""
from __future__ import annotations

import ctypes
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError  # the bottom layer: runtimes/ never imports exporter/

log = logging.getLogger("yolo7_export")

MIN_MAJOR = 10  # the strongly typed ONNX path needs TensorRT 10+ (11 is strongly typed only)
INSTALL_HINT = ("pip install tensorrt-cu12 (or tensorrt-cu13; it pulls the native libraries from NVIDIA's index), "
                "or run in an NGC TensorRT container (nvcr.io/nvidia/tensorrt)")
SIDECAR_FORMAT = "yolo7-export/engine-sidecar/1"


def _error(message: str) -> Exception:
    return UserError(message)


def sidecar_path(engine_path: Path) -> Path:
    """``model.engine`` -> ``model.engine.json``: the build record that travels with an engine."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.16.1.11' -> (10, 16, 1, 11); trailing tags such as '.post1' or 'rc1' are ignored."""
    parts = []
    for piece in str(version).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def trt_major(trt) -> int:
    return version_tuple(trt.__version__)[0]


def import_tensorrt():
    """Import tensorrt or raise a one-line UserError saying what is missing."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name not in (None, "tensorrt") and not str(exc.name).startswith("tensorrt"):
            raise _error(f"TensorRT's Python package is broken (missing module {exc.name!r}): reinstall it; "
                         f"{INSTALL_HINT}") from exc
        raise _error(f"TensorRT is not installed: {INSTALL_HINT}") from exc
    except ImportError as exc:  # bindings present, native libraries (libnvinfer.so.N ...) not loadable
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _error(f"TensorRT's Python bindings are installed but its native libraries could not be loaded "
                     f"({first}): install the matching tensorrt-cuXX-libs, or {INSTALL_HINT}") from exc
    version = getattr(trt, "__version__", "?")
    if not version_tuple(version) or version_tuple(version)[0] < MIN_MAJOR:
        raise _error(f"TensorRT {version} is too old: yolo7-export builds strongly typed engines and needs "
                     f"TensorRT {MIN_MAJOR}.x or 11.x")
    return trt


# ---------------------------------------------------------------- which TensorRT: tensorrt or TensorRT-RTX

LIBS = ("auto", "tensorrt", "rtx")
RTX_INSTALL_HINT = 'pip install -e ".[rtx]" (tensorrt-rtx-cu13-libs + tensorrt-rtx-cu13-bindings)'
RTX_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")  # ComputeCapability members of RTX 1.7


def import_rtx():
    """Import TensorRT-RTX (native libraries first, then the bindings) or raise a one-line UserError."""
    try:
        import tensorrt_rtx_libs  # noqa: F401  (loads libtensorrt_rtx before the bindings need it)
        import tensorrt_rtx_bindings as trt
    except ModuleNotFoundError as exc:
        raise _error(f"TensorRT-RTX is not installed: {RTX_INSTALL_HINT}") from exc
    except ImportError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _error(f"TensorRT-RTX is installed but could not be loaded ({first}): reinstall it with "
                     f"{RTX_INSTALL_HINT}") from exc
    return trt


def rtx_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_rtx_bindings") is not None


def library(trt) -> str:
    """'tensorrt-rtx' for the TensorRT-RTX bindings, 'tensorrt' for TensorRT 10/11 (what sidecars record)."""
    return "tensorrt-rtx" if str(getattr(trt, "__name__", "")).startswith("tensorrt_rtx") else "tensorrt"


def is_rtx(trt) -> bool:
    return library(trt) == "tensorrt-rtx"


def import_library(lib: str = "auto"):
    """The TensorRT module for ``--trt-lib``: 'tensorrt', 'rtx', or 'auto'.

    auto: TensorRT 10/11 when it is installed and this machine has a GPU (it cannot build without one);
    otherwise TensorRT-RTX when installed (it builds ahead of time without a GPU); otherwise TensorRT's
    own install error, which also names the RTX extra.
    """
    if lib == "rtx":
        return import_rtx()
    if lib == "tensorrt":
        return import_tensorrt()
    if lib != "auto":
        raise _error(f"--trt-lib {lib!r}: expected one of {', '.join(LIBS)}")
    try:
        trt = import_tensorrt()
    except Exception as exc:  # UserError (lazy class): not installed or not loadable
        if rtx_installed():
            return import_rtx()
        raise _error(f"{exc}; or, to build without a GPU, TensorRT-RTX: {RTX_INSTALL_HINT}") from exc
    if rtx_installed() and cuda_device() is None:
        return import_rtx()
    return trt


def is_stub(trt) -> bool:
    """True for the API-surface stub (trt-stub): importable bindings, no working native library."""
    return bool(getattr(trt, "__trt_stub__", False))


def create(trt, factory, logger, what: str):
    """``trt.Builder(logger)`` / ``trt.Runtime(logger)`` with the failure explained.

    Without working native libraries (or without a CUDA driver) pybind11 raises
    ``TypeError: ... factory function returned nullptr``; that is an environment problem, not a bug.
    """
    try:
        obj = factory(logger)
    except TypeError as exc:
        detail = getattr(logger, "last_error", "") or str(exc)
        if is_stub(trt):
            raise _error(f"TensorRT {trt.__version__} here is an API stub without native libraries, so no {what} "
                         f"can be created: install real TensorRT ({INSTALL_HINT})") from exc
        raise _error(f"could not create a TensorRT {what} ({detail}): TensorRT's native libraries or the CUDA "
                     f"driver are missing or broken; {INSTALL_HINT}") from exc
    if obj is None:
        raise _error(f"could not create a TensorRT {what}: {getattr(logger, 'last_error', '') or 'no reason given'}")
    return obj


def require_attr(trt, dotted: str, feature: str):
    """Resolve e.g. 'HardwareCompatibilityLevel.AMPERE_PLUS', or say that this TensorRT lacks the feature."""
    obj = trt
    for part in dotted.split("."):
        if not hasattr(obj, part):
            raise _error(f"{feature} is not available in TensorRT {trt.__version__} (no tensorrt.{dotted}); "
                         f"use a newer TensorRT or drop the option")
        obj = getattr(obj, part)
    return obj


def make_logger(trt, verbose: bool = False):
    """A TensorRT ILogger that forwards to Python logging and remembers errors for our messages."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.verbose = verbose

        @property
        def last_error(self) -> str:
            return self.errors[-1] if self.errors else ""

        def log(self, severity, msg):
            name = getattr(severity, "name", str(severity))
            if name in ("INTERNAL_ERROR", "ERROR"):
                self.errors.append(str(msg).strip().splitlines()[0] if str(msg).strip() else "")
                log.error("TensorRT: %s", msg)
            elif name == "WARNING":
                log.warning("TensorRT: %s", msg)
            elif self.verbose or name == "INFO":
                log.debug("TensorRT: %s", msg)

    return _Logger()


# ---------------------------------------------------------------- plugins

@dataclass(frozen=True)
class PluginOp:
    """A custom op of the ONNX that TensorRT must find in its plugin registry (e.g. EfficientNMS_TRT)."""

    op_type: str
    version: str = "1"
    namespace: str = ""


def plugin_ops(onnx_path: Path) -> list[PluginOp]:
    """Custom ops of the graph: nodes outside the standard ONNX domains (TensorRT resolves them as plugins)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found: dict[str, PluginOp] = {}
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and not node.op_type.endswith("_TRT"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        version = attrs.get("plugin_version", b"1")
        namespace = attrs.get("plugin_namespace", b"")
        op = PluginOp(node.op_type, version.decode() if isinstance(version, bytes) else str(version),
                      namespace.decode() if isinstance(namespace, bytes) else str(namespace))
        found.setdefault(op.op_type, op)
    return list(found.values())


def init_plugins(trt, logger, needed: list[PluginOp]) -> None:
    """Register TensorRT's bundled plugins and check that every custom op of the model has a creator.

    Must run before parsing (the ONNX parser looks plugins up while importing nodes) and before
    deserializing an engine that contains plugin layers.
    """
    ok = trt.init_libnvinfer_plugins(logger, "")
    if not needed:
        if not ok:
            log.debug("init_libnvinfer_plugins failed; the model uses no plugins")
        return
    names = ", ".join(p.op_type for p in needed)
    if not ok:
        raise _error(f"TensorRT's plugin library (libnvinfer_plugin) could not be initialised, and the model needs "
                     f"{names}: install the full TensorRT ({INSTALL_HINT}), or export with --nms onnx")
    registry = trt.get_plugin_registry()
    for op in needed:
        creator = registry.get_creator(op.op_type, op.version, op.namespace) if registry is not None else None
        if creator is None:
            raise _error(f"TensorRT plugin {op.op_type} (version {op.version}) is not in the plugin registry of "
                         f"TensorRT {trt.__version__}: install TensorRT with its plugin library "
                         f"(libnvinfer_plugin), or export with --nms onnx (standard NonMaxSuppression)")


# ---------------------------------------------------------------- CUDA device

@dataclass(frozen=True)
class CudaDevice:
    name: str
    compute_capability: tuple[int, int]
    driver: str = ""  # CUDA driver API version, e.g. '12.4'
    index: int = 0

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


_CU_CC_MAJOR, _CU_CC_MINOR = 75, 76  # CUdevice_attribute values (cuda.h)


def cuda_device(index: int = 0) -> CudaDevice | None:
    """The CUDA GPU TensorRT will use, from the driver API (works with a CPU-only torch); None if none."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        try:
            lib = ctypes.CDLL("nvcuda.dll")
        except (OSError, AttributeError):
            return None
    try:
        if lib.cuInit(0) != 0:
            return None
        count, dev, major, minor, drv = (ctypes.c_int() for _ in range(5))
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
            return None
        if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
            return None
        name = ctypes.create_string_buffer(256)
        lib.cuDeviceGetName(name, 256, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_CC_MAJOR, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_CC_MINOR, dev)
        lib.cuDriverGetVersion(ctypes.byref(drv))
    except (AttributeError, OSError):
        return None
    if major.value <= 0:
        return None
    driver = f"{drv.value // 1000}.{drv.value % 1000 // 10}" if drv.value else ""
    return CudaDevice(name.value.decode(errors="replace"), (major.value, minor.value), driver, index)


def require_gpu(index: int = 0) -> CudaDevice:
    device = cuda_device(index)
    if device is None:
        raise _error("no CUDA GPU found (the CUDA driver libcuda is missing or sees no device): TensorRT engines "
                     "can only be built and run on an NVIDIA GPU host; use the ONNX (ONNX Runtime) here instead")
    return device


def unavailable_reason(library: str = "tensorrt") -> str | None:
    """None when TensorRT engines (of ``library``: 'tensorrt' or 'tensorrt-rtx') can run here, else why not."""
    try:
        if library == "tensorrt-rtx":  # builds anywhere; running needs its library and a GPU
            import_rtx()
            require_gpu()
            return None
        trt = import_tensorrt()
        require_gpu()
        create(trt, trt.Builder, make_logger(trt), "builder")
    except UserError as exc:
        return str(exc)
    return None


def bindings_package(lib: str = "tensorrt") -> str:
    """Which TensorRT wheel is installed (tells the CUDA major it was built for), e.g. 'tensorrt-cu12-bindings'."""
    from importlib import metadata

    names = (("tensorrt-rtx-cu13-bindings", "tensorrt-rtx-cu12-bindings") if lib == "tensorrt-rtx" else
             ("tensorrt-cu13-bindings", "tensorrt-cu12-bindings", "tensorrt-cu13", "tensorrt-cu12", "tensorrt"))
    for dist in names:
        try:
            return f"{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return ""
