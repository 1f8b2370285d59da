"""TensorRT build/runtime logic that needs no TensorRT: error messages, sidecar checks, trtexec line, CLI.

tensorrt is replaced by small module objects here; the checks against the real bindings are in
test_trt_api_*.py (marker trt_api).
"""
from __future__ import annotations

import builtins
import ctypes
import json
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from exporter.errors import UserError
from exporter.options import TrtOptions
from exporter.trt_build import Profile, check_options, resolve_profile, trtexec_command
from runtimes import trt_backend, trt_env
from runtimes.contract import ModelInfo

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
A10 = trt_env.CudaDevice("NVIDIA A10", (8, 6), "12.4")
INFO = ModelInfo(names=["a"], stride=[8.0, 16.0, 32.0], imgsz=(384, 640), batch=None)


# ---------------------------------------------------------------- import / environment errors

def test_tensorrt_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ModuleNotFoundError
    with pytest.raises(UserError, match=r"^TensorRT is not installed: pip install tensorrt-cu12.*nvcr.io/nvidia/tensorrt"):
        trt_env.import_tensorrt()


def test_bindings_without_native_libraries(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("libnvinfer.so.10: cannot open shared object file: No such file or directory")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UserError, match="bindings are installed but its native libraries.*libnvinfer.so.10.*cuXX-libs"):
        trt_env.import_tensorrt()


def test_old_tensorrt_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(UserError, match="TensorRT 8.6.1 is too old.*10.x or 11.x"):
        trt_env.import_tensorrt()


