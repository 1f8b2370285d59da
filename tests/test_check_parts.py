"""The harness's parts on hand-made inputs: error statistics, detection matching, memory peak, report views."""
from __future__ import annotations

import numpy as np
import pytest

from exporter.evaluation.latency import MemoryPeak, percentiles
from exporter.evaluation.parity import box_iou, compare_raw, match_detections, reference_config
from exporter.check.report import render_markdown, render_plot
from runtimes.base import Detections
from runtimes.contract import ModelInfo


def test_compare_raw_statistics():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 1, (2, 50, 10)).astype(np.float32)
    ref[..., :4] *= 300  # boxes in pixels
    same = compare_raw(ref, ref.copy())
    assert same["max_abs"] == 0 and same["cosine"] == pytest.approx(1.0) and same["nonfinite"] == 0
    out = ref.copy()
    out[0, 3, 7] += 0.5  # one class probability off by 0.5
    stats = compare_raw(ref, out)
    assert stats["max_abs"] == pytest.approx(0.5, abs=1e-6) and stats["score_max_abs"] == pytest.approx(0.5, abs=1e-6)
    assert stats["box_max_abs"] == 0 and stats["mean_abs"] == pytest.approx(0.5 / ref.size, rel=1e-4)
    assert stats["score_cosine"] < 1.0 and stats["cosine"] > stats["score_cosine"]  # boxes dominate the whole
    out[1, 0, 0] = np.nan
    assert compare_raw(ref, out)["nonfinite"] == 1
    with pytest.raises(ValueError, match="shapes differ"):
        compare_raw(ref, ref[:1])


def _det(boxes, scores, classes) -> Detections:
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(classes, np.int32))


def test_match_detections_iou_class_and_one_to_one():
    ref = _det([[0, 0, 100, 100], [200, 200, 300, 300], [0, 0, 100, 100]], [0.9, 0.8, 0.7], [0, 1, 2])
    shifted = 100 * (1 - 0.9) / (1 + 0.9) * 0.9  # a shift just below IoU 0.9 along x
    got = _det([[2, 0, 102, 100], [200 + 3 * shifted, 200, 300 + 3 * shifted, 300], [0, 0, 100, 100]],
               [0.85, 0.8, 0.7], [0, 1, 1])
    assert box_iou(ref.boxes[1:2], got.boxes[1:2])[0, 0] < 0.9
    m = match_detections([ref], [got])
    assert m["matched"] == 1 and m["n_reference"] == 3 and m["matched_share"] == pytest.approx(1 / 3)
    assert m["score_max_abs"] == pytest.approx(0.05, abs=1e-6)
    twice = match_detections([_det([[0, 0, 10, 10]] * 2, [0.9, 0.8], [0, 0])], [_det([[0, 0, 10, 10]], [0.9], [0])])
    assert twice["matched"] == 1  # one artifact box cannot match two reference boxes
    assert match_detections([Detections.empty()], [Detections.empty()])["matched_share"] == 1.0


def test_reference_config_follows_the_tail():
    info = ModelInfo(names=["a"], stride=[8], imgsz=(64, 64), nms="onnx",
                     nms_params={"conf": 0.3, "iou": 0.5, "topk": 50, "best_class": True, "agnostic": False})
    cfg = reference_config(info)
    assert (cfg.conf, cfg.iou, cfg.max_det, cfg.multi_label) == (0.3, 0.5, 50, False)
    info.nms = "none"
    assert reference_config(info).conf == 0.25


def test_percentiles_and_memory_peak():
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01) and p["min"] == pytest.approx(1.0)
    with MemoryPeak(cuda=False) as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
        del block
    if mem.peak_mb is None:
        pytest.skip("no /proc/self/clear_refs here (not Linux?)")
    assert 50 < mem.peak_mb < 200 and mem.kind == "cpu peak RSS delta"


def _report() -> dict:
    lat = {"batch": 1, "runs": 3, "warmup": 1, "model_ms": {"p50": 10.0, "p90": 11.0, "p99": 12.0, "mean": 10.5,
                                                            "min": 9.0},
           "e2e_ms": {"p50": 15.0, "p90": 16.0, "p99": 17.0, "mean": 15.5, "min": 14.0}, "fps": 100.0,
           "fps_e2e": 66.7, "peak_mem_mb": 1.0}
    row = {"name": "m.onnx", "runtime": "ONNX Runtime CPU", "precision": "int8", "nms": "none", "size_mb": 1.5,
           "reference": False, "skipped": None, "map": {"map50_95": 0.4, "map50": 0.6, "protocol_note": ""},
           "delta_ap": -1.25, "latency": [lat], "parity": None}
    skipped = dict(row, name="m.engine", runtime="TensorRT", skipped="no GPU", map=None, latency=[])
    return {"settings": {"checkpoint": "m.pt", "imgsz": [64, 64], "warmup": 1, "runs": 3,
                         "protocol": {"conf": 0.001, "iou": 0.65, "max_det": 300}},
            "device": {"summary": "test box", "short": "test"}, "artifacts": [row, skipped],
            "gates": [{"gate": "max-map-drop", "artifact": "m.onnx", "value": 1.25, "limit": 1.0, "passed": False}],
            "passed": False, "failures": ["max-map-drop 1 AP: m.onnx is 1.25 AP below PyTorch"], "versions": {}}


def test_report_views():
    md = render_markdown(_report())
    assert "| m.onnx | ONNX Runtime CPU | int8 | 1.50 | 0.400 | -1.25 | 0.600 | 10.00 (b1) | 100.0 |" in md
    assert "| m.engine | TensorRT | int8 | 1.50 | skipped: no GPU |" in md
    assert "**FAILED: max-map-drop 1 AP: m.onnx is 1.25 AP below PyTorch**" in md
    png = render_plot(_report())
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_engine_latency_times_only_the_enqueue_on_the_device_clock():
    """One definition of TensorRT latency: CUDA events around enqueue, warm-up untimed (stand-in events)."""
    from exporter.evaluation.latency import engine_latency

    clock = {"t": 0.0}
    calls = []

    class Event:
        def record(self, stream):
            assert stream == "s"
            self.t = clock["t"]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t  # ms, like torch.cuda.Event

    class Backend:
        stream = "s"

        def enqueue(self, batch):
            calls.append(batch)
            clock["t"] += 2.0 * len(calls)  # 2, 4, 6, ... ms of device time

    res = engine_latency(Backend(), 4, runs=3, warmup=2, event=Event, synchronize=lambda: None)
    assert calls == [4] * 5
    assert res["p50"] == pytest.approx(8.0) and res["min"] == pytest.approx(6.0)  # runs 3..5: 6, 8, 10 ms
