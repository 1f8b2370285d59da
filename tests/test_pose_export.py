"""YOLOv7-pose: official pose-branch checkpoints load, fuse (implicit layers folded), export, and match the
official outputs in PyTorch and ONNX Runtime; keypoints go through both index-reporting NMS tails and equal
the official ``non_max_suppression_kpt``; batches equal their images one by one.

Fixtures: tests/data/pose (made by the official pose-branch code; FIXTURES_README.md): ``out`` is the
official unfused eval output, ``nms_kpt``/``nms_kpt_fused`` the official keypoint NMS on the unfused/fused
model. Tolerances (the issue's): boxes and keypoint x/y within 0.05 px, scores/visibilities within 1e-3.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter.checkpoint import load_checkpoint
from exporter.errors import UserError
from exporter.fuse import fuse_model
from exporter.heads_keypoint import IKeypoint
from exporter.model import build_model
from exporter.onnx_export import ExportConfig, export_onnx
from exporter.options import ExportOptions, NmsOptions
from exporter.pipeline import run
from runtimes.contract import KPT_OUTPUT, NMS_INDICES, ModelInfo
from runtimes.keypoints import non_max_suppression_kpt

POSE = Path(__file__).parent / "data" / "pose"
FIXTURES = sorted(p.stem for p in POSE.glob("*.pt"))
SMALL = "dev_yolov7-w6-pose-kpt1x1_w00625"  # 320x320, the cheapest to export
PX, PROB = 0.05, 1e-3
NKPT = 17


def _data(name: str) -> dict:
    d = np.load(POSE / f"{name}.npz")
    return {k: d[k] for k in d.files} | {"meta": json.loads(str(d["meta"]))}


def _input(d: dict) -> np.ndarray:
    return d["image_u8"].astype(np.float32) / 255


def _cols(nc: int = 1):
    """(pixel columns, probability columns) of a pose row: box xywh + keypoint x/y; obj, cls, visibilities."""
    k0 = 5 + nc
    px = [0, 1, 2, 3] + [k0 + 3 * j + c for j in range(NKPT) for c in (0, 1)]
    prob = [4, *range(5, k0)] + [k0 + 3 * j + 2 for j in range(NKPT)]
    return px, prob


def assert_rows_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    px, prob = _cols()
    assert got.shape == ref.shape, f"{what}: shape {got.shape} vs {ref.shape}"
    dpx = np.abs(got[..., px] - ref[..., px]).max()
    dprob = np.abs(got[..., prob] - ref[..., prob]).max()
    assert dpx <= PX and dprob <= PROB, f"{what}: max px error {dpx:.4g}, max prob error {dprob:.3g}"


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request):
    name = request.param
    d = _data(name)
    ckpt = load_checkpoint(POSE / f"{name}.pt")
    return name, d, ckpt


def test_load_reads_pose_facts(fixture):
    name, d, ckpt = fixture
    assert ckpt.head_type == "IKeypoint" and ckpt.task == "pose"
    assert ckpt.nkpt == d["meta"]["model"]["nkpt"] == NKPT and ckpt.nc == 1
    assert ckpt.dw_conv_kpt == d["meta"]["model"]["dw_conv_kpt"]
    np.testing.assert_allclose(ckpt.anchors_px, d["meta"]["model"]["anchors_px"])  # _aa: autoanchor's, not yaml's


def test_torch_unfused_and_fused_match_official(fixture):
    name, d, ckpt = fixture
    model = build_model(ckpt)
    x = torch.from_numpy(_input(d))
    with torch.no_grad():
        unfused = model(x).numpy()
    assert_rows_close(unfused, d["out"], f"{name} unfused")
    report = fuse_model(model)
    head = model.head
    assert isinstance(head, IKeypoint) and head.implicit_folded and report.implicit_heads == 1
    assert not any(type(m).__name__ in ("ImplicitA", "ImplicitM") for m in model.modules())  # folded, not skipped
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        fused = model(x).numpy()
    assert_rows_close(fused, d["out"], f"{name} fused")
    assert_rows_close(fused, unfused, f"{name} fused vs unfused")


def _ort(proto: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"images": x})))


_RAW: dict = {}


def _raw_proto(ckpt, size, fused: bool, dynamic_batch: bool = False) -> onnx.ModelProto:
    """The raw pose graph exported once per (checkpoint, size, fused, dynamic); tails are added by surgery."""
    key = (ckpt.sha256, size, fused, dynamic_batch)
    if key not in _RAW:
        model = build_model(ckpt)
        if fused:
            fuse_model(model)
        info = ModelInfo(names=ckpt.names, stride=ckpt.stride, imgsz=size, task="pose", nkpt=ckpt.nkpt,
                         batch=None if dynamic_batch else 1)
        _RAW[key] = export_onnx(model, info, ExportConfig(imgsz=size, dynamic_batch=dynamic_batch))
    return _RAW[key]


def _with_tail(raw: onnx.ModelProto, mode: str) -> onnx.ModelProto:
    """The pipeline's pose tail on a raw graph: pose NMS options, append_nms(keep_raw) + append_keypoints."""
    from exporter.nms_keypoints import append_keypoints, pose_nms_options
    from exporter.nms_tail import append_nms

    nms = pose_nms_options(NmsOptions(mode=mode, conf=0.25, iou=0.45, topk=300), mode)
    return append_keypoints(append_nms(raw, nms, 1, keep_raw=True), 1, NKPT)