def test_builder_creation_failure_explained():
    def factory(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    stub = types.SimpleNamespace(__version__="11.4.0.106", __trt_stub__=True)
    with pytest.raises(UserError, match="API stub without native libraries"):
        trt_env.create(stub, factory, types.SimpleNamespace(last_error=""), "builder")
    real = types.SimpleNamespace(__version__="10.16.1.11")
    with pytest.raises(UserError, match=r"could not create a TensorRT runtime \(CUDA initialization failure.*driver"):
        trt_env.create(real, factory, types.SimpleNamespace(last_error="CUDA initialization failure with error 35"),
                       "runtime")


def test_feature_gate_names_the_missing_api():
    old = types.SimpleNamespace(__version__="10.0.1", HardwareCompatibilityLevel=types.SimpleNamespace(NONE=0))
    with pytest.raises(UserError, match="--hardware-compat ampere\\+ is not available in TensorRT 10.0.1"):
        trt_env.require_attr(old, "HardwareCompatibilityLevel.AMPERE_PLUS", "--hardware-compat ampere+")
    assert trt_env.require_attr(old, "HardwareCompatibilityLevel.NONE", "x") == 0


def test_build_engine_without_tensorrt_writes_nothing(monkeypatch, tmp_path):
    from exporter.trt_build import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"not used")
    with pytest.raises(UserError, match="TensorRT is not installed"):
        build_engine(onnx_path, tmp_path / "m.engine", INFO, TrtOptions(enabled=True, lib="tensorrt"), 1, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    # auto with neither library: TensorRT's error, which also names the RTX extra
    monkeypatch.setattr(trt_env, "rtx_installed", lambda: False)
    with pytest.raises(UserError, match=r"TensorRT is not installed.*TensorRT-RTX: pip install -e \"\.\[rtx\]\""):
        build_engine(onnx_path, tmp_path / "m.engine", INFO, TrtOptions(enabled=True), 1, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


class _FakeCuda:
    """libcuda stand-in: fills the ctypes out-parameters like the driver API does."""

    def __init__(self, devices=1):
        self.devices = devices

    def cuInit(self, flags):
        return 0

    def cuDeviceGetCount(self, ref):
        ref._obj.value = self.devices
        return 0

    def cuDeviceGet(self, ref, index):
        ref._obj.value = index
        return 0

    def cuDeviceGetName(self, buf, size, dev):
        buf.value = b"NVIDIA H100 80GB HBM3"
        return 0

    def cuDeviceGetAttribute(self, ref, attr, dev):
        ref._obj.value = {75: 9, 76: 0}[attr]
        return 0

    def cuDriverGetVersion(self, ref):
        ref._obj.value = 12040
        return 0


def test_cuda_device_probe(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: _FakeCuda())
    assert trt_env.cuda_device() == trt_env.CudaDevice("NVIDIA H100 80GB HBM3", (9, 0), "12.4", 0)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: _FakeCuda(devices=0))
    assert trt_env.cuda_device() is None

    def no_driver(name):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    assert trt_env.cuda_device() is None
    with pytest.raises(UserError, match="no CUDA GPU found"):
        trt_env.require_gpu()


# ---------------------------------------------------------------- plugins

def _onnx_with(tmp_path, node) -> Path:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "p.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_plugin_ops_found_by_domain(tmp_path):
    nms = helper.make_node("EfficientNMS_TRT", ["x"], ["y"], domain="TRT", plugin_version="1", score_threshold=0.25)
    assert trt_env.plugin_ops(_onnx_with(tmp_path, nms)) == [trt_env.PluginOp("EfficientNMS_TRT", "1", "")]
    assert trt_env.plugin_ops(_onnx_with(tmp_path, helper.make_node("Relu", ["x"], ["y"]))) == []


def test_plugin_registry_errors():
    needed = [trt_env.PluginOp("EfficientNMS_TRT")]
    calls = []
    registry = types.SimpleNamespace(get_creator=lambda *a: calls.append(a))
    trt = types.SimpleNamespace(__version__="10.16.1.11", init_libnvinfer_plugins=lambda logger, ns: False,
                                get_plugin_registry=lambda: registry)
    with pytest.raises(UserError, match="libnvinfer_plugin\\) could not be initialised.*EfficientNMS_TRT"):
        trt_env.init_plugins(trt, None, needed)
    trt.init_libnvinfer_plugins = lambda logger, ns: True
    with pytest.raises(UserError, match="EfficientNMS_TRT \\(version 1\\) is not in the plugin registry"):
        trt_env.init_plugins(trt, None, needed)
    assert calls == [("EfficientNMS_TRT", "1", "")]
    trt_env.init_plugins(trt, None, [])  # no plugins needed: nothing to check


# ---------------------------------------------------------------- profile and trtexec line

def test_profile_defaults_and_validation():
    p = resolve_profile("images", (-1, 3, 384, 640), INFO, TrtOptions(), batch=4, dynamic=True)
    assert p == Profile("images", (1, 3, 384, 640), (4, 3, 384, 640), (32, 3, 384, 640))
    p = resolve_profile("images", (-1, 3, -1, -1), INFO, TrtOptions(opt_batch=8, max_batch=64), batch=1, dynamic=True)
    assert p.opt == (8, 3, 384, 640) and p.max == (64, 3, 384, 640)
    assert resolve_profile("images", (2, 3, 384, 640), INFO, TrtOptions(), batch=2, dynamic=False) is None
    assert resolve_profile("images", (2, 3, 384, 640), INFO, TrtOptions(), batch=2, dynamic=True) is None
    with pytest.raises(UserError, match="opt \\(40\\) <= max \\(16\\)"):
        resolve_profile("images", (-1, 3, 384, 640), INFO, TrtOptions(max_batch=16), batch=40, dynamic=True)
    with pytest.raises(UserError, match="expected \\[batch, 3, height, width\\]"):
        resolve_profile("images", (1, 3, 640), INFO, TrtOptions(), batch=1, dynamic=False)


def test_option_errors():
    with pytest.raises(UserError, match="--workspace must be > 0"):
        check_options(TrtOptions(workspace_gib=0))
    with pytest.raises(UserError, match="--hardware-compat 'turing\\+'"):
        check_options(TrtOptions(hardware_compat="turing+"))
    check_options(TrtOptions(workspace_gib=0.5, opt_level=5, hardware_compat="ampere+"))


def test_trtexec_command_per_version():
    profile = Profile("images", (1, 3, 640, 640), (1, 3, 640, 640), (32, 3, 640, 640))
    opts = TrtOptions(workspace_gib=1.5, opt_level=5, timing_cache=Path("my cache.bin"), version_compatible=True,
                      hardware_compat="ampere+")
    cmd10 = trtexec_command(Path("out/m.onnx"), Path("out/m.engine"), opts, profile, trt_major=10)
    assert cmd10 == ("trtexec --onnx=out/m.onnx --saveEngine=out/m.engine --skipInference --stronglyTyped "
                     "--minShapes=images:1x3x640x640 --optShapes=images:1x3x640x640 --maxShapes=images:32x3x640x640 "
                     "--memPoolSize=workspace:1536 --builderOptimizationLevel=5 '--timingCacheFile=my cache.bin' "
                     "--versionCompatible --hardwareCompatibilityLevel=ampere+")
    cmd11 = trtexec_command(Path("m.onnx"), Path("m.engine"), TrtOptions(), None, trt_major=11)
    assert cmd11 == "trtexec --onnx=m.onnx --saveEngine=m.engine --skipInference"


# ---------------------------------------------------------------- sidecar checks (runtime side)

def sidecar(trt="10.16.1.11", cc="8.6", name="NVIDIA A10", vc=False, hw="none") -> dict:
    return {"format": trt_env.SIDECAR_FORMAT, "tensorrt": {"version": trt}, "gpu": {"name": name, "compute_capability": cc},
            "build": {"version_compatible": vc, "hardware_compat": hw}, "engine": {"sha256": ""},
            "model": {"names": ["a", "b"], "stride": [8, 16, 32], "imgsz": [320, 320], "batch": None,
                      "precision": "int8", "nms": "efficient"}}


def test_compat_same_machine_ok_and_other_card_same_cc_warns():
    assert trt_backend.check_compat(sidecar(), "10.16.1.11", A10, "m.engine") == []
    warnings = trt_backend.check_compat(sidecar(name="NVIDIA A40"), "10.16.1.11", A10, "m.engine")
    assert len(warnings) == 1 and "NVIDIA A40" in warnings[0] and "NVIDIA A10" in warnings[0]


def test_compat_version_and_gpu_mismatch_messages():
    with pytest.raises(UserError) as err:
        trt_backend.check_compat(sidecar(trt="10.13.3.9"), "10.16.1.11", A10, "m.engine")
    msg = str(err.value)
    assert msg.startswith("engine m.engine was built for TensorRT 10.13.3.9, this machine has TensorRT 10.16.1.11")
    assert "rebuild it on this machine (yolo7-export CHECKPOINT --trt)" in msg and "\n" not in msg
    l4 = trt_env.CudaDevice("NVIDIA L4", (8, 9))
    with pytest.raises(UserError, match="TensorRT 11.4.0.106.*; and for compute capability 8.6 \\(NVIDIA A10\\), "
                                        "NVIDIA L4 has 8.9"):
        trt_backend.check_compat(sidecar(trt="11.4.0.106"), "10.16.1.11", l4, "m.engine")


def test_compat_portable_engines():
    l4, t4 = trt_env.CudaDevice("NVIDIA L4", (8, 9)), trt_env.CudaDevice("Tesla T4", (7, 5))
    assert trt_backend.check_compat(sidecar(vc=True, trt="10.8.0.43"), "10.16.1.11", A10, "m") == []
    with pytest.raises(UserError, match="10.16.1.11 or later \\(version-compatible\\)"):
        trt_backend.check_compat(sidecar(vc=True), "10.8.0.43", A10, "m")
    assert trt_backend.check_compat(sidecar(hw="ampere+"), "10.16.1.11", l4, "m") == []
    with pytest.raises(UserError, match="Ampere or newer GPUs.*Tesla T4 has compute capability 7.5"):
        trt_backend.check_compat(sidecar(hw="ampere+"), "10.16.1.11", t4, "m")


def test_sidecar_reading(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(UserError, match="m.engine.json not found next to m.engine"):
        trt_backend.read_sidecar(engine)
    trt_env.sidecar_path(engine).write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        trt_backend.read_sidecar(engine)
    trt_env.sidecar_path(engine).write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a yolo7-export engine sidecar"):
        trt_backend.read_sidecar(engine)
    trt_env.sidecar_path(engine).write_text(json.dumps(sidecar()))
    info = trt_backend.model_info(trt_backend.read_sidecar(engine))
    assert info.names == ["a", "b"] and info.imgsz == (320, 320) and info.nms == "efficient" and info.batch is None


def test_trt_backend_errors_before_tensorrt(tmp_path):
    with pytest.raises(UserError, match="engine not found"):
        trt_backend.TrtBackend(tmp_path / "missing.engine")
    (tmp_path / "m.engine").write_bytes(b"plan")
    with pytest.raises(UserError, match="sidecar"):
        trt_backend.TrtBackend(tmp_path / "m.engine")


# ---------------------------------------------------------------- the CLI on a machine without TensorRT

def test_cli_trt_fails_with_one_line_and_no_engine(tmp_path):
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("yolo7-export")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "exporter.cli"]
    proc = subprocess.run(cmd + [str(DATA / "official" / "dev_yolov7-tiny_w050_nc5.pt"), "--trt", "--trt-lib",
                                 "tensorrt", "--img", "64", "-o", str(out)], capture_output=True, text=True, timeout=120)
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    if has_trt and trt_env.cuda_device() is not None:
        pytest.skip("this machine can build TensorRT engines")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert ("TensorRT is not installed" in lines[0]) if not has_trt else ("GPU" in lines[0] or "TensorRT" in lines[0])
    assert not out.exists() or not [p for p in out.rglob("*") if p.suffix in (".engine", ".partial", ".json")]


@pytest.mark.parametrize("args, message", [
    (["--nms", "efficient", "--iou", "0"], "--iou 0.0: EfficientNMS_TRT needs an IoU threshold > 0"),
    (["--nms", "efficient", "--topk", "1", "--iou", "0.0"], "IoU threshold > 0"),
    (["--trt-arch", "sm90", "--trt"], "--trt-arch 'sm90': expected compute capabilities among"),
    (["--trt-arch", "sm86"], "--trt-arch needs --trt"),
    (["--min-img", "64"], "--min-img/--max-img need --dynamic"),
    (["--dynamic", "--img", "128", "--min-img", "256"], "--dynamic needs --min-img 256x256 <= --img 128x128"),
    (["--dynamic", "--img", "128", "--max-img", "100"], "image size 100 is not a multiple"),
])
def test_cli_refuses_bad_values_before_export(tmp_path, args, message):
    """Values EfficientNMS_TRT or the profile would reject fail at the command line (exit 2, one line, nothing
    written), not as a TensorRT parse error after the export."""
    from exporter.cli import main

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", "import sys; from exporter.cli import main; main(sys.argv[1:])",
                           str(DATA / "official" / "dev_yolov7-tiny_w050_nc5.pt"), "--img", "64", "-o", str(out),
                           *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert main is not None
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "exporting" not in proc.stderr  # refused before the export
    assert not out.exists() or not list(out.iterdir())


def test_rtx_compat_checks_library_version_and_targets():
    side = {"tensorrt": {"library": "tensorrt-rtx", "version": "1.7.1.116"}, "targets": ["sm86", "sm89"],
            "gpu": None, "build": {}}
    rtx4090 = trt_env.CudaDevice("NVIDIA GeForce RTX 4090", (8, 9))
    assert trt_backend.check_compat(side, "1.7.1.116", rtx4090, "m.engine", "tensorrt-rtx") == []
    with pytest.raises(UserError, match="built by TensorRT-RTX 1.7.1.116, and this runtime loaded TensorRT "
                                        "10.16.1.11: rebuild it with yolo7-export CHECKPOINT --trt --trt-lib tensorrt"):
        trt_backend.check_compat(side, "10.16.1.11", rtx4090, "m.engine", "tensorrt")
    with pytest.raises(UserError, match="built by TensorRT 10.16.1.11, and this runtime loaded TensorRT-RTX"):
        trt_backend.check_compat(sidecar(), "1.7.1.116", A10, "m.engine", "tensorrt-rtx")
    with pytest.raises(UserError, match="TensorRT-RTX 1.7.1.116, this machine has TensorRT-RTX 1.8.0.1"):
        trt_backend.check_compat(side, "1.8.0.1", rtx4090, "m.engine", "tensorrt-rtx")
    rtx5090 = trt_env.CudaDevice("NVIDIA GeForce RTX 5090", (12, 0))
    with pytest.raises(UserError) as err:
        trt_backend.check_compat(side, "1.7.1.116", rtx5090, "m.engine", "tensorrt-rtx")
    assert str(err.value) == ("engine m.engine was built for sm86,sm89, NVIDIA GeForce RTX 5090 is sm120: rebuild it "
                              "with yolo7-export CHECKPOINT --trt --trt-lib rtx --trt-arch sm120")


def test_trt_backend_names_the_missing_library(tmp_path, monkeypatch):
    """An RTX engine on a machine without TensorRT-RTX: one line naming the install and the rebuild."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    side = sidecar()
    side["tensorrt"] = {"library": "tensorrt-rtx", "version": "1.7.1.116"}
    trt_env.sidecar_path(engine).write_text(json.dumps(side))
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    with pytest.raises(UserError, match="m.engine was built by TensorRT-RTX 1.7.1.116: TensorRT-RTX is not "
                                        "installed.*or rebuild it with yolo7-export CHECKPOINT --trt --trt-lib tensorrt"):
        trt_backend.TrtBackend(engine)


def test_build_on_cpu_torch_warns_that_running_needs_cuda(monkeypatch, caplog):
    import torch

    from exporter.trt_build import warn_if_cannot_run

    monkeypatch.setattr(torch.version, "cuda", None)
    warn_if_cannot_run()
    assert "CPU build" in caplog.text and "needs a CUDA build of torch" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    warn_if_cannot_run()
    assert caplog.text == ""


def test_parse_arch():
    from exporter.trt_build import parse_arch

    assert parse_arch("sm86,sm89, sm120") == ("sm86", "sm89", "sm120")
    assert parse_arch("8.6,86,sm_86") == ("sm86",)
    assert parse_arch("all") == trt_env.RTX_TARGETS and parse_arch(None) is None
    with pytest.raises(UserError, match="--trt-arch 'sm90'"):
        parse_arch("sm86,sm90")


# ---------------------------------------------------------------- benchmarks/gpu_suite.py on a machine without GPU

def test_gpu_suite_dry_run_reports_skips(tmp_path):
    suite = ROOT / "benchmarks" / "gpu_suite.py"
    proc = subprocess.run([sys.executable, str(suite), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    trt_line = next(line for line in proc.stdout.splitlines() if line.startswith("TensorRT: "))
    reason = trt_env.unavailable_reason()
    if reason is None:
        assert plan["environment"]["tensorrt"]["available"] is True
    else:
        assert trt_line == f"TensorRT: skipped ({reason})"
        assert plan["skipped"]["TensorRT"] == reason and plan["environment"]["tensorrt"]["available"] is False
    assert plan["config"]["batches"] == "[1, 32]" and plan["parity"] == {} and plan["latency"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # a dry run exports nothing
    bad = subprocess.run([sys.executable, str(suite), "--dry-run", "--precisions", "fp8", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--precisions: unknown ['fp8']" in bad.stderr
