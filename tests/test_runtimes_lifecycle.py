"""Backends as runners (runtimes/backend.py): in-memory models, open/close, no torch for ONNX Runtime."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from runtimes.base import Detector
from runtimes.contract import ModelInfo
from runtimes.metadata import read_info, write_metadata
from runtimes.onnx_backend import OnnxBackend

ROOT = Path(__file__).resolve().parents[1]
H = W = 32


def _tiny_onnx() -> onnx.ModelProto:
    """images [B,3,32,32] -> output [B,384,8] (a reshape: 5 + 3 classes per row), with our metadata."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, 384, 8])
    graph = helper.make_graph([helper.make_node("Reshape", ["images", "shape"], ["output"])], "tiny",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, H, W])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 384, 8])],
                              [shape])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    write_metadata(proto, ModelInfo(names=["a", "b", "c"], stride=[8.0, 16.0, 32.0], imgsz=(H, W), batch=None))
    return proto


def test_in_memory_model_equals_the_file(tmp_path):
    proto = _tiny_onnx()
    path = tmp_path / "tiny.onnx"
    onnx.save(proto, str(path))
    x = np.random.default_rng(0).random((2, 3, H, W), dtype=np.float32)
    outs = []
    for source in (path, proto, proto.SerializeToString()):
        with OnnxBackend(source) as backend:
            assert backend.info == read_info(proto) and backend.label.endswith(("tiny.onnx", "in-memory ONNX"))
            outs.append(backend.infer(x)["output"])
    assert outs[0].shape == (2, 384, 8)
    np.testing.assert_array_equal(outs[0], x.reshape(2, 384, 8))
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_close_releases_the_session_and_refuses_later_use():
    backend = OnnxBackend(_tiny_onnx())
    with Detector(backend) as det:
        det.run(np.zeros((1, 3, H, W), np.float32))
    assert backend.closed and backend.session is None
    with pytest.raises(RuntimeError, match="after close"):
        backend.infer(np.zeros((1, 3, H, W), np.float32))
    backend.close()  # idempotent


def test_dynamic_onnx_has_no_max_batch():
    with OnnxBackend(_tiny_onnx()) as backend:
        assert backend.fixed_batch is None and backend.max_batch is None


def test_onnx_backend_does_not_import_torch(tmp_path):
    """Opening an ONNX used to import torch through the exporter (4.5 s): the runtime reads metadata itself."""
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_onnx(), str(path))
    code = ("import sys, numpy as np\n"
            "from runtimes.base import Detector, open_backend\n"
            f"det = Detector(open_backend({str(path)!r}))\n"
            f"det.run(np.zeros((1, 3, {H}, {W}), np.float32))\n"
            "heavy = sorted(m for m in ('torch', 'exporter', 'onnx') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
