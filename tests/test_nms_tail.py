"""Both NMS tails on synthetic raw graphs (``output`` = Identity(``images``) with images [B,N,5+nc]).

Feeding raw predictions directly lets us fuzz the tails with chosen inputs. The efficient tail cannot run
without TensorRT, so it is checked by running the graph up to the EfficientNMS_TRT node in ONNX Runtime
and applying the numpy reference of the plugin (runtimes/nms_reference.py).

Where the two tails may legitimately differ, the inputs avoid it on purpose (and test_preselection shows it):
* exact score ties: the plugin's order among equal scores depends on GPU atomics;
* a score exactly at --conf or an IoU exactly at --iou: the plugin keeps score >= conf and suppresses
  IoU >= iou, ONNX NonMaxSuppression keeps score > conf and suppresses IoU > iou;
* more than 5000 candidates: the plugin runs NMS on the best 5000 only (EfficientNMS_TRT pre-selection).
Continuous random scores and boxes make the first two events probability-zero; the fuzz asserts no ties.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from exporter.cli import export_command
from exporter.errors import UserError
from exporter.nms_tail import BOXES, SCORES, TRT_DOMAIN, append_nms
from exporter.onnx_export import finalize, read_info
from exporter.options import NmsOptions
from runtimes.contract import NMS_INDICES, NMS_OUTPUTS, ModelInfo
from runtimes.nms_reference import efficient_nms_reference, non_max_suppression


def raw_graph(nc: int, opset: int = 17, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A stand-in for an exported model: the raw predictions are the input."""
    shape = ["batch", "anchors", 5 + nc]
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "raw",
                              [helper.make_tensor_value_info("images", dtype, shape)],
                              [helper.make_tensor_value_info("output", dtype, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    info = ModelInfo(names=[f"c{i}" for i in range(nc)], stride=[8.0, 16.0, 32.0], imgsz=(640, 640), batch=None)
    return finalize(model, info)


class session:  # noqa: N801 - reads like the ORT constructor it wraps
    """ORT session whose run(None, ...) gives the four contract outputs (det_indices is tested on its own)."""

    def __init__(self, model: onnx.ModelProto):
        self.sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs() if o.name != NMS_INDICES]

    def run(self, names, feed):
        return self.sess.run(names or self.names, feed)


def nc_of(model: onnx.ModelProto) -> int:
    return read_info(model).nc


def plugin_inputs_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The efficient-tail graph cut before EfficientNMS_TRT: its two inputs become the outputs."""
    graph = gs.import_onnx(model)
    node = next(n for n in graph.nodes if n.op == "EfficientNMS_TRT")
    assert [t.name for t in node.inputs] == [BOXES, SCORES]
    graph.outputs = list(node.inputs)
    graph.cleanup()
    return gs.export_onnx(graph)


def random_raw(rng: np.random.Generator, batch: int, anchors: int, nc: int, size: float = 640.0) -> np.ndarray:
    """Clustered boxes (so NMS has work), few confident anchors, continuous values (no ties)."""
    pred = np.zeros((batch, anchors, 5 + nc), np.float32)
    for b in range(batch):
        k = int(rng.integers(3, 30))
        centers, sizes = rng.uniform(0, size, (k, 2)), rng.uniform(8, 160, (k, 2))
        which = rng.integers(0, k, anchors)
        pred[b, :, :2] = centers[which] + rng.normal(0, 6, (anchors, 2))
        pred[b, :, 2:4] = sizes[which] * rng.lognormal(0, 0.15, (anchors, 2))
        pred[b, :, 4] = rng.beta(0.6, 3.0, anchors)
        pred[b, :, 5:] = rng.beta(0.3, 2.0 if nc > 5 else 1.2, (anchors, nc))
    return pred


def canonical(num, boxes, scores, classes) -> list[tuple[np.ndarray, ...]]:
    """Per image, the valid rows in (score desc, class) order; padding must be exactly zero."""
    out = []
    for i in range(len(num)):
        n = int(num[i, 0])
        assert not boxes[i, n:].any() and not scores[i, n:].any() and not classes[i, n:].any(), "padding not zero"
        assert np.all(np.diff(scores[i, :n]) <= 0), "not sorted by score"
        order = np.lexsort((classes[i, :n], -scores[i, :n]))
        out.append((boxes[i, :n][order], scores[i, :n][order], classes[i, :n][order]))
    return out


def assert_same(a, b) -> None:
    ca, cb = canonical(*a), canonical(*b)
    for i, (x, y) in enumerate(zip(ca, cb)):
        assert len(x[1]) == len(y[1]), f"image {i}: {len(x[1])} vs {len(y[1])} detections"
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


def assert_no_ties(scores: np.ndarray, conf: float) -> None:
    for s in scores:
        cand = s[s >= conf]
        assert len(np.unique(cand)) == len(cand), "tied scores in the fuzz input; pick another seed"


FUZZ = [  # (seed, batch, nc, agnostic, conf, iou, topk)
    (0, 1, 1, False, 0.25, 0.45, 100), (1, 4, 1, False, 0.25, 0.45, 100),
    (2, 1, 3, False, 0.25, 0.45, 100), (3, 4, 3, False, 0.10, 0.60, 50),
    (4, 1, 80, False, 0.25, 0.45, 100), (5, 4, 80, False, 0.30, 0.30, 300),
    (6, 1, 3, True, 0.25, 0.45, 100), (7, 4, 3, True, 0.05, 0.70, 20),
    (8, 1, 80, True, 0.25, 0.45, 100), (9, 4, 80, True, 0.40, 0.50, 100),
    (10, 4, 5, False, 0.25, 0.45, 7), (11, 4, 1, True, 0.25, 0.45, 100),
]


@pytest.mark.parametrize("seed,batch,nc,agnostic,conf,iou,topk", FUZZ)
def test_efficient_tail_matches_onnx_tail_fuzz(seed, batch, nc, agnostic, conf, iou, topk):
    raw = raw_graph(nc)
    opts = dict(conf=conf, iou=iou, topk=topk, agnostic=agnostic)
    onnx_tail = session(append_nms(raw, NmsOptions(mode="onnx", **opts), nc_of(raw)))
    prefix = session(plugin_inputs_model(append_nms(raw, NmsOptions(mode="efficient", **opts), nc_of(raw))))
    pred = random_raw(np.random.default_rng(seed), batch, 1500, nc)
    boxes, scores = prefix.run(None, {"images": pred})
    assert_no_ties(scores, conf)
    assert (scores >= conf).sum((1, 2)).max() <= 5000  # below the plugin's pre-selection size
    got = onnx_tail.run(None, {"images": pred})
    ref = efficient_nms_reference(boxes, scores, conf, iou, topk, class_agnostic=agnostic)
    assert_same(got, ref)
    assert 0 < got[0].min()  # the case is not trivially empty


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("agnostic", [False, True])
def test_onnx_tail_matches_official_nms_fuzz(multi_label, agnostic):
    """The onnx tail (exact per-class NMS) equals the official class-offset NMS on random inputs."""
    rng = np.random.default_rng(100 + 2 * multi_label + agnostic)
    for nc in (1, 3, 80):
        pred = random_raw(rng, 2, 2000, nc)
        model = append_nms(raw_graph(nc), NmsOptions(mode="onnx", topk=300, agnostic=agnostic,
                                                     best_class=not multi_label), nc_of(raw_graph(nc)))
        num, boxes, scores, classes = session(model).run(None, {"images": pred})
        ref = non_max_suppression(pred, 0.25, 0.45, multi_label=multi_label, agnostic=agnostic, max_det=300)
        for i, r in enumerate(ref):
            n = int(num[i, 0])
            assert n == len(r) > 0
            np.testing.assert_array_equal(boxes[i, :n], r[:, :4])
            np.testing.assert_array_equal(scores[i, :n], r[:, 4])
            np.testing.assert_array_equal(classes[i, :n], r[:, 5].astype(np.int32))


def test_preselection_is_a_legitimate_difference():
    """> 5000 candidates: EfficientNMS_TRT only looks at the best 5000, the onnx tail at all of them."""
    n = 6001
    pred = np.zeros((1, n, 6), np.float32)
    pred[0, :, :4] = [100, 100, 50, 50]  # one heavily duplicated box ...
    pred[0, :, 4] = np.linspace(0.9, 0.5, n, dtype=np.float32)
    pred[0, -1, :4] = [400, 400, 50, 50]  # ... and a separate one with the lowest score
    pred[0, :, 5] = 1.0
    raw = raw_graph(1)
    got = session(append_nms(raw, NmsOptions(mode="onnx"), nc_of(raw))).run(None, {"images": pred})
    boxes, scores = session(plugin_inputs_model(append_nms(raw, NmsOptions(mode="efficient"), nc_of(raw)))).run(
        None, {"images": pred})
    assert got[0][0, 0] == 2
    assert efficient_nms_reference(boxes, scores, 0.25, 0.45, 100)[0][0, 0] == 1
    assert_same(got, efficient_nms_reference(boxes, scores, 0.25, 0.45, 100, max_candidates=10 ** 9))


def test_batch_independence_dynamic_batch():
    raw = raw_graph(3)
    preds = random_raw(np.random.default_rng(7), 5, 1000, 3)
    preds[3] = 0  # an image without detections in the middle of the batch
    for opts in (NmsOptions(mode="onnx"), NmsOptions(mode="onnx", best_class=True),
                 NmsOptions(mode="onnx", agnostic=True, topk=10)):
        sess = session(append_nms(raw, opts, nc_of(raw)))
        together = sess.run(None, {"images": preds})
        assert together[0][3, 0] == 0
        for i in range(len(preds)):
            alone = sess.run(None, {"images": preds[i:i + 1]})
            for t, a in zip(together, alone):
                np.testing.assert_array_equal(t[i:i + 1], a)


def test_single_class_scores_are_objectness():
    """nc == 1: the class output is untrained; score = obj (like the official NMS), not obj * cls."""
    pred = np.zeros((1, 2, 6), np.float32)
    pred[0, 0] = [100, 100, 40, 40, 0.9, 0.5]
    pred[0, 1] = [300, 300, 40, 40, 0.7, 0.2]
    raw = raw_graph(1)
    num, _, scores, classes = session(append_nms(raw, NmsOptions(mode="onnx"), nc_of(raw))).run(None, {"images": pred})
    assert num[0, 0] == 2
    np.testing.assert_array_equal(scores[0, :2], np.float32([0.9, 0.7]))
    assert not classes.any()
    _, plugin_scores = session(plugin_inputs_model(append_nms(raw, NmsOptions(mode="efficient"), nc_of(raw)))).run(
        None, {"images": pred})
    np.testing.assert_array_equal(plugin_scores[0, :, 0], np.float32([0.9, 0.7]))


def _two_boxes_two_classes() -> np.ndarray:
    """Two strongly overlapping boxes (IoU 0.79); box 0 is class 0, box 1 is class 1 (0.45 for class 0)."""
    pred = np.zeros((1, 2, 7), np.float32)
    pred[0, 0] = [100, 100, 50, 50, 1.0, 0.9, 0.1]
    pred[0, 1] = [104, 102, 50, 50, 1.0, 0.45, 0.8]
    return pred


def test_agnostic_and_multi_label():
    pred, raw = _two_boxes_two_classes(), raw_graph(2)

    def run(**kw):
        model = append_nms(raw, NmsOptions(mode="onnx", **kw), nc_of(raw))
        num, _, scores, classes = session(model).run(None, {"images": pred})
        return [(float(s), int(c)) for s, c in zip(scores[0, :num[0, 0]], classes[0, :num[0, 0]])]

    # per class: box 1 as class 0 (0.45) is suppressed by box 0 (same class, IoU 0.79); box 1 as class 1 stays
    expected = [(pytest.approx(0.9), 0), (pytest.approx(0.8), 1)]
    assert run() == expected and run(best_class=True) == expected
    assert run(agnostic=True) == [(pytest.approx(0.9), 0)]  # different classes suppress each other
    ref = efficient_nms_reference(pred[..., :4], pred[..., 5:], 0.25, 0.45, 100, box_coding=1, class_agnostic=True)
    assert ref[0][0, 0] == 1


def test_multi_label_keeps_one_box_twice():
    pred = np.zeros((1, 1, 8), np.float32)
    pred[0, 0] = [50, 50, 20, 20, 0.9, 0.8, 0.7, 0.1]
    raw = raw_graph(3)
    multi = session(append_nms(raw, NmsOptions(mode="onnx"), nc_of(raw))).run(None, {"images": pred})
    best = session(append_nms(raw, NmsOptions(mode="onnx", best_class=True), nc_of(raw))).run(None, {"images": pred})
    assert multi[0][0, 0] == 2 and list(multi[3][0, :2]) == [0, 1]
    assert best[0][0, 0] == 1 and best[3][0, 0] == 0
    np.testing.assert_array_equal(multi[1][0, 0], np.float32([40, 40, 60, 60]))


def test_topk_truncates_and_empty_output_is_zero():
    pred = random_raw(np.random.default_rng(3), 2, 1000, 3)
    raw = raw_graph(3)
    full = session(append_nms(raw, NmsOptions(mode="onnx", topk=300), nc_of(raw))).run(None, {"images": pred})
    top5 = session(append_nms(raw, NmsOptions(mode="onnx", topk=5), nc_of(raw))).run(None, {"images": pred})
    assert (full[0] > 5).all() and (top5[0] == 5).all()
    for f, t in zip(full[1:], top5[1:]):
        np.testing.assert_array_equal(f[:, :5], t)
    none = session(append_nms(raw, NmsOptions(mode="onnx", conf=1.0), nc_of(raw))).run(None, {"images": pred})
    assert [a.shape for a in none] == [(2, 1), (2, 100, 4), (2, 100), (2, 100)]
    assert not any(a.any() for a in none)


def test_fp16_raw_output_is_cast_to_fp32():
    pred = random_raw(np.random.default_rng(4), 1, 500, 3)
    rounded = pred.astype(np.float16).astype(np.float32)
    want = session(append_nms(raw_graph(3), NmsOptions(mode="onnx"), 3)).run(None, {"images": rounded})
    got = session(append_nms(raw_graph(3, dtype=TensorProto.FLOAT16), NmsOptions(mode="onnx"), 3)).run(
        None, {"images": pred.astype(np.float16)})
    assert got[1].dtype == np.float32 and got[0][0, 0] > 0
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("opset", [11, 12, 13, 17])
def test_opsets(opset):
    pred = random_raw(np.random.default_rng(5), 2, 800, 3)
    want = session(append_nms(raw_graph(3), NmsOptions(mode="onnx"), nc_of(raw_graph(3)))).run(None, {"images": pred})
    got = session(append_nms(raw_graph(3, opset=opset), NmsOptions(mode="onnx"), 3)).run(None, {"images": pred})
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_outputs_contract_and_deterministic_bytes():
    raw = raw_graph(3)
    before = raw.SerializeToString()
    for mode in ("onnx", "efficient"):
        a, b = append_nms(raw, NmsOptions(mode=mode), nc_of(raw)), append_nms(raw, NmsOptions(mode=mode), nc_of(raw))
        assert a.SerializeToString() == b.SerializeToString()
        outs = {o.name: o.type.tensor_type for o in a.graph.output}
        extra = [NMS_INDICES] if mode != "efficient" else []
        assert list(outs) == list(NMS_OUTPUTS) + extra
        dims = {k: [d.dim_param or d.dim_value for d in v.shape.dim] for k, v in outs.items()}
        assert dims == {"num_dets": ["batch", 1], "det_boxes": ["batch", 100, 4], "det_scores": ["batch", 100],
                        "det_classes": ["batch", 100], **{k: ["batch", 100] for k in extra}}
        assert [v.elem_type for v in outs.values()] == [TensorProto.INT32, TensorProto.FLOAT, TensorProto.FLOAT,
                                                         TensorProto.INT32] + [TensorProto.INT32] * len(extra)
        onnx.checker.check_model(a)
        assert raw.metadata_props and not a.metadata_props  # the pipeline's finalize writes it once, from ModelInfo
    assert raw.SerializeToString() == before  # the input model is not modified


def test_efficient_node():
    model = append_nms(raw_graph(3), NmsOptions(mode="efficient", conf=0.3, iou=0.6, topk=42, agnostic=True), 3)
    (node,) = [n for n in model.graph.node if n.op_type == "EfficientNMS_TRT"]
    assert node.domain == TRT_DOMAIN and (TRT_DOMAIN, 1) in [(o.domain, o.version) for o in model.opset_import]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"background_class": -1, "box_coding": 0, "iou_threshold": pytest.approx(0.6),
                     "max_output_boxes": 42, "plugin_version": b"1", "score_activation": 0, "class_agnostic": 1,
                     "score_threshold": pytest.approx(0.3)}
    assert list(node.output) == list(NMS_OUTPUTS)
    assert not any(n.op_type == "NonMaxSuppression" for n in model.graph.node)


def test_api_errors():
    raw = raw_graph(3)
    cases = [(NmsOptions(mode="onnx", conf=1.5), "--conf"), (NmsOptions(mode="onnx", iou=-0.1), "--iou"),
             (NmsOptions(mode="onnx", topk=0), "--topk"),
             (NmsOptions(mode="none"), "'efficient', 'onnx' or 'portable'"),
             (NmsOptions(mode="efficient", best_class=True), "--best-class")]
    for opts, words in cases:
        with pytest.raises(UserError, match=re.escape(words)):
            append_nms(raw, opts, nc_of(raw))
    end_to_end = append_nms(raw, NmsOptions(mode="onnx"), nc_of(raw))
    with pytest.raises(UserError, match="no 'output' output"):
        append_nms(end_to_end, NmsOptions(mode="onnx"), nc_of(raw))  # the class count is a value, not re-read
    narrow = raw_graph(3)
    for value_info in (narrow.graph.input[0], narrow.graph.output[0]):  # 7 values per box < 5 + 3
        value_info.type.tensor_type.shape.dim[2].dim_value = 7
    with pytest.raises(UserError, match="fewer than 5 \\+ 3 classes"):
        append_nms(narrow, NmsOptions(mode="onnx"), 3)
    with pytest.raises(UserError, match="integer >= 1"):
        append_nms(raw, NmsOptions(mode="onnx"), 0)


@pytest.mark.parametrize("args,words", [
    (["--conf", "1.5"], "'--conf': must be within [0, 1], got 1.5"),
    (["--iou=-0.1"], "'--iou': must be within [0, 1], got -0.1"),
    (["--topk", "0"], "'--topk': must be >= 1, got 0"),
    (["--nms", "efficient", "--best-class"], "--best-class needs --nms onnx"),
])
def test_cli_errors(tmp_path, args, words):
    ckpt = Path(__file__).parent / "data" / "official" / "dev_yolov7-tiny_w050_nc5.pt"
    result = CliRunner().invoke(export_command, [str(ckpt), "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.lower().startswith("error")]
    assert len(lines) == 1 and words in lines[0], result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())
