"""runtimes/trt_backend.py against the REAL TensorRT 10.x / 11.x Python API (bindings via the trt-stub).

The engine and sidecar come from exporter/trt_build.build_engine (with fakes), so the build -> run contract
is exercised end to end. CUDA is replaced by a CPU stand-in whose buffers are real host memory: the fake
engine reads its input from the address bound with ``set_tensor_address`` and writes its output there, so
name-based binding, shapes and copies are checked by the numbers that come back.
"""
from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
import torch

from exporter.errors import UserError
from exporter.options import TrtOptions
from runtimes import trt_backend, trt_env
from runtimes.contract import ModelInfo

try:
    from .test_trt_fake import FakeTrt, import_trt
except ImportError:
    from test_trt_fake import FakeTrt, import_trt

pytestmark = pytest.mark.trt_api

GPU = trt_env.CudaDevice("NVIDIA A10 (fake)", (8, 6), "12.4")
H = W = 32
ROWS, COLS = 5, 7
MAX_BATCH = 4


class CpuDevice:
    """Stands in for runtimes.trt_backend.TorchCuda with host tensors (a graph records; replay runs it)."""

    handle = 1234
    stream = "stream"

    def __init__(self):
        self.captures = 0

    def device_info(self):
        return GPU

    def empty(self, shape, dtype):
        return torch.zeros(shape, dtype=getattr(torch, dtype))

    def upload(self, dst, array):
        dst.copy_(torch.from_numpy(array))

    def download(self, src):
        return src.numpy().copy()

    def synchronize(self):
        pass

    def capture(self, fn):
        self.captures += 1
        return fn

    def replay(self, graph):
        graph()


def _host_array(addr: int, shape) -> np.ndarray:
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(addr)).reshape(shape)


def fake_engine(fakes: FakeTrt, trt, hw_dynamic: bool = False):
    """An engine images[-1,3,H,W] -> output[-1,ROWS,COLS]; output[i] = mean of image i (+ row index).
    ``hw_dynamic``: images[-1,3,-1,-1] (a --dynamic engine)."""
    state = {"shape": None, "addr": {}}

    def set_input_shape(name, shape):
        if not 1 <= shape[0] <= MAX_BATCH:
            return False
        state["shape"] = tuple(shape)
        return True

    def execute(handle):
        x = _host_array(state["addr"]["images"], state["shape"])
        out = _host_array(state["addr"]["output"], (state["shape"][0], ROWS, COLS))
        out[:] = x.mean(axis=(1, 2, 3))[:, None, None] + np.arange(ROWS, dtype=np.float32)[None, :, None]
        return True

    def tensor_shape(name):
        return trt.Dims(([-1, 3, -1, -1] if hw_dynamic else [-1, 3, H, W]) if name == "images" else [-1, ROWS, COLS])

    ctx = fakes.obj("IExecutionContext", set_input_shape=set_input_shape, execute_async_v3=execute,
                    set_tensor_address=lambda name, addr: state["addr"].__setitem__(name, addr) or True,
                    get_tensor_shape=lambda name: trt.Dims(list(state["shape"]) if name == "images"
                                                           else [state["shape"][0], ROWS, COLS]))
    engine = fakes.obj(
        "ICudaEngine", num_io_tensors=2, get_tensor_name=lambda i: ["images", "output"][i],
        get_tensor_mode=lambda n: trt.TensorIOMode.INPUT if n == "images" else trt.TensorIOMode.OUTPUT,
        get_tensor_shape=tensor_shape, get_tensor_dtype=lambda n: trt.DataType.FLOAT,
        create_execution_context=lambda *a: ctx,
        get_tensor_profile_shape=lambda n, p: [trt.Dims([1, 3, H, W]), trt.Dims([1, 3, H, W]),
                                               trt.Dims([MAX_BATCH, 3, H, W])])
    return engine, state


@pytest.fixture
def trt():
    return import_trt()


