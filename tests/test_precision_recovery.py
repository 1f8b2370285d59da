"""--int8-max-drop: sensitivity ranking and moving layers back to float until the mAP budget holds."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter.options import CalibOptions
from exporter.precision.graph import head_convs
from exporter.precision.int8 import quantize_int8
from exporter.precision.recovery import detection_error, single_layer_variant

IMGSZ = (320, 320)


@pytest.fixture(scope="module")
def fp32(trained_fp32_onnx):
    return trained_fp32_onnx


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, shapes_dir) -> Path:
    """40 labelled shapes images (YOLO layout) in a folder of their own: the eval set (--data)."""
    root = tmp_path_factory.mktemp("shapes40")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for img in sorted((shapes_dir / "images" / "val").glob("*.jpg"))[:40]:
        shutil.copy(img, root / "images" / img.name)
        shutil.copy(shapes_dir / "labels" / "val" / f"{img.stem}.txt", root / "labels" / f"{img.stem}.txt")
    return root / "images"


@pytest.fixture(scope="module")
def calib_set(tmp_path_factory, shapes_dir) -> Path:
    """20 other shapes images (no labels): the calibration source, disjoint from ``small_set``."""
    root = tmp_path_factory.mktemp("calib20")
    for img in sorted((shapes_dir / "images" / "val").glob("*.jpg"))[100:120]:
        shutil.copy(img, root / img.name)
    return root


def _dq_fed_convs(proto: onnx.ModelProto) -> set[str]:
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    return {n.name for n in proto.graph.node if n.op_type == "Conv"
            and any(producer.get(i) == "DequantizeLinear" for i in n.input[:2])}


def _run(proto, x):
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


def test_single_layer_variant_quantizes_only_that_conv(fp32, calib_set):
    from exporter.precision.calib_data import resolve_images
    from exporter.precision.calibrate import calibrate
    from exporter.precision.int8 import QdqBuilder

    proto, info = fp32
    builder = QdqBuilder(proto, info)
    builder.calibration = calibrate(proto, resolve_images(calib_set, 4), "max", info.imgsz, 1, builder.tensors)
    q = builder.build([], fp16=False)  # sensitivity runs on the FP32-remainder graph
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    assert _dq_fed_convs(q) == set(convs)  # a builder without a float policy quantizes every conv
    target = convs[len(convs) // 2]
    variant = single_layer_variant(proto, q, target)
    onnx.checker.check_model(variant)
    assert _dq_fed_convs(variant) == {target}
    assert sum(n.op_type == "QuantizeLinear" for n in variant.graph.node) == 1
    x = np.random.default_rng(0).random((1, 3, *IMGSZ), dtype=np.float32)
    f, v, full = _run(proto, x), _run(variant, x), _run(q, x)
    assert not np.array_equal(f, v)
    assert np.abs(v - f).mean() < np.abs(full - f).mean()  # one quantized layer: less error than all of them


def test_detection_error_weights_what_map_sees():
    rng = np.random.default_rng(1)
    ref = np.zeros((1, 6, 7), np.float32)
    ref[..., :2] = rng.uniform(50, 250, (1, 6, 2))
    ref[..., 2:4] = rng.uniform(10, 80, (1, 6, 2))
    ref[0, 0, 4:] = [0.9, 0.95, 0.01]  # one confident box, the rest background (objectness 0)
    assert detection_error(ref, ref.copy()) == 0.0
    background_moved = ref.copy()
    background_moved[0, 1:, :4] += 20.0  # boxes of anchors nobody will keep
    assert detection_error(ref, background_moved) == 0.0
    box_moved = ref.copy()
    box_moved[0, 0, 0] += 2.0
    score_moved = ref.copy()
    score_moved[0, 0, 4] = 0.8
    assert detection_error(ref, box_moved) > 0 and detection_error(ref, score_moved) > 0
    bigger = ref.copy()
    bigger[0, 0, 0] += 4.0
    assert detection_error(ref, bigger) > detection_error(ref, box_moved)


def test_max_drop_moves_sensitive_layers_back_until_budget_holds(fp32, small_set, calib_set):
    """2 calibration images (coarse ranges, a clear drop) scored on 40 other labelled images, budget 0.1 AP."""
    from exporter.evaluation.dataset import load_dataset
    from exporter.evaluation.evaluate import evaluate_map
    from runtimes.base import Detector
    from runtimes.onnx_backend import OnnxBackend

    proto, info = fp32
    budget = 0.1
    q, report = quantize_int8(proto, info, CalibOptions(source=calib_set, num_images=2, method="percentile",
                                                        max_drop=budget, eval_data=small_set))
    rec = report["recovery"]
    assert rec["eval_images"] == 40 and rec["fp32_map50_95"] > 30 and rec["eval_disjoint_from_calibration"]
    steps = rec["steps"]
    assert steps[0]["excluded"] == 0 and steps[0]["drop"] > budget, "precondition: the plain INT8 misses the budget"
    assert rec["final_drop_ap"] <= budget
    excluded = rec["excluded_layers"]
    assert excluded and report["excluded_layers"] == excluded
    ranked = [s["layer"] for s in rec["sensitivity"]]
    assert ranked[:len(excluded)] == excluded  # the most sensitive first
    assert all(s["drop"] > budget for s in steps if s["excluded"] < len(excluded))  # the smallest k that holds
    convs = {n.name for n in proto.graph.node if n.op_type == "Conv"} - set(head_convs(proto))  # head: FP16
    assert _dq_fed_convs(q) == convs - set(excluded)
    assert report["quantized_convs"] == len(convs) - len(excluded)
    # the reported number is the artifact's: re-measure it independently
    data = load_dataset(small_set)
    maps = []
    for model in (proto, q):
        path = small_set.parent / "model.onnx"
        onnx.save_model(model, str(path))
        maps.append(evaluate_map(Detector(OnnxBackend(path)), data, progress=False).map50_95)
    assert abs((maps[0] - maps[1]) * 100 - rec["final_drop_ap"]) <= 5e-4  # reported rounded to 3 decimals


def test_budget_already_met_changes_nothing(fp32, small_set, calib_set):
    proto, info = fp32
    plain, _ = quantize_int8(proto, info, CalibOptions(source=calib_set, num_images=4, method="max"))
    q, report = quantize_int8(proto, info, CalibOptions(source=calib_set, num_images=4, method="max", max_drop=50.0,
                                                        eval_data=small_set))
    rec = report["recovery"]
    assert rec["excluded_layers"] == [] and len(rec["steps"]) == 1 and rec["sensitivity"] == []
    assert rec["final_drop_ap"] == rec["steps"][0]["drop"] <= 50.0
    assert q.SerializeToString() == plain.SerializeToString()


def test_eval_set_sharing_calibration_images_is_refused(fp32, small_set):
    """--int8-max-drop never scores on images the ranges were fitted to (same bytes under any name)."""
    from exporter.errors import UserError

    proto, info = fp32
    renamed = small_set.parent / "renamed"
    renamed.mkdir(exist_ok=True)
    shutil.copy(sorted(small_set.glob("*.jpg"))[7], renamed / "other_name.jpg")
    for source in (small_set, renamed):
        with pytest.raises(UserError, match="also calibration images"):
            quantize_int8(proto, info, CalibOptions(source=source, num_images=2, method="max", max_drop=0.5,
                                                    eval_data=small_set))
