"""The portable NMS tail (issue 9) on synthetic raw graphs: exact greedy NMS, ties, the cap, indices, batches.

The raw graph is ``output = Identity(images)`` with images [B,N,5+nc(+extra)], so chosen predictions can be
fed directly. The oracle is ``runtimes.nms_reference.portable_nms_reference`` (plain numpy greedy NMS), itself
checked against the official NMS in test_nms_reference.py and test_nms_fixtures.py. Equality is exact
(``assert_array_equal``) on every output, on inputs built to have many exact score ties, duplicate boxes
and IoUs exactly at the threshold.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from exporter.cli import export_command
from exporter.errors import UserError
from exporter.nms_graph import MAX_TOPK
from exporter.nms_portable import iou_floor32
from exporter.nms_tail import append_nms
from exporter.onnx_export import finalize, read_info
from exporter.options import ExportOptions, NmsOptions, TrtOptions
from exporter.pipeline import resolve_nms_mode
from runtimes.contract import NMS_INDICES, NMS_OUTPUTS, RAW_OUTPUT, ModelInfo
from runtimes.nms_reference import non_max_suppression, portable_nms_reference, xywh2xyxy, yolo_scores

OUTPUTS = [*NMS_OUTPUTS, NMS_INDICES]


def raw_graph(nc: int, extra: int = 0, opset: int = 17, dtype: int = TensorProto.FLOAT,
              anchors: int | str = "anchors") -> onnx.ModelProto:
    shape = ["batch", anchors, 5 + nc + extra]
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "raw",
                              [helper.make_tensor_value_info("images", dtype, shape)],
                              [helper.make_tensor_value_info("output", dtype, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    info = ModelInfo(names=[f"c{i}" for i in range(nc)], stride=[8.0, 16.0, 32.0], imgsz=(640, 640), batch=None)
    return finalize(model, info)


def portable(nc: int, extra: int = 0, keep_raw: bool = False, **kw) -> ort.InferenceSession:
    model = append_nms(raw_graph(nc, extra), NmsOptions(mode="portable", **kw), nc, keep_raw=keep_raw)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, pred: np.ndarray) -> list[np.ndarray]:
    return sess.run(OUTPUTS, {"images": pred})


def reference(pred: np.ndarray, nc: int, conf=0.25, iou=0.45, topk=100, best_class=False, agnostic=False,
              candidates=1024, obj_only_single_class=True):
    return portable_nms_reference(pred, conf, iou, topk, multi_label=not best_class, agnostic=agnostic,
                                  max_candidates=candidates, nc=nc, obj_only_single_class=obj_only_single_class)


def assert_equal(got, want) -> None:
    for name, g, w in zip(OUTPUTS, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)


def tied_raw(rng: np.random.Generator, batch: int, anchors: int, nc: int, extra: int = 0) -> np.ndarray:
    """Clustered boxes on a 2 px grid (duplicates, IoU exactly 0.5 etc.), scores from a few levels (ties)."""
    pred = np.zeros((batch, anchors, 5 + nc + extra), np.float32)
    for b in range(batch):
        k = int(rng.integers(2, 12))
        centers = rng.integers(20, 300, (k, 2)) * 2.0
        sizes = rng.integers(4, 40, (k, 2)) * 4.0
        which = rng.integers(0, k, anchors)
        pred[b, :, :2] = centers[which] + rng.integers(-3, 4, (anchors, 2)) * 2.0
        pred[b, :, 2:4] = sizes[which] + rng.integers(-2, 3, (anchors, 2)) * 4.0
        pred[b, :, 4] = rng.choice(np.float32([0.1, 0.3, 0.5, 0.75, 0.9, 1.0]), anchors)
        pred[b, :, 5:5 + nc] = rng.choice(np.float32([0.0, 0.25, 0.5, 0.75, 1.0]), (anchors, nc))
        pred[b, :, 5 + nc:] = rng.normal(0, 100, (anchors, extra))  # pose/seg-like extra columns: ignored
    return pred


def continuous_raw(rng: np.random.Generator, batch: int, anchors: int, nc: int) -> np.ndarray:
    """Continuous values (no ties): the official NMS and the same-class-mask NMS agree exactly."""
    pred = np.zeros((batch, anchors, 5 + nc), np.float32)
    for b in range(batch):
        k = int(rng.integers(3, 30))
        centers, sizes = rng.uniform(0, 640, (k, 2)), rng.uniform(8, 160, (k, 2))
        which = rng.integers(0, k, anchors)
        pred[b, :, :2] = centers[which] + rng.normal(0, 6, (anchors, 2))
        pred[b, :, 2:4] = sizes[which] * rng.lognormal(0, 0.15, (anchors, 2))
        pred[b, :, 4] = rng.beta(0.6, 3.0, anchors)
        pred[b, :, 5:] = rng.beta(0.3, 2.0 if nc > 5 else 1.2, (anchors, nc))
    return pred


def has_ties(pred: np.ndarray, nc: int, conf: float) -> bool:
    s = yolo_scores(pred[0], nc).reshape(-1)
    s = s[s > conf]
    return len(np.unique(s)) < len(s)


TIED = [  # (seed, batch, anchors, nc, extra, best_class, agnostic, conf, iou, topk, candidates)
    (0, 1, 600, 1, 0, False, False, 0.25, 0.45, 100, 1024),
    (1, 4, 600, 3, 0, False, False, 0.25, 0.45, 100, 1024),
    (2, 4, 600, 3, 0, True, False, 0.25, 0.50, 100, 1024),
    (3, 4, 600, 3, 0, False, True, 0.25, 0.50, 50, 1024),
    (4, 4, 500, 80, 0, True, False, 0.05, 0.45, 300, 1024),
    (5, 2, 400, 80, 0, False, False, 0.25, 0.60, 300, 512),
    (6, 4, 800, 3, 51, False, False, 0.10, 0.45, 20, 64),  # cap hit, ties at the cap boundary, extra columns
    (7, 4, 800, 1, 32, True, False, 0.00, 0.30, 16, 16),  # cap == topk, conf 0
    (8, 3, 300, 5, 0, False, False, 0.25, 1.00, 100, 1024),  # iou 1: nothing suppressed (IoU > 1 never)
    (9, 3, 300, 5, 0, False, True, 0.25, 0.00, 100, 1024),  # iou 0: any overlap suppresses
]


@pytest.mark.parametrize("seed,batch,anchors,nc,extra,best_class,agnostic,conf,iou,topk,candidates", TIED)
def test_equals_greedy_reference_with_ties(seed, batch, anchors, nc, extra, best_class, agnostic, conf, iou, topk,
                                           candidates):
    pred = tied_raw(np.random.default_rng(seed), batch, anchors, nc, extra)
    opts = dict(conf=conf, iou=iou, topk=topk, best_class=best_class, agnostic=agnostic, candidates=candidates)
    assert has_ties(pred, nc, conf)
    got = run(portable(nc, extra, **opts), pred)
    assert_equal(got, reference(pred, nc, **opts))
    assert got[0].min() > 0


@pytest.mark.parametrize("best_class", [False, True])
@pytest.mark.parametrize("agnostic", [False, True])
def test_equals_official_nms_without_ties(best_class, agnostic):
    """On continuous inputs the same-class mask and the official +4096 px offset agree exactly."""
    rng = np.random.default_rng(20 + 2 * best_class + agnostic)
    for nc in (1, 3, 80):
        pred = continuous_raw(rng, 2, 2000, nc)
        num, boxes, scores, classes, _ = run(portable(nc, topk=300, best_class=best_class, agnostic=agnostic), pred)
        ref = non_max_suppression(pred, 0.25, 0.45, multi_label=not best_class, agnostic=agnostic, max_det=300)
        for i, r in enumerate(ref):
            n = int(num[i, 0])
            assert n == len(r) > 0
            np.testing.assert_array_equal(boxes[i, :n], r[:, :4])
            np.testing.assert_array_equal(scores[i, :n], r[:, 4])
            np.testing.assert_array_equal(classes[i, :n], r[:, 5].astype(np.int32))


def _chain(n: int, step: float = 10.0) -> np.ndarray:
    """n boxes 40 px wide, each shifted by `step`: neighbours overlap (IoU 0.6), next-but-one less (0.33)."""
    pred = np.zeros((1, n, 6), np.float32)
    pred[0, :, 0] = 100 + step * np.arange(n)
    pred[0, :, 1] = 100
    pred[0, :, 2:4] = 40
    pred[0, :, 4] = np.linspace(0.9, 0.3, n, dtype=np.float32)
    pred[0, :, 5] = 1
    return pred


def test_greedy_not_fast_nms_on_a_long_chain():
    """Greedy keeps every other box of a chain; Fast-NMS (one matrix step) would keep only the first.

    A chain of 400 needs ~400 fixed-point steps: the Loop must run to convergence, not a fixed few steps.
    """
    pred = _chain(400)
    num, _, _, _, idx = run(portable(1, topk=300, candidates=400), pred)
    assert num[0, 0] == 200
    np.testing.assert_array_equal(idx[0, :200], np.arange(0, 400, 2))
    assert_equal(run(portable(1, topk=300, candidates=400), pred), reference(pred, 1, topk=300, candidates=400))


def test_det_indices_gather_the_raw_rows():
    """keep_raw: raw rows gathered by det_indices reproduce the boxes, scores and classes (and extras)."""
    nc, extra = 3, 7
    pred = tied_raw(np.random.default_rng(11), 4, 700, nc, extra)
    for best_class in (False, True):
        sess = portable(nc, extra, keep_raw=True, topk=100, best_class=best_class)
        names = [o.name for o in sess.get_outputs()]
        assert names == OUTPUTS + [RAW_OUTPUT]
        num, boxes, scores, classes, idx, raw = sess.run(names, {"images": pred})
        np.testing.assert_array_equal(raw, pred)
        for b in range(len(pred)):
            n = int(num[b, 0])
            assert n > 0 and (idx[b, n:] == -1).all() and (idx[b, :n] >= 0).all()
            rows = raw[b, idx[b, :n]]
            np.testing.assert_array_equal(boxes[b, :n], xywh2xyxy(rows[:, :4]))
            np.testing.assert_array_equal(scores[b, :n], yolo_scores(rows, nc)[np.arange(n), classes[b, :n]])


def test_mixed_batch_equals_one_by_one():
    pred = tied_raw(np.random.default_rng(12), 5, 600, 3)
    pred[2] = 0  # an image without candidates in the middle
    for opts in (dict(), dict(best_class=True), dict(agnostic=True, topk=10), dict(candidates=32, topk=32)):
        sess = portable(3, **opts)
        together = run(sess, pred)
        assert together[0][2, 0] == 0 and not together[1][2].any() and (together[4][2] == -1).all()
        for i in range(len(pred)):
            for t, a in zip(together, run(sess, pred[i:i + 1])):
                np.testing.assert_array_equal(t[i:i + 1], a)


def test_nothing_above_conf_gives_empty_padded_outputs():
    pred = tied_raw(np.random.default_rng(15), 2, 300, 3)
    for kw in (dict(), dict(best_class=True)):
        num, boxes, scores, classes, idx = run(portable(3, conf=1.0, **kw), pred)
        assert [a.shape for a in (num, boxes, scores, classes, idx)] == [(2, 1), (2, 100, 4), (2, 100), (2, 100),
                                                                          (2, 100)]
        assert not num.any() and not boxes.any() and not scores.any() and not classes.any() and (idx == -1).all()


def test_candidate_cap_keeps_the_best_by_score_then_index():
    """More candidates than the cap: the cap best by (score desc, index asc) enter NMS, exactly."""
    n = 300
    pred = np.zeros((1, n, 6), np.float32)
    pred[0, :, 0] = 30 + 50 * np.arange(n)  # disjoint boxes: NMS keeps every candidate
    pred[0, :, 1], pred[0, :, 2:4], pred[0, :, 5] = 50, 20, 1
    pred[0, :, 4] = np.float32([0.9, 0.8, 0.7])[np.arange(n) % 3]  # 100 boxes per score level
    num, _, scores, _, idx = run(portable(1, topk=150, candidates=150), pred)
    assert num[0, 0] == 150
    want = np.concatenate([np.arange(0, n, 3), np.arange(1, n, 3)[:50]])  # all 0.9s, then the first 50 0.8s
    np.testing.assert_array_equal(idx[0], want)
    np.testing.assert_array_equal(scores[0], np.float32([0.9] * 100 + [0.8] * 50))


def test_thresholds_are_strict():
    """score > conf and IoU > iou (official); an IoU exactly at --iou does not suppress."""
    pred = np.float32([[[2, 0.5, 4, 1, 0.9, 1.0], [1, 0.5, 2, 1, 0.8, 1.0]]])  # IoU exactly 0.5
    assert run(portable(1, iou=0.5), pred)[0][0, 0] == 2
    assert run(portable(1, iou=0.49), pred)[0][0, 0] == 1
    assert run(portable(1, conf=0.8), pred)[0][0, 0] == 1
    for t in (0.45, 0.5, 0.3, 0.7, 0.65):  # float32(t) may round up; the floor makes x > it <=> x > t
        f = iou_floor32(t)
        assert float(f) <= t < float(np.nextafter(f, np.float32(2)))


def test_single_class_scoring_switch():
    pred = np.float32([[[100, 100, 40, 40, 0.9, 0.5], [300, 300, 40, 40, 0.6, 0.2]]])
    np.testing.assert_array_equal(run(portable(1), pred)[2][0, :2], np.float32([0.9, 0.6]))  # detection: obj alone
    got = run(portable(1, obj_only_single_class=False), pred)  # pose / seg: obj * cls
    assert got[0][0, 0] == 1 and got[2][0, 0] == np.float32(0.9) * np.float32(0.5)
    assert_equal(got, reference(pred, 1, obj_only_single_class=False))


def test_multi_label_keeps_one_box_twice_and_agnostic_reduces():
    pred = np.float32([[[50, 50, 20, 20, 0.9, 0.8, 0.7, 0.1]]])
    multi = run(portable(3), pred)
    assert multi[0][0, 0] == 2 and list(multi[3][0, :2]) == [0, 1] and list(multi[4][0, :2]) == [0, 0]
    assert run(portable(3, best_class=True), pred)[0][0, 0] == 1
    assert run(portable(3, agnostic=True), pred)[0][0, 0] == 1


def test_fp16_raw_output_and_opsets():
    pred = tied_raw(np.random.default_rng(13), 2, 400, 3)
    want = reference(pred, 3)
    for opset in (11, 13, 17, 18):
        model = append_nms(raw_graph(3, opset=opset), NmsOptions(mode="portable"), 3)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert_equal(run(sess, pred), want)
    half = pred.astype(np.float16)
    model = append_nms(raw_graph(3, dtype=TensorProto.FLOAT16), NmsOptions(mode="portable"), 3)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_equal(run(sess, half), reference(half.astype(np.float32), 3))


def _topk_ks(model: onnx.ModelProto) -> list:
    """K of every TopK (None when K is not a constant of the graph)."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return [int(consts[n.input[1]].reshape(-1)[0]) if n.input[1] in consts else None
            for n in model.graph.node if n.op_type == "TopK"]