@pytest.fixture
def built(trt, tmp_path, monkeypatch):
    """engine + sidecar from the real build_engine (with fakes); returns a function to change the sidecar."""
    import onnx
    from onnx import TensorProto, helper

    from exporter.trt_build import build_engine

    monkeypatch.setattr(trt_env, "cuda_device", lambda index=0: GPU)
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, H, W])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 3, H, W])])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with monkeypatch.context() as m:
        f = FakeTrt(trt)
        images = f.obj("ITensor", name="images", shape=trt.Dims([-1, 3, H, W]), dtype=trt.DataType.FLOAT)
        f.impl.update({"OnnxParser.parse_from_file": True, "INetworkDefinition.num_inputs": 1,
                       "INetworkDefinition.num_outputs": 0, "INetworkDefinition.get_input": lambda i: images,
                       "Builder.build_serialized_network": b"PLAN-BYTES"})
        f.install(m)
        info = ModelInfo(names=["x", "y"], stride=[8.0, 16.0, 32.0], imgsz=(H, W), batch=None, precision="fp16")
        result = build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", info, TrtOptions(enabled=True), 1, True)
    monkeypatch.setattr(trt_backend, "make_device", CpuDevice)

    def edit(**changes):
        side = json.loads(result.sidecar_path.read_text())
        for key, value in changes.items():
            section, _, field = key.partition("__")
            side[section][field] = value
        result.sidecar_path.write_text(json.dumps(side))

    return result, edit


@pytest.fixture
def runtime_fakes(trt, monkeypatch):
    fakes = FakeTrt(trt)
    engine, state = fake_engine(fakes, trt)
    fakes.impl["Runtime.deserialize_cuda_engine"] = engine
    fakes.install(monkeypatch)
    return fakes, state


def test_infer_binds_by_name_and_returns_engine_outputs(trt, built, runtime_fakes):
    fakes, state = runtime_fakes
    result, _ = built
    backend = trt_backend.TrtBackend(result.engine_path)
    assert backend.info.names == ["x", "y"] and backend.info.imgsz == (H, W) and backend.fixed_batch is None
    x = np.random.default_rng(0).random((3, 3, H, W), dtype=np.float32)
    out = backend.infer(x)
    assert set(out) == {"output"} and out["output"].shape == (3, ROWS, COLS)
    expected = x.mean(axis=(1, 2, 3))[:, None, None] + np.arange(ROWS, dtype=np.float32)[None, :, None]
    np.testing.assert_allclose(out["output"], np.broadcast_to(expected, (3, ROWS, COLS)), rtol=1e-6)
    assert fakes.args("Runtime.deserialize_cuda_engine") == [(b"PLAN-BYTES",)]
    assert fakes.args("IExecutionContext.set_input_shape")[0] == ("images", (3, 3, H, W))
    bound = dict(fakes.args("IExecutionContext.set_tensor_address"))
    assert bound == {"images": backend._buffers[(3, 3, H, W)]["images"].data_ptr(),
                     "output": backend._buffers[(3, 3, H, W)]["output"].data_ptr()}
    assert fakes.args("IExecutionContext.execute_async_v3") == [(CpuDevice.handle,)]
    names = fakes.names()
    assert names.index("init_libnvinfer_plugins") < names.index("Runtime.deserialize_cuda_engine")


def test_batch_sizes_get_their_own_buffers(trt, built, runtime_fakes):
    fakes, _ = runtime_fakes
    backend = trt_backend.TrtBackend(built[0].engine_path)
    a, b = np.ones((1, 3, H, W), np.float32), np.full((2, 3, H, W), 2.0, np.float32)
    assert backend.infer(a)["output"][0, 0, 0] == pytest.approx(1.0)
    assert backend.infer(b)["output"][:, 0, 0] == pytest.approx([2.0, 2.0])
    assert backend.infer(a)["output"][0, 1, 0] == pytest.approx(2.0)  # back to batch 1: rebound, row 1 = 1 + 1
    assert [s[1][0] for s in fakes.args("IExecutionContext.set_input_shape")] == [1, 1, 2, 2, 1]
    with pytest.raises(UserError, match="outside the engine's profile \\(\\(1, 3, 32, 32\\) .. \\(4, 3, 32, 32\\)\\)"):
        backend.infer(np.zeros((5, 3, H, W), np.float32))
    with pytest.raises(UserError, match="does not fit engine input"):
        backend.infer(np.zeros((1, 3, H + 32, W), np.float32))


