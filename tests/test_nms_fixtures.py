"""NMS tails on the real exported fixtures (tests/data/official): official parity and tail agreement.

Each checkpoint is exported once per module (dynamic batch, simplified, like the CLI) at its .npz input
size; the tails are appended to that raw ONNX by append_nms, exactly as the pipeline does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from exporter.cli import export_command
from exporter.nms_tail import BOXES, SCORES, append_nms
from exporter.onnx_export import ExportConfig, export_onnx, read_info
from exporter.options import NmsOptions
from exporter.pipeline import load_fused
from runtimes.contract import NMS_INDICES, NMS_OUTPUTS, ModelInfo
from runtimes.nms_reference import (efficient_nms_reference, non_max_suppression, portable_nms_reference, xywh2xyxy,
                                     yolo_scores)

DATA = Path(__file__).parent / "data" / "official"
CHECKPOINTS = sorted(DATA.glob("*.pt"))
IDS = [p.stem for p in CHECKPOINTS]


@pytest.fixture(scope="module")
def exported():
    """stem -> (raw ONNX, dynamic batch, image [1,3,H,W] float32), exported on first use.

    simplify=False: onnxslim would triple the export time here; the CLI tests below cover the simplified path.
    """
    cache: dict[str, tuple[onnx.ModelProto, np.ndarray]] = {}

    def get(ckpt: Path):
        if ckpt.stem not in cache:
            z = np.load(ckpt.with_suffix(".npz"))
            image = z["image_u8"].astype(np.float32) / np.float32(255)
            hw = tuple(int(v) for v in image.shape[2:])
            meta, model = load_fused(ckpt)
            info = ModelInfo(names=meta.names, stride=meta.stride, imgsz=hw, batch=None)
            raw = export_onnx(model, info, ExportConfig(imgsz=hw, dynamic_batch=True, simplify=False))
            cache[ckpt.stem] = raw, image
        return cache[ckpt.stem]

    return get


class session:  # noqa: N801 - reads like the ORT constructor it wraps
    """ORT session whose run(None, ...) gives the four contract outputs (det_indices is tested on its own)."""

    def __init__(self, model: onnx.ModelProto):
        self.sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs() if o.name != NMS_INDICES]

    def run(self, names, feed):
        return self.sess.run(names or self.names, feed)


def nc_of(model: onnx.ModelProto) -> int:
    return read_info(model).nc


def plugin_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    node = next(n for n in graph.nodes if n.op == "EfficientNMS_TRT")
    graph.outputs = list(node.inputs)
    graph.cleanup()
    return gs.export_onnx(graph)


def four_images(image: np.ndarray) -> np.ndarray:
    """A mixed batch: the image, mirrored, darker, shifted (real content, no saturated-score ties)."""
    return np.ascontiguousarray(np.concatenate([image, image[..., ::-1], image * np.float32(0.7),
                                                np.roll(image, 37, axis=3)]))


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=IDS)
def test_onnx_tail_reproduces_official_nms(exported, ckpt):
    """--nms onnx --best-class in ONNX Runtime == official non_max_suppression stored in the .npz."""
    raw, image = exported(ckpt)
    model = append_nms(raw, NmsOptions(mode="onnx", conf=0.25, iou=0.45, topk=300, best_class=True), nc_of(raw))
    num, boxes, scores, classes = session(model).run(None, {"images": image})
    ref = np.load(ckpt.with_suffix(".npz"))["nms_fused"]
    n = int(num[0, 0])
    assert n == len(ref) > 0
    # pair rows by order; rows with equal scores may come in either order
    order = np.lexsort((classes[0, :n], -np.round(scores[0, :n], 4)))
    ref_order = np.lexsort((ref[:, 5], -np.round(ref[:, 4], 4)))
    np.testing.assert_allclose(boxes[0, :n][order], ref[ref_order, :4], atol=0.05)
    np.testing.assert_allclose(scores[0, :n][order], ref[ref_order, 4], atol=1e-4)
    np.testing.assert_array_equal(classes[0, :n][order], ref[ref_order, 5].astype(np.int32))
    assert not boxes[0, n:].any() and not scores[0, n:].any()


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=IDS)
def test_efficient_tail_matches_onnx_tail(exported, ckpt):
    """EfficientNMS_TRT (CPU reference on the graph's plugin inputs) == onnx tail, batch 1 and 4.

    Multi-label; class-agnostic for the *_nc3 fixtures, per class for the others. Agreement is exact
    (same FP32 boxes/scores; same greedy order) because the inputs have no tied scores and fewer than 5000
    candidates (checked); see test_nms_tail for why.
    """
    raw, image = exported(ckpt)
    opts = dict(conf=0.25, iou=0.45, topk=300, agnostic=ckpt.stem.endswith("nc3"))
    onnx_tail = session(append_nms(raw, NmsOptions(mode="onnx", **opts), nc_of(raw)))
    prefix = session(plugin_inputs(append_nms(raw, NmsOptions(mode="efficient", **opts), nc_of(raw))))
    for batch in (image, four_images(image)):
        boxes, scores = prefix.run(None, {"images": batch})
        cand = [s[s >= 0.25] for s in scores]
        assert all(len(np.unique(c)) == len(c) and len(c) <= 5000 for c in cand)
        got = onnx_tail.run(None, {"images": batch})
        want = efficient_nms_reference(boxes, scores, 0.25, 0.45, 300, class_agnostic=opts["agnostic"])
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert got[0].min() > 0


def _assert_close_to(num, boxes, scores, classes, ref: np.ndarray) -> None:
    """Count exact; boxes within 0.05 px, scores within 1e-4, classes equal (rows of equal score in any order)."""
    n = int(num)
    assert n == len(ref) > 0
    order = np.lexsort((classes[:n], -np.round(scores[:n], 4)))
    ref_order = np.lexsort((ref[:, 5], -np.round(ref[:, 4], 4)))
    np.testing.assert_allclose(boxes[:n][order], ref[ref_order, :4], atol=0.05)
    np.testing.assert_allclose(scores[:n][order], ref[ref_order, 4], atol=1e-4)
    np.testing.assert_array_equal(classes[:n][order], ref[ref_order, 5].astype(np.int32))
    assert not boxes[n:].any() and not scores[n:].any()


PORTABLE_OUTPUTS = [*NMS_OUTPUTS, NMS_INDICES, "output"]


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=IDS)
def test_portable_tail_reproduces_official_nms(exported, ckpt):
    """--nms portable --best-class == the official NMS (stored .npz result) at batch 1 and inside a batch of 4;
    the other images of the batch == the official NMS on their own raw output, and every image == the portable
    reference exactly; det_indices gather the raw rows behind each detection."""
    raw, image = exported(ckpt)
    nc = len(read_info(raw).names)
    model = append_nms(raw, NmsOptions(mode="portable", conf=0.25, iou=0.45, topk=300, best_class=True), nc,
                       keep_raw=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    official = np.load(ckpt.with_suffix(".npz"))["nms_fused"]
    for batch in (image, four_images(image)):
        num, boxes, scores, classes, idx, out = sess.run(PORTABLE_OUTPUTS, {"images": batch})
        _assert_close_to(num[0, 0], boxes[0], scores[0], classes[0], official)
        mine = non_max_suppression(out, 0.25, 0.45, max_det=300)
        for i in range(len(batch)):
            _assert_close_to(num[i, 0], boxes[i], scores[i], classes[i], mine[i])
        want = portable_nms_reference(out, 0.25, 0.45, 300, multi_label=False)
        for name, g, w in zip(PORTABLE_OUTPUTS, (num, boxes, scores, classes, idx), want):
            np.testing.assert_array_equal(g, w, err_msg=name)
        for i in range(len(batch)):
            n = int(num[i, 0])
            rows = out[i, idx[i, :n]]
            np.testing.assert_array_equal(boxes[i, :n], xywh2xyxy(rows[:, :4]))
            np.testing.assert_array_equal(scores[i, :n], yolo_scores(rows, nc)[np.arange(n), classes[i, :n]])


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=IDS)
def test_portable_multi_label_equals_efficient_reference(exported, ckpt):
    """Multi-label (agnostic for the *_nc3 fixtures): portable tail == EfficientNMS_TRT's CPU reference on the
    graph's own boxes/scores, batch 1 and 4 (no tied scores and fewer candidates than the cap: checked)."""
    raw, image = exported(ckpt)
    nc = len(read_info(raw).names)
    agnostic = ckpt.stem.endswith("nc3")
    opts = dict(conf=0.25, iou=0.45, topk=300, agnostic=agnostic)
    sess = session(append_nms(raw, NmsOptions(mode="portable", **opts), nc))
    prefix = session(plugin_inputs(append_nms(raw, NmsOptions(mode="efficient", **opts), nc)))
    for batch in (image, four_images(image)):
        boxes, scores = prefix.run(None, {"images": batch})
        cand = [s[s >= 0.25] for s in scores]
        assert all(len(np.unique(c)) == len(c) and len(c) <= 1024 for c in cand)
        got = sess.run(None, {"images": batch})
        want = efficient_nms_reference(boxes, scores, 0.25, 0.45, 300, class_agnostic=agnostic)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert got[0].min() > 0


def test_mixed_batch_equals_one_by_one(exported):
    raw, image = exported(DATA / "dev_yolov7-tiny_w050_nc5.pt")
    batch = four_images(image)
    for mode in ("onnx", "portable"):
        sess = session(append_nms(raw, NmsOptions(mode=mode, topk=300), nc_of(raw)))
        together = sess.run(None, {"images": batch})
        assert len(set(int(n) for n in together[0][:, 0])) > 1  # the images really differ
        for i in range(len(batch)):
            for t, a in zip(together, sess.run(None, {"images": batch[i:i + 1]})):
                np.testing.assert_allclose(t[i:i + 1], a, atol=1e-4)  # the network may differ ~1 ulp by batch


def test_single_class_scores_not_capped(exported):
    """nc == 1: det_scores are the objectness (as the official NMS), not obj * (untrained) cls."""
    raw, image = exported(DATA / "dev_yolov7-w6_w00625_nc1.pt")
    model = append_nms(raw, NmsOptions(mode="onnx", topk=300), nc_of(raw))
    extra = gs.import_onnx(model)
    extra.outputs.append(extra.tensors()["output"])  # also expose the raw predictions
    num, _, scores, classes, out = session(gs.export_onnx(extra)).run(None, {"images": image})
    n = int(num[0, 0])
    obj, cls = out[0, :, 4], out[0, :, 5]
    idx = np.array([np.flatnonzero(obj == s)[0] for s in scores[0, :n]])
    assert not classes.any() and n == len(np.load(DATA / "dev_yolov7-w6_w00625_nc1.npz")["nms_fused"])
    assert (cls[idx] < 0.99).all()  # obj * cls would be smaller: the class term really is left out
    np.testing.assert_array_equal(scores[0, :n], obj[idx])


@pytest.mark.parametrize("mode", ["onnx", "efficient"])
def test_cli_end_to_end(tmp_path, mode):
    ckpt = DATA / "dev_yolov7-tiny_w050_nc5.pt"
    args = [str(ckpt), "--out", str(tmp_path), "--img", "320,416", "--nms", mode, "--topk", "300", "--dynamic-batch"]
    if mode == "onnx":
        args.append("--best-class")
    result = CliRunner().invoke(export_command, args)
    assert result.exit_code == 0, result.output
    model = onnx.load(tmp_path / f"{ckpt.stem}.onnx")
    assert [o.name for o in model.graph.output] == list(NMS_OUTPUTS) + ([NMS_INDICES] if mode == "onnx" else [])
    info = read_info(model)
    assert info.nms == mode and info.nms_params["topk"] == 300 and info.batch is None
    if mode == "efficient":
        assert sum(n.op_type == "EfficientNMS_TRT" for n in model.graph.node) == 1
        return
    image = np.load(ckpt.with_suffix(".npz"))["image_u8"].astype(np.float32) / np.float32(255)
    num, boxes, scores, classes = session(model).run(None, {"images": image})
    ref = np.load(ckpt.with_suffix(".npz"))["nms_fused"]
    assert num[0, 0] == len(ref)
    np.testing.assert_allclose(scores[0, :len(ref)], ref[:, 4], atol=1e-4)


def test_scores_prefix_names(exported):
    """The tails share a named prefix (nms/boxes, nms/scores): the harness can cut there too."""
    raw, _ = exported(DATA / "dev_yolov7-tiny_w050_nc5.pt")
    names = {t for n in append_nms(raw, NmsOptions(mode="onnx"), nc_of(raw)).graph.node for t in n.output}
    assert {BOXES, SCORES} <= names
