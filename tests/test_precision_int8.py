"""--int8: symmetric Q/DQ placement, calibration data path, calibration cache, errors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter.errors import UserError
from exporter.options import CalibOptions
from exporter.precision import calibrate as calibrate_mod
from exporter.precision.calib_data import ImageFeed, resolve_images
from exporter.precision.graph import conv_nodes, decode_nodes, head_convs
from exporter.precision.int8 import quantize_int8
from runtimes.preprocess import list_images, preprocess, read_image

IMGSZ = (320, 320)
IMAGES = Path(__file__).parent / "data" / "images"


@pytest.fixture(scope="module")
def fp32(trained_fp32_onnx):
    return trained_fp32_onnx


@pytest.fixture(scope="module")
def val_dir(shapes_dir) -> Path:
    return shapes_dir / "images" / "val"


@pytest.fixture(scope="module")
def int8(fp32, val_dir):
    proto, info = fp32
    return quantize_int8(proto, info, CalibOptions(source=val_dir, num_images=8, method="max"))


# --------------------------------------------------------------------------------------- Q/DQ structure
def test_qdq_symmetric_per_channel_decode_float(fp32, int8):
    """Zero-point 0 INT8 everywhere, every conv's input and per-channel INT8 weights, float bias, decode
    untouched; the Concat/MaxPool/Add layout is tests/test_precision_placement.py's job."""
    proto, _ = fp32
    q, report = int8
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:  # zero-point 0 (symmetric), int8, as TensorRT requires
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    head = set(head_convs(proto))  # kept in FP16 by default (NVIDIA's YOLOv7 recipe; measured in int8.py)
    assert len(head) == 3 and report["float_convs"] == sorted(head, key=conv_nodes(proto).index)
    assert len(convs) == len(conv_nodes(proto)) == report["convs"] == report["quantized_convs"] + len(head)
    for conv in convs:
        if conv.name in head:
            assert all(i in inits or producer[i].op_type != "DequantizeLinear" for i in conv.input), conv.name
            continue
        act, weight = producer[conv.input[0]], producer[conv.input[1]]
        assert act.op_type == "DequantizeLinear" and producer[act.input[0]].op_type == "QuantizeLinear"
        assert weight.op_type == "DequantizeLinear" and weight.input[0] in inits  # INT8 weights stored, DQ only
        w = inits[weight.input[0]]
        assert w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 127  # restricted symmetric range
        assert inits[weight.input[1]].shape == (w.shape[0],)  # per output channel
        assert not (len(conv.input) > 2 and producer.get(conv.input[2]) is not None
                    and producer[conv.input[2]].op_type == "DequantizeLinear")  # bias stays float
    readers: dict[str, list] = {}
    for n in q.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for n in qdq:  # no Q right on a conv's output: TensorRT fuses the activation and quantizes at the consumer
        if n.op_type == "QuantizeLinear" and n.input[0] in producer:
            assert producer[n.input[0]].op_type != "Conv", n.name
    decode = set(decode_nodes(proto))
    for n in q.graph.node:
        if n.name in decode:
            assert all(producer.get(i) is None or producer[i].op_type not in ("QuantizeLinear", "DequantizeLinear")
                       for i in n.input), n.name
            assert not any(r.op_type == "QuantizeLinear" for o in n.output for r in readers.get(o, [])), n.name
    assert decode and decode <= set(decode_nodes(q))
    assert {n.op_type for n in q.graph.node if n.name in decode} == {n.op_type for n in proto.graph.node
                                                                     if n.name in decode}
    assert report["head_convs"] == head_convs(proto) and len(report["head_convs"]) == 3
    assert [p.key for p in q.metadata_props] == [p.key for p in proto.metadata_props]
    onnx.checker.check_model(q)


def test_same_inputs_same_bytes(fp32, int8, val_dir):
    proto, info = fp32
    again, _ = quantize_int8(proto, info, CalibOptions(source=val_dir, num_images=8, method="max"))
    assert again.SerializeToString() == int8[0].SerializeToString()


def test_int8_runs_and_stays_close_to_fp32(fp32, int8, val_dir):
    import onnxruntime as ort

    proto, _ = fp32
    q, _ = int8
    x = preprocess([read_image(p) for p in list_images(val_dir)[100:101]], IMGSZ)[0]
    f = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    h = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    conf = f[..., 4] * f[..., 5:].max(-1)
    assert conf.max() > 0.5
    top = np.argsort(-conf.ravel())[:5]
    assert np.abs(h[0, top, :4] - f[0, top, :4]).max() < 3.0  # px
    assert np.abs(h[0, top, 4] - f[0, top, 4]).max() < 0.1
    assert not np.array_equal(f, h)