@pytest.mark.parametrize("mode", ["portable", "onnx"])
def test_graph_is_portable_and_topk_bounded(mode):
    """No plugin; every TopK has a constant K <= 3840 (TensorRT's limit; the old onnx tail had K = M+1 from
    the data); fixed output shapes. The portable tail also has no NonMaxSuppression."""
    for kw in (dict(), dict(best_class=True), dict(topk=MAX_TOPK, candidates=MAX_TOPK)):
        model = append_nms(raw_graph(80, anchors=25200), NmsOptions(mode=mode, **kw), 80)
        ks = _topk_ks(model)
        assert ks and all(k is not None and 1 <= k <= MAX_TOPK for k in ks), ks
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        ops = {n.op_type for n in model.graph.node}
        assert ("NonMaxSuppression" in ops) == (mode == "onnx")
        for out in model.graph.output:
            dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
            assert dims[0] == "batch" and all(isinstance(d, int) for d in dims[1:]), (out.name, dims)


def test_onnx_tail_order_ignores_nms_selection_order():
    """Equal scores over disjoint boxes: ordered (anchor, class) like the official NMS, for both tails.

    The old onnx tail kept NonMaxSuppression's (class-major) order among ties and relied on TopK's order.
    """
    pred = np.zeros((1, 6, 8), np.float32)
    pred[0, :, 0] = 30 + 60 * np.arange(6)
    pred[0, :, 1], pred[0, :, 2:4], pred[0, :, 4] = 50, 20, 1.0
    pred[0, :, 5:] = np.float32([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]] * 2)
    want = reference(pred, 3)
    assert want[0][0, 0] == 12 and len(set(want[2][0, :12].tolist())) == 1  # all tied
    for mode in ("onnx", "portable"):
        model = append_nms(raw_graph(3), NmsOptions(mode=mode), 3)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert_equal(run(sess, pred), want)


