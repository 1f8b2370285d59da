"""Stages 2-3: fusion keeps the function, the ONNX matches the official reference in ONNX Runtime."""
from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from exporter import heads, modules
from exporter.checkpoint import load_checkpoint
from exporter.cli import export_command
from exporter.fuse import fuse_model
from exporter.model import _Pruned, build_model
from exporter.onnx_export import ExportConfig, export_onnx, read_info
from runtimes.contract import ModelInfo
from tests.conftest import OFFICIAL, OFFICIAL_NAMES, TRAINED, official_reference

BOX_TOL, PROB_TOL = 0.05, 1e-3


def _assert_matches(out: np.ndarray, ref: np.ndarray) -> None:
    assert out.shape == ref.shape
    np.testing.assert_allclose(out[..., :4], ref[..., :4], atol=BOX_TOL, rtol=0)
    np.testing.assert_allclose(out[..., 4:], ref[..., 4:], atol=PROB_TOL, rtol=0)


def _ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


def _export(model, ckpt, imgsz, **kw) -> onnx.ModelProto:
    info = ModelInfo(names=ckpt.names, stride=ckpt.stride, imgsz=imgsz, source_sha256=ckpt.sha256)
    return export_onnx(model, info, ExportConfig(imgsz=imgsz, **kw))


@pytest.mark.parametrize("name", OFFICIAL_NAMES)
def test_fused_and_unfused_onnx_match_official(name):
    ref = official_reference(name)
    x = ref["input"]
    imgsz = tuple(x.shape[2:])
    ckpt = load_checkpoint(OFFICIAL / f"{name}.pt")
    unfused = build_model(ckpt)
    fused = copy.deepcopy(unfused)
    report = fuse_model(fused)
    with torch.no_grad():
        _assert_matches(fused(torch.from_numpy(x)).numpy(), ref["out_fused"])
    proto = _export(fused, ckpt, imgsz)
    _assert_matches(_ort(proto, x), ref["out_fused"])
    _assert_matches(_ort(proto, x), ref["out"])  # fused deploy graph == official unfused model
    _assert_matches(_ort(_export(unfused, ckpt, imgsz), x), ref["out"])

    # the deploy graph: no BN, no RepConv branches, no implicit ops, no aux heads
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, heads.ImplicitA, heads.ImplicitM)) for m in fused.modules())
    assert type(fused.head) is heads.Detect and not hasattr(fused.head, "m2")
    assert all(m.rbr_reparam is not None and m.rbr_dense is None for m in fused.modules() if isinstance(m, modules.RepConv))
    if ckpt.head_type == "IAuxDetect":
        # each official P6 cfg feeds every aux head from one dedicated conv layer: nl of them go away
        assert report.aux_layers_removed == fused.head.nl
        assert not any(".m2." in k for k in fused.state_dict())
        assert sum(isinstance(m, _Pruned) for m in fused.model) == report.aux_layers_removed
    if any(isinstance(m, modules.RepConv) for m in unfused.modules()):
        assert report.repconv > 0


def test_fuse_is_idempotent():
    model = build_model(load_checkpoint(TRAINED))
    fuse_model(model)
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        a = model(x)
        second = fuse_model(model)
        b = model(x)
    assert second.conv_bn == 0 and second.implicit_heads == 0
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def trained_fused():
    ckpt = load_checkpoint(TRAINED)
    model = build_model(ckpt)
    fuse_model(model)
    return ckpt, model


def test_batch_gt_1_and_dynamic_batch_equal_single_images(trained_fused):
    ckpt, model = trained_fused
    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 320, 320), dtype=np.float32)
    single = np.concatenate([_ort(_export(model, ckpt, (320, 320)), x[i:i + 1]) for i in range(3)])
    fixed = _ort(_export(model, ckpt, (320, 320), batch=3), x)
    np.testing.assert_allclose(fixed, single, atol=1e-4, rtol=0)
    dyn = _export(model, ckpt, (320, 320), dynamic_batch=True)
    assert dyn.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    np.testing.assert_allclose(_ort(dyn, x), single, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_ort(dyn, x[:1]), single[:1], atol=1e-4, rtol=0)


def test_rectangular_input(trained_fused):
    ckpt, model = trained_fused
    proto = _export(model, ckpt, (256, 416))
    x = np.random.default_rng(1).random((1, 3, 256, 416), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = _ort(proto, x)
    assert out.shape == (1, 3 * (32 * 52 + 16 * 26 + 8 * 13), 10)
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=0)


def test_cli_is_deterministic_and_writes_metadata_and_manifest(tmp_path):
    outs = []
    for run in ("a", "b"):
        r = CliRunner().invoke(export_command, [str(TRAINED), "--img", "320", "-o", str(tmp_path / run)])
        assert r.exit_code == 0, r.output
        outs.append((tmp_path / run / "yolov7-tiny-shapes.onnx").read_bytes())
    assert outs[0] == outs[1], "same checkpoint and flags must give byte-identical ONNX"

    proto = onnx.load_from_string(outs[0])
    info = read_info(proto)
    assert info.names == ["circle", "square", "triangle", "star", "cross"]
    assert info.imgsz == (320, 320) and info.stride == [8.0, 16.0, 32.0]
    assert info.source_sha256 == hashlib.sha256(TRAINED.read_bytes()).hexdigest()
    assert info.tool_version
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["output"]

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["input"]["sha256"] == info.source_sha256
    (entry,) = manifest["outputs"]
    assert entry["sha256"] == hashlib.sha256(outs[0]).hexdigest() and entry["bytes"] == len(outs[0])
    assert {"torch", "onnx", "yolo7-export"} <= set(manifest["versions"])
    assert manifest["flags"]["imgsz"] == [320, 320]


def test_opset_and_no_simplify(tmp_path, trained_fused):
    ckpt, model = trained_fused
    plain = _export(model, ckpt, (320, 320), simplify=False, opset=13)
    slim = _export(model, ckpt, (320, 320))
    assert plain.opset_import[0].version == 13
    assert len(slim.graph.node) < len(plain.graph.node)
    x = np.random.default_rng(2).random((1, 3, 320, 320), dtype=np.float32)
    np.testing.assert_allclose(_ort(plain, x), _ort(slim, x), atol=1e-4, rtol=0)
    r = CliRunner().invoke(export_command, [str(TRAINED), "--img", "320", "--opset", "9", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "opset" in r.output