# ------------------------------------------------------------------------------- calibration data path
def test_calibration_feeds_exactly_the_inference_preprocessing(fp32, monkeypatch, tmp_path):
    """What the calibrator receives == runtimes.preprocess.preprocess (letterbox, not stretched)."""
    proto, info = fp32
    fed: list[np.ndarray] = []

    class Spy(ImageFeed):
        def get_next(self):
            item = super().get_next()
            if item is not None:
                fed.append(item["images"].copy())
            return item

    monkeypatch.setattr(calibrate_mod, "ImageFeed", Spy)
    paths = list_images(IMAGES)  # bus.jpg 810x1080 (portrait), zidane.jpg 1280x720 (landscape)
    quantize_int8(proto, info, CalibOptions(source=IMAGES, num_images=2, method="max"))
    assert len(fed) == 2
    for path, got in zip(paths, fed):
        img = read_image(path)
        want = preprocess([img], IMGSZ)[0]
        assert got.shape == (1, 3, *IMGSZ) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        stretched = np.ascontiguousarray(
            __import__("cv2").resize(img, IMGSZ[::-1])[..., ::-1].transpose(2, 0, 1)[None], np.float32) / 255
        assert not np.allclose(got, stretched, atol=0.05)
    pad = 114 / 255
    assert np.allclose(fed[0][0, :, :, :5], pad)  # portrait: gray bars left/right
    assert np.allclose(fed[1][0, :, :5, :], pad)  # landscape: gray bars top/bottom


def test_sources_folder_list_json_and_subset(shapes_dir, val_dir, tmp_path, caplog):
    all_images = list_images(val_dir)
    chosen = resolve_images(val_dir, 5)
    assert chosen.available == 200 and chosen.paths == [all_images[i] for i in (0, 50, 100, 149, 199)]
    listing = tmp_path / "calib.txt"
    listing.write_text("\n".join(f"{val_dir}/{p.name}" for p in all_images[:3]) + "\n\n")
    assert resolve_images(listing, 10).paths == all_images[:3]
    coco = resolve_images(shapes_dir / "annotations" / "instances_val.json", 200)
    assert [p.name for p in coco.paths] == [p.name for p in all_images] and all(p.is_file() for p in coco.paths)
    assert len(resolve_images(shapes_dir, 7).paths) == 7  # a dataset root resolves like --data
    with caplog.at_level(logging.WARNING, logger="yolo7_export"):
        assert resolve_images(IMAGES, 512).paths == list_images(IMAGES)
    assert any("only 2 image(s)" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------- cache
def test_calib_cache_skips_calibration_and_gives_identical_bytes(fp32, val_dir, tmp_path):
    proto, info = fp32
    cache = tmp_path / "calib.json"
    opts = CalibOptions(source=val_dir, num_images=8, method="percentile", cache=cache)
    q1, r1 = quantize_int8(proto, info, opts)
    q2, r2 = quantize_int8(proto, info, opts)
    assert (r1["cache"], r2["cache"]) == ("miss", "hit")
    assert q1.SerializeToString() == q2.SerializeToString()
    data = json.loads(cache.read_text())
    assert data["n_images"] == 8 and data["method"] == "percentile" and data["amax"]["images"] > 0.9

    def fail(*a, **k):
        raise AssertionError("calibration ran despite a matching cache")

    saved = calibrate_mod._run_calibration
    calibrate_mod._run_calibration = fail
    try:
        assert quantize_int8(proto, info, opts)[1]["cache"] == "hit"
        with pytest.raises(AssertionError):  # other images -> key differs -> calibration would run
            quantize_int8(proto, info, CalibOptions(source=val_dir, num_images=7, method="percentile", cache=cache))
    finally:
        calibrate_mod._run_calibration = saved
    _, r3 = quantize_int8(proto, info, CalibOptions(source=val_dir, num_images=8, method="max", cache=cache))
    assert r3["cache"] == "stale" and json.loads(cache.read_text())["method"] == "max"


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("case, message", [
    ("none", "--int8 needs calibration images"),
    ("missing", "calibration source not found"),
    ("empty", "no calibration images in"),
    ("list_missing", "image(s) not found"),
    ("broken", "x.jpg"),
    ("method", "unknown --calib-method"),
    ("count", "--calib-images must be >= 1"),
    ("budget", "--int8-max-drop must be >= 0"),
    ("unlabelled", "pass --data"),
    ("overlap", "also calibration images"),
    ("cache_dir", "is a folder"),
])
def test_clear_errors(fp32, tmp_path, shapes_dir, case, message):
    proto, info = fp32
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "list.txt").write_text("nope/does_not_exist.jpg\n")
    opts = {"none": CalibOptions(source=None), "missing": CalibOptions(source=tmp_path / "nowhere"),
            "empty": CalibOptions(source=tmp_path / "empty"),
            "list_missing": CalibOptions(source=tmp_path / "list.txt"),
            "broken": CalibOptions(source=tmp_path / "broken"), "method": CalibOptions(source=IMAGES, method="mse"),
            "count": CalibOptions(source=IMAGES, num_images=0),
            "budget": CalibOptions(source=IMAGES, max_drop=-1.0),
            "unlabelled": CalibOptions(source=IMAGES, num_images=1, method="max", max_drop=0.5),
            "overlap": CalibOptions(source=shapes_dir / "images" / "val", num_images=4, method="max", max_drop=0.5,
                                    eval_data=shapes_dir),
            "cache_dir": CalibOptions(source=IMAGES, cache=tmp_path)}[case]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quantize_int8(proto, info, opts)


def test_cli_int8_without_calib_is_one_line_exit_2(trained_ckpt, tmp_path):
    from click.testing import CliRunner

    from exporter.cli import export_command

    result = CliRunner().invoke(export_command, [str(trained_ckpt), "--img", "320", "--int8", "-o", str(tmp_path)])
    assert result.exit_code == 2
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--calib" in errors[0] and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.onnx"))