def test_onnx_tail_equals_portable_without_ties():
    pred = continuous_raw(np.random.default_rng(14), 3, 1500, 5)
    for kw in (dict(), dict(best_class=True), dict(agnostic=True)):
        a = append_nms(raw_graph(5), NmsOptions(mode="onnx", topk=200, **kw), 5)
        sess = ort.InferenceSession(a.SerializeToString(), providers=["CPUExecutionProvider"])
        assert_equal(run(sess, pred), run(portable(5, topk=200, **kw), pred))


def test_deterministic_bytes_and_contract():
    a = append_nms(raw_graph(3), NmsOptions(mode="portable"), 3)
    assert a.SerializeToString() == append_nms(raw_graph(3), NmsOptions(mode="portable"), 3).SerializeToString()
    outs = {o.name: o.type.tensor_type.elem_type for o in a.graph.output}
    assert outs == {"num_dets": TensorProto.INT32, "det_boxes": TensorProto.FLOAT, "det_scores": TensorProto.FLOAT,
                    "det_classes": TensorProto.INT32, "det_indices": TensorProto.INT32}
    onnx.checker.check_model(a)


def test_api_errors():
    raw = raw_graph(3)
    cases = [(NmsOptions(mode="portable", candidates=0), "--nms-candidates"),
             (NmsOptions(mode="portable", candidates=4000), "3840"),
             (NmsOptions(mode="portable", topk=200, candidates=100), "--topk 200 is more than --nms-candidates 100"),
             (NmsOptions(mode="onnx", topk=4000), "3840")]
    for opts, words in cases:
        with pytest.raises(UserError, match=words):
            append_nms(raw, opts, 3)
    with pytest.raises(UserError, match="at most 16777216 candidates"):
        append_nms(raw_graph(80, anchors=300000), NmsOptions(mode="portable"), 80)