def test_cuda_graph_captured_after_one_warm_up_run(trt, built, runtime_fakes):
    fakes, _ = runtime_fakes
    backend = trt_backend.TrtBackend(built[0].engine_path, cuda_graph=True)
    x = np.ones((2, 3, H, W), np.float32)
    assert backend.infer(x)["output"][0, 0, 0] == pytest.approx(1.0)
    assert backend.cuda.captures == 1 and len(fakes.args("IExecutionContext.execute_async_v3")) == 2  # warm-up, replay
    assert backend.infer(x * 3)["output"][1, 0, 0] == pytest.approx(3.0)
    assert backend.cuda.captures == 1 and len(fakes.args("IExecutionContext.execute_async_v3")) == 3  # replay only


def test_cuda_graph_capture_failure_falls_back_to_normal_launches(trt, built, runtime_fakes, monkeypatch, caplog):
    fakes, _ = runtime_fakes

    def refuse(self, fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\ndetails")

    monkeypatch.setattr(CpuDevice, "capture", refuse)
    backend = trt_backend.TrtBackend(built[0].engine_path, cuda_graph=True)
    x = np.ones((2, 3, H, W), np.float32)
    assert backend.infer(x)["output"][:, 0, 0] == pytest.approx([1.0, 1.0])  # the inference still happens
    assert backend.cuda_graph is False and "operation not permitted" in backend.cuda_graph_error
    assert "CUDA graph capture failed" in caplog.text
    assert backend.infer(x * 2)["output"][:, 0, 0] == pytest.approx([2.0, 2.0])
    assert not backend._graphs and backend.describe()["cuda_graph"] is False


@pytest.fixture
def dynamic_fakes(trt, monkeypatch):
    fakes = FakeTrt(trt)
    engine, state = fake_engine(fakes, trt, hw_dynamic=True)
    fakes.impl["Runtime.deserialize_cuda_engine"] = engine
    fakes.install(monkeypatch)
    return fakes, state


def test_graphs_and_buffers_are_per_input_shape_never_per_batch_size(trt, built, dynamic_fakes):
    """A --dynamic engine sees the same batch size at many (H, W): each shape gets its own buffers and graph."""
    fakes, state = dynamic_fakes
    backend = trt_backend.TrtBackend(built[0].engine_path, cuda_graph=True)
    small, large = np.ones((1, 3, H, W), np.float32), np.full((1, 3, 2 * H, W), 3.0, np.float32)
    assert backend.infer(small)["output"][0, 0, 0] == pytest.approx(1.0)
    assert backend.infer(large)["output"][0, 0, 0] == pytest.approx(3.0)
    assert state["shape"] == (1, 3, 2 * H, W) and backend.cuda.captures == 2
    assert backend.infer(small * 5)["output"][0, 0, 0] == pytest.approx(5.0)  # replays the small graph
    assert state["shape"] == (1, 3, H, W) and backend.cuda.captures == 2
    assert set(backend._graphs) == {(1, 3, H, W), (1, 3, 2 * H, W)}
    backend.enqueue(1)  # a batch size alone means the artifact's own size
    assert state["shape"] == (1, 3, H, W)


def test_buffer_and_graph_cache_is_bounded(trt, built, runtime_fakes, monkeypatch):
    monkeypatch.setattr(trt_backend, "MAX_CACHED_SHAPES", 2)
    backend = trt_backend.TrtBackend(built[0].engine_path, cuda_graph=True)
    for n in (1, 2, 3, 4, 1):
        out = backend.infer(np.full((n, 3, H, W), float(n), np.float32))["output"]
        assert out[:, 0, 0] == pytest.approx([float(n)] * n)
        assert len(backend._buffers) <= 2 and set(backend._graphs) <= set(backend._buffers)
    assert list(backend._buffers) == [(4, 3, H, W), (1, 3, H, W)]  # least recently used evicted first
    assert backend.cuda.captures == 5  # batch 1 was evicted with its graph, so it was captured again


def test_version_mismatch_refused_before_deserializing(trt, built, runtime_fakes):
    fakes, _ = runtime_fakes
    result, edit = built
    edit(tensorrt__version="9.9.9.9")
    with pytest.raises(UserError, match=f"built for TensorRT 9.9.9.9, this machine has TensorRT {trt.__version__}"):
        trt_backend.TrtBackend(result.engine_path)
    assert "Runtime.__init__" not in fakes.names()


def test_gpu_mismatch_refused(trt, built, runtime_fakes):
    result, edit = built
    edit(gpu__compute_capability="8.9", gpu__name="NVIDIA L4")
    with pytest.raises(UserError, match="compute capability 8.9 \\(NVIDIA L4\\).*8.6.*rebuild"):
        trt_backend.TrtBackend(result.engine_path)


def test_version_compatible_engine_allows_host_code(trt, built, runtime_fakes):
    fakes, _ = runtime_fakes
    result, edit = built
    edit(build__version_compatible=True, tensorrt__version="10.0.0")
    trt_backend.TrtBackend(result.engine_path)
    assert fakes.args("Runtime.engine_host_code_allowed=") == [(True,)]


def test_modified_engine_and_unloadable_engine_are_clear_errors(trt, built, runtime_fakes):
    fakes, _ = runtime_fakes
    result, _ = built
    fakes.impl["Runtime.deserialize_cuda_engine"] = None
    with pytest.raises(UserError, match="could not load m.engine.*rebuild"):
        trt_backend.TrtBackend(result.engine_path)
    result.engine_path.write_bytes(b"PLAN-BYTES-tampered")
    with pytest.raises(UserError, match="does not match its sidecar"):
        trt_backend.TrtBackend(result.engine_path)


def test_open_backend_picks_tensorrt_for_engines(trt, built, runtime_fakes):
    from runtimes.base import open_backend

    backend = open_backend(built[0].engine_path, cuda_graph=False)
    assert isinstance(backend, trt_backend.TrtBackend)
    assert backend.describe()["tensorrt"] == trt.__version__ and backend.describe()["gpu"] == GPU.name


def test_max_batch_comes_from_the_engine_profile(trt, built, runtime_fakes):
    """yolo7-bench times a dynamic engine only at batch sizes its profile takes (issue: it asked for batch 32
    of a --max-batch 8 engine and stopped before writing the report)."""
    from exporter.check.harness import _batches_for
    from runtimes.base import Detector

    backend = trt_backend.TrtBackend(built[0].engine_path)
    assert backend.fixed_batch is None and backend.max_batch == MAX_BATCH
    assert _batches_for(Detector(backend), (1, 2, MAX_BATCH + 1, 32)) == [1, 2]
    assert _batches_for(Detector(backend), (8, 32)) == [1]  # nothing fits: the smallest batch, not a crash


def test_close_releases_the_engine_and_refuses_later_use(trt, built, runtime_fakes):
    with trt_backend.TrtBackend(built[0].engine_path) as backend:
        backend.infer(np.ones((2, 3, H, W), np.float32))
        assert backend._buffers and backend.context is not None
    assert backend.closed and backend.context is None and backend.engine is None and not backend._buffers
    with pytest.raises(RuntimeError, match="after close"):
        backend.infer(np.ones((1, 3, H, W), np.float32))
    backend.close()  # idempotent
