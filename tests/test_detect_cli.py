"""`yolo7-detect`: annotated images + detections.json from a checkpoint or an ONNX, the same boxes either way,
and one clear line for every bad input (nothing written)."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from exporter.options import ExportOptions, NmsOptions
from exporter.pipeline import run
from runtimes.base import DetectConfig, Detector
from runtimes.cli import detect_command, main
from runtimes.preprocess import read_image
from tests.conftest import SHAPES, TRAINED

VAL = SHAPES / "images" / "val"


@pytest.fixture(scope="module")
def onnx_tail(tmp_path_factory) -> Path:
    """The shapes model with the ONNX NMS tail, official settings (best class, conf 0.25, iou 0.45)."""
    nms = NmsOptions(mode="onnx", conf=0.25, iou=0.45, topk=300, best_class=True)
    opts = ExportOptions(checkpoint=TRAINED, out_dir=tmp_path_factory.mktemp("cli_onnx"), imgsz=(320, 320),
                         dynamic_batch=True, nms=nms)
    return run(opts).onnx_path


@pytest.fixture
def source(tmp_path) -> Path:
    """Four images of four sizes: two JPEG, one PNG, one BMP (saved back as .jpg)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(VAL / "000001.jpg", src / "a.jpg")  # 240x352
    shutil.copy(VAL / "000003.jpg", src / "b.jpg")  # 256x416
    cv2.imwrite(str(src / "c.png"), read_image(VAL / "000004.jpg"))  # 384x288
    cv2.imwrite(str(src / "d.bmp"), read_image(VAL / "000002.jpg"))  # 256x256
    return src