@pytest.mark.parametrize("lib,vc,trt,want", [
    ("rtx", False, True, "portable"), ("tensorrt", True, True, "portable"), ("tensorrt", False, True, "efficient"),
    ("auto", False, False, "none")])
def test_auto_mode(lib, vc, trt, want):
    opts = ExportOptions(checkpoint=Path("x.pt"), nms=NmsOptions(mode="auto"),
                         trt=TrtOptions(enabled=trt, version_compatible=vc))
    opts.trt.lib = lib
    assert resolve_nms_mode(opts) == want
    opts.nms.mode = "onnx"
    assert resolve_nms_mode(opts) == "onnx"


CKPT = Path(__file__).parent / "data" / "official" / "dev_yolov7-tiny_w050_nc5.pt"


@pytest.mark.parametrize("args,words", [
    (["--nms", "portable", "--nms-candidates", "5000"], "5000 is not in the range 1<=x<=3840"),
    (["--nms", "portable", "--topk", "300", "--nms-candidates", "100"], "--topk 300 is more than --nms-candidates 100"),
])
def test_cli_errors(tmp_path, args, words):
    result = CliRunner().invoke(export_command, [str(CKPT), "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_cli_portable_export_and_detector(tmp_path):
    """--nms portable end to end: metadata, outputs, and runtimes' Detector reads it like the other tails."""
    from runtimes.base import Detector

    args = [str(CKPT), "--out", str(tmp_path), "--img", "320,416", "--nms", "portable", "--best-class", "--topk", "300",
            "--nms-candidates", "512", "--dynamic-batch"]
    result = CliRunner().invoke(export_command, args)
    assert result.exit_code == 0, result.output
    path = tmp_path / f"{CKPT.stem}.onnx"
    model = onnx.load(path)
    assert [o.name for o in model.graph.output] == OUTPUTS
    info = read_info(model)
    assert info.nms == "portable" and info.nms_params["candidates"] == 512 and info.nms_params["best_class"]
    image = np.load(CKPT.with_suffix(".npz"))["image_u8"]
    batch = np.ascontiguousarray(np.concatenate([image, image[..., ::-1]])).astype(np.float32) / np.float32(255)
    detector = Detector.from_path(path)
    outputs = detector.run(batch)
    dets = detector.postprocess(outputs)
    ref = np.load(CKPT.with_suffix(".npz"))["nms_fused"]
    assert len(dets) == 2 and len(dets[0]) == len(ref) > 0
    np.testing.assert_allclose(np.sort(dets[0].scores)[::-1], np.sort(ref[:, 4])[::-1], atol=1e-4)

    from runtimes.cli import detect_command  # yolo7-detect on the same artifact
    images = Path(__file__).parent / "data" / "shapes" / "images" / "val"
    out = tmp_path / "detect"
    r = CliRunner().invoke(detect_command, [str(path), str(images / "000001.jpg"), str(images / "000003.jpg"),
                                            "-o", str(out), "--batch", "2"])
    assert r.exit_code == 0, r.output
    assert (out / "detections.json").stat().st_size > 50


def test_yolo7_bench_runs_a_portable_artifact(tmp_path):
    """The check harness (yolo7-bench) treats a portable-tail ONNX like the other tails: detections match
    PyTorch + the host NMS under the tail's own settings, and its mAP is scored."""
    from exporter.check.harness import BenchConfig, run_bench
    from exporter.pipeline import run as export

    data = Path(__file__).parent / "data"
    ckpt = data / "yolov7-tiny-shapes.pt"
    onnx_path = export(ExportOptions(checkpoint=ckpt, out_dir=tmp_path / "p", imgsz=(160, 160),
                                     nms=NmsOptions(mode="portable"))).onnx_path
    cfg = BenchConfig(checkpoint=ckpt, artifacts=[onnx_path], out_dir=tmp_path / "report", batches=(1,), runs=2,
                      warmup=1, max_images=12, parity_images=4, threads=1, progress=False,
                      data=data / "shapes" / "annotations" / "instances_val.json")
    report = run_bench(cfg)
    row = report["artifacts"][1]
    assert row.nms == "portable" and not row.skipped
    assert row.parity["detections"]["matched_share"] > 0.95 and row.map["map50_95"] > 0.05
    assert abs(row.delta_ap) < 0.5


def test_greedy_loop_has_a_trip_cap_and_a_data_dependent_stop():
    """The fixed-point Loop: trip count = the cap (enough for any chain), condition = 'keep changed' computed
    in the body (TensorRT-RTX builds it: test_nms_rtx.py); no NonMaxSuppression anywhere."""
    model = append_nms(raw_graph(3), NmsOptions(mode="portable", candidates=256), 3)
    (loop,) = [n for n in model.graph.node if n.op_type == "Loop"]
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert int(consts[loop.input[0]]) == 256 and bool(consts[loop.input[1]])
    body = next(a.g for a in loop.attribute if a.name == "body")
    cond = body.output[0].name
    producer = next(n for n in body.node if cond in n.output)
    assert producer.op_type == "Greater" and {n.op_type for n in body.node} >= {"MatMul", "ReduceSum"}