def test_onnx_unfused_and_fused_match_official(fixture):
    name, d, ckpt = fixture
    x = _input(d)
    size = tuple(x.shape[2:])
    for fused in (False, True):
        out = _ort(_raw_proto(ckpt, size, fused), x)["output"]
        assert out.shape == (1, d["out"].shape[1], 5 + 1 + 3 * NKPT)
        assert_rows_close(out, d["out"], f"{name} ORT {'fused' if fused else 'unfused'}")


def test_runtime_keypoint_nms_equals_official(fixture):
    """runtimes.keypoints.non_max_suppression_kpt on the official output == the official NMS rows."""
    name, d, _ = fixture
    got = non_max_suppression_kpt(d["out"], nc=1, nkpt=NKPT, conf=0.25, iou=0.45, max_det=300)[0]
    ref = d["nms_kpt"]
    assert len(got) == len(ref) > 0
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def _nms_export(tmp: Path, name: str, size, mode: str, **kw) -> Path:
    opts = ExportOptions(checkpoint=POSE / f"{name}.pt", out_dir=tmp, imgsz=size,
                         nms=NmsOptions(mode=mode, conf=0.25, iou=0.45, topk=300), **kw)
    return run(opts).onnx_path


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("mode", ["portable", "onnx"])
def test_nms_tail_keypoints_equal_official(fixture, mode, fused):
    name, d, ckpt = fixture
    x = _input(d)
    proto = _with_tail(_raw_proto(ckpt, tuple(x.shape[2:]), fused=fused), mode)
    assert [o.name for o in proto.graph.output][-1] == KPT_OUTPUT
    o = _ort(proto, x)
    ref = d["nms_kpt_fused" if fused else "nms_kpt"]  # official detect.py (fused) / notebook (unfused) paths
    n = int(o["num_dets"][0, 0])
    assert n == len(ref) > 0, f"{name} {mode}: {n} detections, official {len(ref)}"
    got = np.concatenate([o["det_boxes"][0, :n], o["det_scores"][0, :n, None],
                          o["det_classes"][0, :n, None].astype(np.float32),
                          o[KPT_OUTPUT][0, :n].reshape(n, -1)], 1)
    xyxy = [0, 1, 2, 3] + [6 + 3 * j + c for j in range(NKPT) for c in (0, 1)]
    prob = [4] + [8 + 3 * j for j in range(NKPT)]
    assert np.abs(got[:, xyxy] - ref[:, xyxy]).max() <= PX
    assert np.abs(got[:, prob] - ref[:, prob]).max() <= PROB
    assert (got[:, 5] == ref[:, 5]).all()
    assert (o[NMS_INDICES][0, n:] == -1).all() and not o[KPT_OUTPUT][0, n:].any()  # padding


@pytest.fixture(scope="module")
def dynamic_exports():
    """The smallest fixture exported with a dynamic batch: raw and both NMS tails."""
    d = _data(SMALL)
    raw = _raw_proto(load_checkpoint(POSE / f"{SMALL}.pt"), tuple(d["image_u8"].shape[2:]), True, dynamic_batch=True)
    return d, {"none": raw, "portable": _with_tail(raw, "portable"), "onnx": _with_tail(raw, "onnx")}