def _detect(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(detect_command, [str(a) for a in args])


def _json(out: Path) -> dict:
    return json.loads((out / "detections.json").read_text())


def _assert_same(a: list[dict], b: list[dict]) -> None:
    """JSON detections equal up to 0.05 px (+ the JSON's 0.01 px rounding) and 1e-4 in score, any order."""
    assert len(a) == len(b)
    free = list(b)
    for d in a:
        match = [e for e in free if e["class_id"] == d["class_id"]
                 and np.abs(np.subtract(e["box"], d["box"])).max() <= 0.06]
        assert len(match) == 1, f"no unique match for {d}"
        assert abs(match[0]["score"] - d["score"]) <= 1e-4
        free.remove(match[0])


def test_checkpoint_and_onnx_give_the_same_annotated_output(tmp_path, source, onnx_tail):
    out_pt, out_onnx = tmp_path / "pt", tmp_path / "onnx"
    r1 = _detect(TRAINED, source, "--img", 320, "-o", out_pt)
    assert r1.exit_code == 0, r1.output
    r2 = _detect(onnx_tail, source, "-o", out_onnx, "--batch", 3)  # 3 + 1 images per call
    assert r2.exit_code == 0, r2.output
    assert "done: 4 image(s)" in r2.output
    assert sorted(p.name for p in out_pt.iterdir()) == ["a.jpg", "b.jpg", "c.png", "d.jpg", "detections.json"]
    j1, j2 = _json(out_pt), _json(out_onnx)
    assert j1["backend"]["backend"] == "pytorch" and j2["backend"]["backend"] == "onnxruntime"
    assert j1["names"] == j2["names"] == ["circle", "square", "triangle", "star", "cross"]
    total = 0
    for rec1, rec2 in zip(j1["images"], j2["images"]):
        assert rec1["file"] == rec2["file"] and Path(rec1["file"]).parent == source
        src = read_image(rec1["file"])
        assert (rec1["height"], rec1["width"]) == src.shape[:2]
        _assert_same(rec1["detections"], rec2["detections"])
        for d in rec1["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= rec1["width"] and 0 <= y1 < y2 <= rec1["height"]
            assert 0.25 < d["score"] <= 1 and j1["names"][d["class_id"]] == d["class_name"]
        annotated = read_image(out_pt / rec1["annotated"])
        assert annotated.shape == src.shape
        if rec1["detections"]:  # boxes were drawn: the annotated image differs on the box edges
            x1, y1, x2, y2 = (int(round(v)) for v in rec1["detections"][0]["box"])
            edge = annotated[min(y1 + 5, y2), x1].astype(int) - src[min(y1 + 5, y2), x1].astype(int)
            assert np.abs(edge).max() > 30
        total += len(rec1["detections"])
    assert total >= 20
    # the PNG stays lossless: untouched pixels are identical to the source
    png, src = read_image(out_pt / "c.png"), read_image(source / "c.png")
    assert (png == src).all(-1).mean() > 0.5
    # the JSON is what the Detector returns
    direct = Detector.from_path(TRAINED, DetectConfig(), imgsz=(320, 320)).detect([read_image(source / "a.jpg")])[0]
    _assert_same(j1["images"][0]["detections"], direct.to_list(j1["names"]))


def test_single_image_and_txt_list_sources(tmp_path, source, onnx_tail):
    (tmp_path / "list.txt").write_text("src/b.jpg\n\n" + str(source / "a.jpg") + "\n")
    r = _detect(onnx_tail, tmp_path / "list.txt", "-o", tmp_path / "out", "--no-save-images")
    assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["detections.json"]
    listed = _json(tmp_path / "out")["images"]
    assert [Path(rec["file"]).name for rec in listed] == ["b.jpg", "a.jpg"]
    r = _detect(onnx_tail, source / "b.jpg", "-o", tmp_path / "one")
    assert r.exit_code == 0, r.output
    _assert_same(_json(tmp_path / "one")["images"][0]["detections"], listed[0]["detections"])


def test_extra_conf_and_max_det_on_in_graph_nms(tmp_path, source, onnx_tail, caplog):
    base = _detect(onnx_tail, source, "-o", tmp_path / "base", "--no-save-images")
    assert base.exit_code == 0, base.output
    with caplog.at_level(logging.INFO, logger="yolo7_export"):
        r = _detect(onnx_tail, source, "-o", tmp_path / "strict", "--conf", 0.5, "--max-det", 2, "--iou", 0.3,
                    "--no-save-images")
    assert r.exit_code == 0, r.output
    assert "--iou ignored" in caplog.text and "detections in 4 image(s)" in caplog.text
    for full, strict in zip(_json(tmp_path / "base")["images"], _json(tmp_path / "strict")["images"]):
        expected = sorted((d for d in full["detections"] if d["score"] >= 0.5), key=lambda d: -d["score"])[:2]
        assert strict["detections"] == expected


def test_entry_point_help_and_img_h_w(tmp_path, source, capsys):
    out = subprocess.run(["yolo7-detect", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Examples:" in out.stdout and "detections.json" in out.stdout
    with pytest.raises(SystemExit) as exc:  # `--img H W` (two numbers) through main()
        main([str(TRAINED), str(source / "a.jpg"), "--img", "256", "320", "-o", str(tmp_path / "hw")])
    assert exc.value.code == 0
    assert _json(tmp_path / "hw")["input_size"] == [256, 320]


def _foreign_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "g",
                              [vi("images", TensorProto.FLOAT, [1, 3, 320, 320])],
                              [vi("output", TensorProto.FLOAT, [1, 3, 320, 320])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("case, expect", [
    ("missing_source", "source not found"),
    ("empty_folder", "no images found in folder"),
    ("unreadable_image", "cannot read image"),
    ("undecodable_image", "cannot read image"),
    ("missing_listed_image", "image not found"),
    ("conf_above_1", "Invalid value for '--conf'"),
    ("iou_below_0", "Invalid value for '--iou'"),
    ("max_det_0", "Invalid value for '--max-det'"),
    ("bad_img", "Invalid value for --img"),
    ("img_not_multiple", "not a multiple of the model's max stride 32"),
    ("img_with_onnx", "--img applies to .pt checkpoints only"),
    ("foreign_onnx", "not made by yolo7-export"),
    ("missing_artifact", "artifact not found"),
    ("unknown_artifact", "don't know how to run"),
    ("out_is_source", "would overwrite the source image"),
    ("cuda_unavailable", "cuda"),
])
def test_bad_input_is_one_clear_line(tmp_path, source, onnx_tail, case, expect):
    out = tmp_path / "out"
    pt = [TRAINED, source, "-o", out]
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.bin").write_bytes(b"x")
    args = {
        "missing_source": [TRAINED, tmp_path / "nope", "-o", out],
        "empty_folder": [TRAINED, tmp_path / "empty", "-o", out],
        "unreadable_image": [TRAINED, source, "-o", out],
        "undecodable_image": [onnx_tail, source, "-o", out],
        "missing_listed_image": [TRAINED, tmp_path / "list.txt", "-o", out],
        "conf_above_1": pt + ["--conf", 1.5],
        "iou_below_0": pt + ["--iou", -0.1],
        "max_det_0": pt + ["--max-det", 0],
        "bad_img": pt + ["--img", "abc"],
        "img_not_multiple": pt + ["--img", 300],
        "img_with_onnx": [onnx_tail, source, "-o", out, "--img", 320],
        "foreign_onnx": [_foreign_onnx(tmp_path / "foreign.onnx"), source, "-o", out],
        "missing_artifact": [tmp_path / "nope.onnx", source, "-o", out],
        "unknown_artifact": [tmp_path / "junk.bin", source, "-o", out],
        "out_is_source": [onnx_tail, source, "-o", source],
        "cuda_unavailable": pt + ["--device", "cuda"],
    }[case]
    if case == "unreadable_image":
        (source / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    if case == "undecodable_image":  # passes the header check, fails to decode after a.jpg..d.bmp were done
        (source / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 20)
    if case == "missing_listed_image":
        (tmp_path / "list.txt").write_text("src/a.jpg\nsrc/missing.jpg\n")
    if case == "cuda_unavailable":
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    before = sorted(source.iterdir())
    r = _detect(*args)
    assert r.exit_code == 2, r.output
    assert expect in r.output and "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.lower().startswith("error")]
    assert len(errors) == 1, r.output
    assert not out.exists(), "no output folder, no partial set of annotated images"
    assert sorted(source.iterdir()) == before, "sources untouched, nothing written beside them"
