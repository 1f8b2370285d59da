"""TensorRT backend: runs an engine built by yolo7-export, with torch CUDA tensors as its buffers.

Before deserializing, the engine's sidecar (``<engine>.json``, written by exporter/trt_build.py) is checked
against this machine: a TensorRT plan only runs on the TensorRT version and GPU generation it was built for
(unless built version-/hardware-compatible), and TensorRT's own error for that is cryptic. IO is by tensor
name (``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``), the API of TensorRT 10 and 11.
Buffers are torch CUDA tensors on a torch stream (pycuda has no wheels and needs the CUDA toolkit to build).
Optional CUDA graph capture replays the whole enqueue as one launch: less CPU overhead at batch 1.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from . import trt_env
from .backend import Backend
from .contract import META_PREFIX, ModelInfo

log = logging.getLogger("yolo7_export")

# tensorrt.DataType member name -> torch dtype name
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
REBUILD_HINT = ("rebuild it on this machine (yolo7-export CHECKPOINT --trt), or build portable engines with "
                "--version-compatible / --hardware-compat ampere+")


def read_sidecar(engine_path: Path) -> dict:
    side = trt_env.sidecar_path(engine_path)
    if not side.is_file():
        raise trt_env._error(f"{side.name} not found next to {Path(engine_path).name}: only engines built by "
                             f"yolo7-export --trt can run here (their sidecar records classes, input size, TensorRT version and GPU); rebuild "
                             f"with yolo7-export CHECKPOINT --trt")
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise trt_env._error(f"{side.name} is not valid JSON ({exc}); rebuild the engine") from exc
    if not isinstance(data, dict) or data.get("format") != trt_env.SIDECAR_FORMAT:
        raise trt_env._error(f"{side.name} is not a yolo7-export engine sidecar (format "
                             f"{data.get('format') if isinstance(data, dict) else None!r}); rebuild the engine")
    return data


def model_info(sidecar: dict) -> ModelInfo:
    """The ModelInfo embedded at build time (same validation as for ONNX metadata)."""
    model = sidecar.get("model") or {}
    return ModelInfo.from_metadata({META_PREFIX + k: json.dumps(v) for k, v in model.items()})


def check_compat(sidecar: dict, trt_version: str, device: trt_env.CudaDevice, engine_name: str,
                 library: str = "tensorrt") -> list[str]:
    """Raise a UserError if the engine cannot run here; return warnings for what works but is not ideal.

    ``library`` is the TensorRT flavour loaded here ('tensorrt' or 'tensorrt-rtx'): a plan only loads in the
    library (and, unless version-compatible, the exact version) that built it. TensorRT-RTX engines name
    their target compute capabilities instead of a build GPU.
    """
    built_lib = str(sidecar["tensorrt"].get("library", "tensorrt"))
    built_trt = str(sidecar["tensorrt"]["version"])
    if built_lib != library:
        raise trt_env._error(f"engine {engine_name} was built by {_lib_name(built_lib)} {built_trt}, and this runtime "
                             f"loaded {_lib_name(library)} {trt_version}: rebuild it with yolo7-export CHECKPOINT "
                             f"--trt --trt-lib {'rtx' if library == 'tensorrt-rtx' else 'tensorrt'}")
    if built_lib == "tensorrt-rtx":
        return _check_rtx(sidecar, built_trt, trt_version, device, engine_name)
    gpu = sidecar["gpu"]
    build = sidecar.get("build") or {}
    problems, warnings = [], []
    built_v, running_v = trt_env.version_tuple(built_trt), trt_env.version_tuple(trt_version)
    if build.get("version_compatible"):
        if running_v < built_v:
            problems.append(f"TensorRT {built_trt} or later (version-compatible), this machine has TensorRT "
                            f"{trt_version}")
    elif running_v != built_v:
        problems.append(f"TensorRT {built_trt}, this machine has TensorRT {trt_version}")
    built_cc = str(gpu["compute_capability"])
    if build.get("hardware_compat", "none") == "ampere+":
        if device.compute_capability < (8, 0):
            problems.append(f"Ampere or newer GPUs (hardware-compatible), {device.name} has compute capability "
                            f"{device.cc}")
    elif built_cc != device.cc:
        problems.append(f"compute capability {built_cc} ({gpu.get('name', '?')}), {device.name} has {device.cc}")
    elif gpu.get("name") and gpu["name"] != device.name:
        warnings.append(f"{engine_name} was built on {gpu['name']} and runs on {device.name} (same compute "
                        f"capability {device.cc}): it works, but an engine built on this GPU may be faster")
    if problems:
        raise trt_env._error(f"engine {engine_name} was built for {'; and for '.join(problems)}: {REBUILD_HINT}")
    return warnings


def _lib_name(lib: str) -> str:
    return "TensorRT-RTX" if lib == "tensorrt-rtx" else "TensorRT"


def _check_rtx(sidecar: dict, built: str, running: str, device: trt_env.CudaDevice, engine_name: str) -> list[str]:
    """RTX plans: same TensorRT-RTX version, and this GPU among the compute capabilities compiled for."""
    problems = []
    if trt_env.version_tuple(built) != trt_env.version_tuple(running):
        problems.append(f"TensorRT-RTX {built}, this machine has TensorRT-RTX {running}")
    targets = [str(t) for t in sidecar.get("targets") or []]
    here = f"sm{device.compute_capability[0]}{device.compute_capability[1]}"
    if targets and here not in targets:
        problems.append(f"{','.join(targets)}, {device.name} is {here}")
    if problems:
        raise trt_env._error(f"engine {engine_name} was built for {'; and for '.join(problems)}: rebuild it with "
                             f"yolo7-export CHECKPOINT --trt --trt-lib rtx --trt-arch {here}")
    return []


class TorchCuda:
    """The few CUDA operations the backend needs, done with torch (one place to stand in for in CPU tests)."""

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise trt_env._error("no CUDA GPU visible to PyTorch: the TensorRT runtime keeps its buffers in torch "
                                 "CUDA tensors, so it needs an NVIDIA GPU and a CUDA build of torch")
        self.torch = torch
        self.index = torch.cuda.current_device()
        self.stream = torch.cuda.Stream()

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream

    def device_info(self) -> trt_env.CudaDevice:
        found = trt_env.cuda_device(self.index)
        if found is not None:
            return found
        t = self.torch
        return trt_env.CudaDevice(t.cuda.get_device_name(self.index), tuple(t.cuda.get_device_capability(self.index)),
                                  str(t.version.cuda or ""), self.index)

    def empty(self, shape: tuple[int, ...], dtype: str):
        return self.torch.empty(tuple(shape), dtype=getattr(self.torch, dtype), device=f"cuda:{self.index}")

    def upload(self, dst, array: np.ndarray) -> None:
        with self.torch.cuda.stream(self.stream):
            dst.copy_(self.torch.from_numpy(array))

    def download(self, src) -> np.ndarray:
        return src.cpu().numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def capture(self, fn):
        graph = self.torch.cuda.CUDAGraph()
        # thread-local capture mode, as trtexec uses: TensorRT may query events from its own threads meanwhile
        with self.torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            fn()
        return graph

    def replay(self, graph) -> None:
        with self.torch.cuda.stream(self.stream):
            graph.replay()


make_device = TorchCuda  # tests replace this with a CPU stand-in
MAX_CACHED_SHAPES = 4  # input shapes whose buffers (and CUDA graphs) stay allocated


class TrtBackend(Backend):
    """Runs a yolo7-export TensorRT engine; outputs by contract name, like every backend."""

    name = "tensorrt"

    def __init__(self, path: str | Path, cuda_graph: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise trt_env._error(f"engine not found: {self.path}")
        self.sidecar = read_sidecar(self.path)
        self.info = model_info(self.sidecar)
        self.cuda_graph = bool(cuda_graph)
        built_lib = str(self.sidecar["tensorrt"].get("library", "tensorrt"))
        try:
            trt = trt_env.import_library("rtx" if built_lib == "tensorrt-rtx" else "tensorrt")
        except Exception as exc:  # UserError: the library that built the engine is not installed here
            other = "tensorrt" if built_lib == "tensorrt-rtx" else "rtx"
            raise trt_env._error(f"engine {self.path.name} was built by {_lib_name(built_lib)} "
                                 f"{self.sidecar['tensorrt']['version']}: {exc}; or rebuild it with yolo7-export "
                                 f"CHECKPOINT --trt --trt-lib {other}") from exc
        self.trt_version = trt.__version__
        self.library = trt_env.library(trt)
        self.cuda = make_device()
        self.device = self.cuda.device_info()
        for warning in check_compat(self.sidecar, trt.__version__, self.device, self.path.name, self.library):
            log.warning(warning)
        data = self.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sidecar["engine"]["sha256"]:
            raise trt_env._error(f"{self.path.name} does not match its sidecar (sha256 differs): the engine was "
                                 f"replaced or modified after the build; rebuild it")
        self.logger = trt_env.make_logger(trt)
        self.runtime = trt_env.create(trt, trt.Runtime, self.logger, "runtime")
        if (self.sidecar.get("build") or {}).get("version_compatible"):
            self.runtime.engine_host_code_allowed = True  # the plan carries its own lean runtime
        plugins = [trt_env.PluginOp(**p) for p in self.sidecar.get("plugins", [])]
        if plugins or not trt_env.is_rtx(trt):  # TensorRT-RTX has no plugin library
            trt_env.init_plugins(trt, self.logger, plugins)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise trt_env._error(f"TensorRT {trt.__version__} could not load {self.path.name} "
                                 f"({self.logger.last_error or 'no reason given'}): {REBUILD_HINT}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise trt_env._error(f"could not create an execution context for {self.path.name} "
                                 f"({self.logger.last_error or 'out of GPU memory?'})")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.input_names) != 1:
            raise trt_env._error(f"{self.path.name} has inputs {self.input_names}; expected one image input")
        self.input_name = self.input_names[0]
        self.input_shape = tuple(int(d) for d in self.engine.get_tensor_shape(self.input_name))
        self.dtypes = {n: self._torch_dtype(n) for n in names}
        self._buffers: dict[tuple[int, ...], dict] = {}  # per input shape, least recently used first
        self._graphs: dict[tuple[int, ...], object] = {}
        self._bound: tuple[int, ...] | None = None
        self.cuda_graph_error = ""

    def _torch_dtype(self, name: str) -> str:
        dtype = self.engine.get_tensor_dtype(name)
        key = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
        if key not in TORCH_DTYPES:
            raise trt_env._error(f"engine tensor {name!r} has type {key}, which this runtime does not handle")
        return TORCH_DTYPES[key]

    @property
    def fixed_batch(self) -> int | None:
        return self.input_shape[0] if self.input_shape[0] > 0 else None

    @property
    def max_batch(self) -> int | None:
        """A static engine's batch, else the maximum of its optimization profile 0 (``--max-batch``)."""
        if self.fixed_batch:
            return self.fixed_batch
        _, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        return int(tuple(hi)[0])

    def _release(self) -> None:
        """Graphs and buffers first (they live in the context's memory), then context, engine, runtime."""
        self._graphs.clear()
        self._buffers.clear()
        self._bound = None
        self.context = self.engine = self.runtime = None

    @property
    def stream(self):
        return self.cuda.stream

    def _bind(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Make the context ready for this input shape: buffers per input shape, addresses by tensor name.

        Buffers (and CUDA graphs, which hold their addresses) are cached per full input shape, not per batch
        size: a dynamic-size engine sees many (H, W). The cache keeps the ``MAX_CACHED_SHAPES`` most recently
        used shapes; evicting a shape drops its graph with its buffers, so a graph never replays on freed memory.
        """
        shape = tuple(int(s) for s in shape)
        expected = self.input_shape
        if len(shape) != len(expected) or any(e >= 0 and e != s for e, s in zip(expected, shape)):
            raise trt_env._error(f"input of shape {shape} does not fit engine input {self.input_name} "
                                 f"{tuple(expected)}")
        dynamic = any(d < 0 for d in expected)
        if shape in self._buffers:
            self._buffers[shape] = self._buffers.pop(shape)  # most recently used last
        else:
            if dynamic and not self.context.set_input_shape(self.input_name, shape):
                self._bound = None
                lo, _, hi = (tuple(int(v) for v in d) for d in self.engine.get_tensor_profile_shape(self.input_name, 0))
                raise trt_env._error(f"input shape {shape} is outside the engine's profile ({lo} .. {hi}); rebuild "
                                     f"with a larger --max-batch / --max-img, or feed a shape inside it")
            buffers = {self.input_name: self.cuda.empty(shape, self.dtypes[self.input_name])}
            for name in self.output_names:
                out_shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                buffers[name] = self.cuda.empty(out_shape, self.dtypes[name])
            self._buffers[shape] = buffers
            self._bound = None  # addresses not set yet
            while len(self._buffers) > MAX_CACHED_SHAPES:
                old = next(iter(self._buffers))
                del self._buffers[old]
                self._graphs.pop(old, None)
        if self._bound != shape:
            if dynamic:
                self.context.set_input_shape(self.input_name, shape)
            for name, tensor in self._buffers[shape].items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            self._bound = shape
        return shape

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.handle):
            raise trt_env._error(f"TensorRT execution failed: {self.logger.last_error or 'no reason given'}")

    def _shape_for(self, batch) -> tuple[int, ...]:
        """``enqueue`` accepts a batch size (the artifact's own H, W) or a full input shape."""
        if isinstance(batch, (tuple, list)):
            return tuple(int(s) for s in batch)
        rest = [d if d >= 0 else s for d, s in zip(self.input_shape[1:], (3, *self.info.imgsz))]
        return (int(batch), *rest)

    def enqueue(self, batch) -> None:
        """Queue one inference on the bound buffers of ``batch`` (a batch size or an input shape; no copies, no
        sync): for timing. With ``cuda_graph`` the first call per shape runs once, then captures a graph that
        later calls of the same shape replay; if capture fails (a graph TensorRT cannot capture, e.g.
        data-dependent shapes in an NMS loop) the backend says so once and keeps using normal launches."""
        self._ensure_open()
        shape = self._bind(self._shape_for(batch))
        if not self.cuda_graph:
            self._execute()
            return
        graph = self._graphs.get(shape)
        if graph is None:
            self._execute()  # warm-up outside capture: TensorRT finishes shape-dependent setup here
            self.cuda.synchronize()
            try:
                graph = self.cuda.capture(self._execute)
            except Exception as exc:  # noqa: BLE001 - any capture failure: fall back, never fail the inference
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("CUDA graph capture failed for input %s (%s); using normal launches", shape, first)
                self.cuda_graph, self.cuda_graph_error = False, first
                self.cuda.synchronize()
                self._execute()
                return
            self._graphs[shape] = graph
        self.cuda.replay(graph)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self._ensure_open()
        x = np.ascontiguousarray(batch, dtype=np.float32)
        shape = self._bind(x.shape)
        buffers = self._buffers[shape]
        src = x if self.dtypes[self.input_name] == "float32" else x.astype(self.dtypes[self.input_name])
        self.cuda.upload(buffers[self.input_name], src)
        self.enqueue(shape)
        self.cuda.synchronize()
        return {name: self.cuda.download(buffers[name]) for name in self.output_names}

    def describe(self) -> dict:
        return {**super().describe(), "engine": self.path.name, "tensorrt": self.trt_version,
                "gpu": self.device.name, "cuda_graph": self.cuda_graph, "library": self.library}