def _mixed_batch(d: dict) -> np.ndarray:
    x = _input(d)[0]
    rng = np.random.default_rng(0)
    noise = rng.random(x.shape, dtype=np.float32)
    return np.stack([x, x[:, :, ::-1], noise, np.full_like(x, 114 / 255), x]).astype(np.float32)


@pytest.mark.parametrize("mode", ["none", "portable", "onnx"])
def test_mixed_batch_equals_images_one_by_one(dynamic_exports, mode):
    d, protos = dynamic_exports
    batch = _mixed_batch(d)
    together = _ort(protos[mode], batch)
    for i in range(len(batch)):
        alone = _ort(protos[mode], batch[i:i + 1])
        if mode == "none":
            assert_rows_close(together["output"][i:i + 1], alone["output"], f"image {i}")
            continue
        n = int(alone["num_dets"][0, 0])
        assert int(together["num_dets"][i, 0]) == n
        np.testing.assert_array_equal(together[NMS_INDICES][i], alone[NMS_INDICES][0])
        np.testing.assert_allclose(together[KPT_OUTPUT][i], alone[KPT_OUTPUT][0], atol=1e-3)
        np.testing.assert_allclose(together["det_boxes"][i], alone["det_boxes"][0], atol=1e-3)
    # the first and last image are the same picture: same keypoints wherever they sit in the batch
    np.testing.assert_allclose(together[KPT_OUTPUT if mode != "none" else "output"][0],
                               together[KPT_OUTPUT if mode != "none" else "output"][-1], atol=1e-4)
    if mode != "none":
        assert int(together["num_dets"][0, 0]) > 0


def test_det_kpts_are_the_kept_rows_keypoints(dynamic_exports):
    """det_kpts[b, k] == raw output[b, det_indices[b, k], 6:] (the gather is per image)."""
    d, protos = dynamic_exports
    batch = _mixed_batch(d)
    raw = _ort(protos["none"], batch)["output"]
    o = _ort(protos["portable"], batch)
    for b in range(len(batch)):
        n = int(o["num_dets"][b, 0])
        rows = o[NMS_INDICES][b, :n]
        np.testing.assert_allclose(o[KPT_OUTPUT][b, :n].reshape(n, -1), raw[b, rows, 6:], atol=1e-4)


def test_pipeline_export_is_deterministic_and_carries_pose_metadata(tmp_path):
    d = _data(SMALL)
    size = tuple(d["image_u8"].shape[2:])
    a = _nms_export(tmp_path / "a", SMALL, size, "portable")
    b = _nms_export(tmp_path / "b", SMALL, size, "portable")
    assert a.read_bytes() == b.read_bytes()
    proto = onnx.load(str(a))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["yolo7_export.task"] == "pose" and meta["yolo7_export.nkpt"] == NKPT
    assert meta["yolo7_export.nms_params"]["obj_only_single_class"] is False  # official kpt NMS: obj * cls
    assert [o.name for o in proto.graph.output] == ["num_dets", "det_boxes", "det_scores", "det_classes",
                                                    NMS_INDICES, KPT_OUTPUT]


def test_efficient_tail_refused_for_pose(tmp_path):
    opts = ExportOptions(checkpoint=POSE / f"{SMALL}.pt", out_dir=tmp_path, imgsz=(320, 320),
                         nms=NmsOptions(mode="efficient"))
    with pytest.raises(UserError, match="--nms portable"):
        run(opts)
    assert not list(tmp_path.glob("*.onnx"))


def test_dynamic_size_export_matches_pytorch(tmp_path):
    """--dynamic (batch, H, W): the keypoint grid follows the feature-map shape; two sizes, batch 2."""
    import onnxruntime as ort

    ckpt = load_checkpoint(POSE / f"{SMALL}.pt")
    model = build_model(ckpt)
    fuse_model(model)
    path = run(ExportOptions(checkpoint=POSE / f"{SMALL}.pt", out_dir=tmp_path, imgsz=(320, 320), dynamic=True,
                             min_imgsz=(128, 128), max_imgsz=(448, 448))).onnx_path
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    img = _input(_data("dev_yolov7-w6-pose_w00625"))  # 256x448
    for h, w in ((256, 448), (192, 320)):
        x = np.ascontiguousarray(np.concatenate([img, img[..., ::-1]])[:, :, :h, :w])
        got = s.run(None, {"images": x})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert_rows_close(got, ref, f"--dynamic at {h}x{w}")
