"""Segmentation: official u7 seg checkpoints load, fuse and export; ORT equals the official outputs; the NMS +
masks tail equals the official ``non_max_suppression`` + ``process_mask`` (tests/data/seg, made by the official
code). Tolerances from the issue: boxes 0.05 px, probabilities / coefficients / prototypes 1e-3, mask IoU 0.99.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporter.checkpoint import load_checkpoint
from exporter.errors import UserError
from exporter.fuse import fuse_model
from exporter.model import build_model
from exporter.nms_masks import append_masks, seg_nms_options
from exporter.nms_tail import append_nms
from exporter.onnx_export import ExportConfig, export_onnx
from exporter.options import NmsOptions
from runtimes.contract import MASK_OUTPUTS, NMS_INDICES, NMS_OUTPUTS, PROTO_OUTPUT, RAW_OUTPUT, ModelInfo
from tests.seg_data import SEG, SEG_NAMES, mask_iou, proto_masks, seg_reference

BOX_TOL, VAL_TOL = 0.05, 1e-3


def _info(ckpt, hw, batch=1) -> ModelInfo:
    return ModelInfo(names=ckpt.names, stride=ckpt.stride, imgsz=hw, batch=batch, task=ckpt.task, nm=ckpt.nm)


def _compare_raw(out: np.ndarray, protos: np.ndarray, ref: dict) -> None:
    exp, exp_p = ref["out_fused"], ref["proto_fused"]
    assert out.shape == exp.shape and protos.shape == exp_p.shape
    assert np.abs(out[..., :4] - exp[..., :4]).max() < BOX_TOL
    assert np.abs(out[..., 4:] - exp[..., 4:]).max() < VAL_TOL  # obj, classes, raw coefficients
    assert np.abs(protos - exp_p).max() < VAL_TOL


def _sess(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def seg_models():
    cache = {}

    def get(name):
        if name not in cache:
            ckpt = load_checkpoint(SEG / f"{name}.pt")
            unfused = build_model(ckpt)
            fused = build_model(ckpt)
            fuse_model(fused)
            cache[name] = ckpt, unfused, fused
        return cache[name]

    return get


@pytest.mark.parametrize("name", SEG_NAMES)
def test_load_reads_seg_facts(name, seg_models):
    ckpt, unfused, _ = seg_models(name)
    ref = seg_reference(name)
    assert ckpt.task == "segment" and ckpt.head_type == "ISegment" and ckpt.nm == 32
    assert ckpt.names == [ref["names"][str(i)] for i in range(len(ref["names"]))]  # names is a dict in u7
    assert unfused.head.nm == 32 and unfused.head.n_out == 5 + ckpt.nc + 32


@pytest.mark.parametrize("name", SEG_NAMES)
def test_pytorch_fused_and_unfused_match_official(name, seg_models):
    _, unfused, fused = seg_models(name)
    ref = seg_reference(name)
    x = torch.from_numpy(ref["input"])
    with torch.no_grad():
        for model in (unfused, fused):
            out, protos = model(x)
            _compare_raw(out.numpy(), protos.numpy(), ref)
    assert fused.head.ia is None and unfused.head.ia is not None  # ImplicitA folded, ImplicitM never applied


@pytest.mark.parametrize("name", SEG_NAMES)
@pytest.mark.parametrize("which", ["fused", "unfused"])
def test_onnx_matches_official(name, which, seg_models):
    ckpt, unfused, fused = seg_models(name)
    ref = seg_reference(name)
    hw = tuple(ref["input"].shape[2:])
    model = export_onnx(fused if which == "fused" else unfused, _info(ckpt, hw), ExportConfig(imgsz=hw, simplify=False))
    assert [o.name for o in model.graph.output] == [RAW_OUTPUT, PROTO_OUTPUT]
    out, protos = _sess(model).run(None, {"images": ref["input"]})
    _compare_raw(out, protos, ref)


def _seg_tail(raw_model, ckpt, hw, mode="onnx", topk=1000):
    nms = seg_nms_options(NmsOptions(mode=mode, best_class=True, topk=topk), mode)
    tail = append_nms(raw_model, nms, ckpt.nc, keep_raw=True)
    return append_masks(tail, ckpt.nc, ckpt.nm, hw)


@pytest.fixture(scope="module")
def raw_dynamic(seg_models):
    cache = {}

    def get(name):
        if name not in cache:
            ckpt, _, fused = seg_models(name)
            hw = tuple(seg_reference(name)["input"].shape[2:])
            cache[name] = export_onnx(fused, _info(ckpt, hw, None), ExportConfig(imgsz=hw, dynamic_batch=True,
                                                                                  simplify=False))
        return cache[name]

    return get


def _portable_available() -> bool:
    try:
        import exporter.nms_portable  # noqa: F401
    except ImportError:
        return False
    return True


MODES = ["onnx", pytest.param("portable", marks=pytest.mark.skipif(not _portable_available(),
                                                                     reason="portable NMS tail not in this tree"))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SEG_NAMES)
def test_nms_and_masks_equal_official(name, mode, seg_models, raw_dynamic):
    ckpt, _, _ = seg_models(name)
    ref = seg_reference(name)
    hw = tuple(ref["input"].shape[2:])
    model = _seg_tail(raw_dynamic(name), ckpt, hw, mode)
    names = [o.name for o in model.graph.output]
    assert names == [*NMS_OUTPUTS, NMS_INDICES, *MASK_OUTPUTS, PROTO_OUTPUT]
    res = dict(zip(names, _sess(model).run(None, {"images": ref["input"]})))
    nms = ref["nms"]
    n = int(res["num_dets"][0, 0])
    assert n == len(nms) > 0
    assert np.abs(res["det_boxes"][0, :n] - nms[:, :4]).max() < BOX_TOL
    assert np.abs(res["det_scores"][0, :n] - nms[:, 4]).max() < VAL_TOL
    assert (res["det_classes"][0, :n] == nms[:, 5]).all()
    assert np.abs(res["det_coefs"][0, :n] - nms[:, 6:]).max() < VAL_TOL  # coefficients x obj, like official
    assert (res["det_coefs"][0, n:] == 0).all() and (res["det_masks"][0, n:] == 0).all()
    assert (res[NMS_INDICES][0, n:] == -1).all()
    # masks at prototype resolution vs the official formula on the official tensors
    expected = proto_masks(ref["proto_fused"][0], nms[:, 6:], nms[:, :4], hw)
    ours = res["det_masks"][0, :n]
    iou = mask_iou(ours > 0.5, expected > 0.5)
    assert iou.min() >= 0.99, iou.min()
    # upsampled like predict.py (bilinear, align_corners=False, > 0.5) vs the official full-size masks
    up = np.stack([cv2.resize(m, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR) for m in ours]) > 0.5
    official = ref["masks"].astype(bool)
    assert mask_iou(up, official).min() >= 0.99
    assert (up != official).sum() <= 1e-3 * official.sum()


@pytest.mark.parametrize("mode", MODES)
def test_batch_mixed_equals_one_by_one(mode, seg_models, raw_dynamic):
    """Dynamic batch: [image, flipped image, darker image] == each image alone, masks included."""
    name = SEG_NAMES[0]
    ckpt, _, _ = seg_models(name)
    ref = seg_reference(name)
    hw = tuple(ref["input"].shape[2:])
    sess = _sess(_seg_tail(raw_dynamic(name), ckpt, hw, mode, topk=100))
    x = ref["input"]
    batch = np.concatenate([x, x[..., ::-1].copy(), np.clip(x * 0.7 + 0.2, 0, 1).astype(np.float32)])
    together = sess.run(None, {"images": batch})
    for i in range(len(batch)):
        alone = sess.run(None, {"images": batch[i:i + 1]})
        n = int(alone[0][0, 0])
        assert n > 0
        for a, t in zip(alone, together):
            np.testing.assert_allclose(t[i:i + 1], a, atol=1e-5)


def test_fixed_batch_export_runs_two_images(seg_models):
    name = SEG_NAMES[-1]
    ckpt, _, fused = seg_models(name)
    ref = seg_reference(name)
    hw = tuple(ref["input"].shape[2:])
    raw = export_onnx(fused, _info(ckpt, hw, 2), ExportConfig(imgsz=hw, batch=2, simplify=False))
    model = _seg_tail(raw, ckpt, hw)
    res = _sess(model).run(None, {"images": np.concatenate([ref["input"]] * 2)})
    n = int(res[0][0, 0])
    assert n == len(ref["nms"]) and (res[0][:, 0] == n).all()
    np.testing.assert_array_equal(res[5][0], res[5][1])  # det_masks of both images


def test_efficient_refused_for_seg_and_auto_picks_portable():
    with pytest.raises(UserError, match="--nms portable"):
        seg_nms_options(NmsOptions(mode="efficient"), "efficient")
    auto = seg_nms_options(NmsOptions(mode="efficient"), "auto")
    assert auto.mode == "portable" and auto.obj_only_single_class is False
    assert seg_nms_options(replace(NmsOptions(), mode="onnx"), "onnx").obj_only_single_class is False


def test_append_masks_needs_indices_and_protos(seg_models, raw_dynamic):
    ckpt, _, _ = seg_models(SEG_NAMES[0])
    hw = tuple(seg_reference(SEG_NAMES[0])["input"].shape[2:])
    plain = append_nms(raw_dynamic(SEG_NAMES[0]), NmsOptions(mode="onnx", best_class=True), ckpt.nc)
    with pytest.raises(UserError, match="cannot add masks"):
        append_masks(plain, ckpt.nc, ckpt.nm, hw)


def test_pipeline_export_is_deterministic(tmp_path: Path):
    from exporter.options import ExportOptions
    from exporter.pipeline import run

    name = SEG_NAMES[0]
    hw = tuple(seg_reference(name)["input"].shape[2:])
    paths = []
    for k in range(2):
        opts = ExportOptions(checkpoint=SEG / f"{name}.pt", out_dir=tmp_path / str(k), imgsz=hw,
                             nms=NmsOptions(mode="onnx", best_class=True))
        result = run(opts)
        assert result.info.task == "segment" and result.info.nm == 32
        assert result.info.nms_params["obj_only_single_class"] is False
        paths.append(result.onnx_path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
