"""exporter/trt_build.py against the REAL TensorRT 10.x / 11.x Python API (bindings via the trt-stub).

Every TensorRT object is a strict fake checked against the imported bindings (test_trt_fake.py), so a
call that the real version would reject (a removed flag, a wrong signature, a wrong enum) fails here.
Run for each version by .ci/trt_api.sh; skips when tensorrt is not importable.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from exporter.errors import UserError
from exporter.options import TrtOptions
from runtimes import trt_env
from runtimes.contract import ModelInfo

try:
    from .test_trt_fake import FakeTrt, import_trt
except ImportError:
    from test_trt_fake import FakeTrt, import_trt

pytestmark = pytest.mark.trt_api

GPU = trt_env.CudaDevice("NVIDIA A10 (fake)", (8, 6), "12.4")
H = W = 64
PLAN = b"serialized-plan\x00\x01" * 8


def write_onnx(path: Path, plugin: bool = False) -> Path:
    """A tiny ONNX standing in for the model: TensorRT never reads it here, but we hash and scan it."""
    nodes = [helper.make_node("Identity", ["images"], ["output"])]
    if plugin:
        nodes.append(helper.make_node("EfficientNMS_TRT", ["output"], ["num_dets"], domain="",
                                      plugin_version="1", max_output_boxes=100))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, H, W])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 3, H, W])])
    onnx.save(helper.make_model(graph), str(path))
    return path


def info(batch=None, nms="none") -> ModelInfo:
    return ModelInfo(names=["a", "b"], stride=[8.0, 16.0, 32.0], imgsz=(H, W), nms=nms, precision="fp16",
                     batch=batch, source_sha256="c" * 64, tool_version="test")


@pytest.fixture
def trt():
    return import_trt()


@pytest.fixture
def fakes(trt, monkeypatch):
    """Fakes for a successful build of a network with input images[-1,3,H,W] and output[-1,N,7]."""
    monkeypatch.setattr(trt_env, "cuda_device", lambda index=0: GPU)
    f = FakeTrt(trt)
    images = f.obj("ITensor", name="images", shape=trt.Dims([-1, 3, H, W]), dtype=trt.DataType.FLOAT)
    output = f.obj("ITensor", name="output", shape=trt.Dims([-1, 252, 7]), dtype=trt.DataType.FLOAT)
    f.impl.update({
        "OnnxParser.parse_from_file": True,
        "INetworkDefinition.num_inputs": 1, "INetworkDefinition.num_outputs": 1,
        "INetworkDefinition.get_input": lambda i: images, "INetworkDefinition.get_output": lambda i: output,
        "Builder.build_serialized_network": PLAN,
        "ITimingCache.serialize": b"new-timing-cache",
        "IPluginRegistry.get_creator": lambda *a: object(),
    })
    return f.install(monkeypatch)


def build(tmp_path, opts=None, plugin=False, batch=1, dynamic=True, model=None):
    from exporter.trt_build import build_engine

    onnx_path = write_onnx(tmp_path / "m.onnx", plugin=plugin)
    return build_engine(onnx_path, tmp_path / "m.engine", model or info(), opts or TrtOptions(enabled=True),
                        batch=batch, dynamic=dynamic)


def major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def test_strongly_typed_network_and_no_precision_flags(trt, fakes, tmp_path):
    build(tmp_path)
    (flags,) = fakes.args("Builder.create_network")[0]
    if major(trt) >= 11:
        assert flags == 0  # always strongly typed; the STRONGLY_TYPED flag is deprecated and ignored
    else:
        assert flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 2
    assert fakes.args("IBuilderConfig.set_flag") == []  # no FP16/INT8: precision comes from the ONNX
    assert not any(name.startswith("IBuilderConfig.int8") for name in fakes.names())


def test_plugins_initialised_before_parsing_and_checked(trt, fakes, tmp_path):
    build(tmp_path, plugin=True)
    names = fakes.names()
    assert names.index("init_libnvinfer_plugins") < names.index("OnnxParser.parse_from_file")
    assert fakes.args("init_libnvinfer_plugins")[0][1] == ""
    assert ("EfficientNMS_TRT", "1", "") in fakes.args("IPluginRegistry.get_creator")
    assert fakes.args("OnnxParser.parse_from_file") == [(str(tmp_path / "m.onnx"),)]


def test_missing_plugin_is_one_clear_error(trt, fakes, tmp_path):
    fakes.impl["IPluginRegistry.get_creator"] = None
    with pytest.raises(UserError, match="EfficientNMS_TRT .*not in the plugin registry.*--nms onnx"):
        build(tmp_path, plugin=True)
    assert "OnnxParser.parse_from_file" not in fakes.names()
    assert not (tmp_path / "m.engine").exists()


def test_dynamic_profile_and_builder_options(trt, fakes, tmp_path):
    opts = TrtOptions(enabled=True, workspace_gib=2.0, opt_level=4, version_compatible=True,
                      hardware_compat="ampere+", opt_batch=4, max_batch=16)
    result = build(tmp_path, opts, batch=1)
    (name, lo, opt, hi), = fakes.args("IOptimizationProfile.set_shape")
    assert (name, tuple(lo), tuple(opt), tuple(hi)) == ("images", (1, 3, H, W), (4, 3, H, W), (16, 3, H, W))
    assert len(fakes.args("IBuilderConfig.add_optimization_profile")) == 1
    assert fakes.args("IBuilderConfig.set_memory_pool_limit") == [(trt.MemoryPoolType.WORKSPACE, 2 << 30)]
    assert fakes.args("IBuilderConfig.builder_optimization_level=") == [(4,)]
    assert fakes.args("IBuilderConfig.set_flag") == [(trt.BuilderFlag.VERSION_COMPATIBLE,)]
    assert fakes.args("IBuilderConfig.hardware_compatibility_level=") == [
        (trt.HardwareCompatibilityLevel.AMPERE_PLUS,)]
    cmd = result.trtexec_command
    for part in ("--minShapes=images:1x3x64x64", "--optShapes=images:4x3x64x64", "--maxShapes=images:16x3x64x64",
                 "--memPoolSize=workspace:2048", "--builderOptimizationLevel=4", "--versionCompatible",
                 "--hardwareCompatibilityLevel=ampere+", f"--onnx={tmp_path / 'm.onnx'}",
                 f"--saveEngine={tmp_path / 'm.engine'}"):
        assert part in cmd
    assert ("--stronglyTyped" in cmd) == (major(trt) < 11)


def test_default_profile_max_is_32_and_static_input_needs_none(trt, fakes, tmp_path):
    build(tmp_path, batch=2)
    assert [tuple(a[3]) for a in fakes.args("IOptimizationProfile.set_shape")] == [(32, 3, H, W)]
    assert [tuple(a[2]) for a in fakes.args("IOptimizationProfile.set_shape")] == [(2, 3, H, W)]
    static = fakes.obj("ITensor", name="images", shape=trt.Dims([8, 3, H, W]), dtype=trt.DataType.FLOAT)
    fakes.impl["INetworkDefinition.get_input"] = lambda i: static
    fakes.calls.clear()
    result = build(tmp_path, batch=8, dynamic=False, model=info(batch=8))
    assert fakes.args("IOptimizationProfile.set_shape") == [] and result.profile is None
    assert "--minShapes" not in result.trtexec_command


def test_engine_and_sidecar_written_atomically(trt, fakes, tmp_path):
    result = build(tmp_path, plugin=True)
    engine = tmp_path / "m.engine"
    assert engine.read_bytes() == PLAN
    assert result.sidecar_path == tmp_path / "m.engine.json"
    side = json.loads(result.sidecar_path.read_text())
    assert side["format"] == trt_env.SIDECAR_FORMAT
    assert side["engine"]["sha256"] == hashlib.sha256(PLAN).hexdigest()
    assert side["tensorrt"]["version"] == trt.__version__
    assert side["gpu"] == {"name": GPU.name, "compute_capability": "8.6", "cuda_driver": "12.4"}
    assert side["source_onnx"]["sha256"] == hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest()
    assert side["io"] == [{"name": "images", "mode": "input", "shape": [-1, 3, H, W], "dtype": "FLOAT"},
                          {"name": "output", "mode": "output", "shape": [-1, 252, 7], "dtype": "FLOAT"}]
    assert side["precision"] == "fp16" and side["model"]["names"] == ["a", "b"]
    assert side["plugins"] == [{"op_type": "EfficientNMS_TRT", "version": "1", "namespace": ""}]
    assert side["build"]["strongly_typed"] is True and side["trtexec"] == result.trtexec_command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json", "m.onnx"]  # no temp files


def test_timing_cache_loaded_then_saved(trt, fakes, tmp_path):
    cache = tmp_path / "tc.bin"
    cache.write_bytes(b"old-timing-cache")
    result = build(tmp_path, TrtOptions(enabled=True, timing_cache=cache))
    assert fakes.args("IBuilderConfig.create_timing_cache") == [(b"old-timing-cache",)]
    (loaded, ignore_mismatch), = fakes.args("IBuilderConfig.set_timing_cache")
    assert ignore_mismatch is False
    names = fakes.names()
    assert names.index("IBuilderConfig.set_timing_cache") < names.index("Builder.build_serialized_network")
    assert names.index("ITimingCache.serialize") > names.index("Builder.build_serialized_network")
    assert cache.read_bytes() == b"new-timing-cache"
    assert f"--timingCacheFile={cache}" in result.trtexec_command


def test_mismatched_timing_cache_replaced_by_empty(trt, fakes, tmp_path):
    cache = tmp_path / "tc.bin"
    cache.write_bytes(b"cache-from-another-gpu")
    results = iter([False, True])
    fakes.impl["IBuilderConfig.set_timing_cache"] = lambda *a: next(results)
    build(tmp_path, TrtOptions(enabled=True, timing_cache=cache))
    assert fakes.args("IBuilderConfig.create_timing_cache") == [(b"cache-from-another-gpu",), (b"",)]
    assert cache.read_bytes() == b"new-timing-cache"


def test_parse_failure_lists_parser_errors_and_writes_nothing(trt, fakes, tmp_path):
    errors = [fakes.obj("ParserError", desc=lambda: "Unsupported op X", node_name=lambda: "/m/X_0",
                        node_operator=lambda: "X", node=lambda: 3),
              fakes.obj("ParserError", desc=lambda: "second problem", node_name=lambda: "",
                        node_operator=lambda: "", node=lambda: -1)]
    fakes.impl.update({"OnnxParser.parse_from_file": False, "OnnxParser.num_errors": 2,
                       "OnnxParser.get_error": lambda i: errors[i]})
    with pytest.raises(UserError) as err:
        build(tmp_path)
    msg = str(err.value)
    assert "could not parse m.onnx" in msg and "/m/X_0 (X): Unsupported op X" in msg and "second problem" in msg
    assert "\n" not in msg
    assert not (tmp_path / "m.engine").exists() and not (tmp_path / "m.engine.json").exists()


def test_failed_build_leaves_no_engine_and_keeps_timing_cache(trt, fakes, tmp_path):
    cache = tmp_path / "tc.bin"
    cache.write_bytes(b"old")
    fakes.impl["Builder.build_serialized_network"] = None
    with pytest.raises(UserError, match="could not build the engine"):
        build(tmp_path, TrtOptions(enabled=True, timing_cache=cache))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "tc.bin"]
    assert cache.read_bytes() == b"old"


def test_no_gpu_is_reported_before_touching_tensorrt(trt, fakes, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_env, "cuda_device", lambda index=0: None)
    with pytest.raises(UserError, match="no CUDA GPU"):
        build(tmp_path, TrtOptions(enabled=True, lib="tensorrt"))
    assert fakes.calls == []


def test_auto_library_prefers_tensorrt_on_a_gpu_host(trt, fakes, tmp_path, monkeypatch):
    """--trt-lib auto: TensorRT 10/11 when there is a GPU (even with TensorRT-RTX installed too)."""
    monkeypatch.setattr(trt_env, "rtx_installed", lambda: True)
    result = build(tmp_path)
    assert result.library == "tensorrt" and result.targets == ()
    side = json.loads(result.sidecar_path.read_text())
    assert side["tensorrt"]["library"] == "tensorrt" and side["targets"] == [] and side["gpu"]["name"] == GPU.name


def test_version_compatible_with_efficient_nms_is_refused(trt, fakes, tmp_path):
    """The EfficientNMS_TRT plugin is neither serialized into a version-compatible plan nor loadable by the lean
    runtime: refused with the plugin-free tail named, before anything is built (review finding)."""
    with pytest.raises(UserError, match="--version-compatible with --nms efficient.*--nms portable"):
        build(tmp_path, TrtOptions(enabled=True, version_compatible=True), plugin=True)
    assert "Builder.build_serialized_network" not in fakes.names()
    assert not (tmp_path / "m.engine").exists()
    build(tmp_path, TrtOptions(enabled=True, version_compatible=True))  # without the plugin it builds


def test_hardware_compat_needs_ampere(trt, fakes, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_env, "cuda_device", lambda index=0: trt_env.CudaDevice("Tesla T4", (7, 5)))
    with pytest.raises(UserError, match="Ampere or newer.*7.5"):
        build(tmp_path, TrtOptions(enabled=True, hardware_compat="ampere+"))


def test_stub_without_fakes_says_native_libraries_missing(trt, tmp_path, monkeypatch):
    if not getattr(trt, "__trt_stub__", False):
        pytest.skip("real TensorRT libraries present")
    monkeypatch.setattr(trt_env, "cuda_device", lambda index=0: GPU)
    with pytest.raises(UserError, match="API stub without native libraries.*pip install tensorrt"):
        build(tmp_path)
    assert not (tmp_path / "m.engine").exists()
