"""Issue 14, bad input found by fuzzing and by a new user: each case is one line and exit 2 (or a clear
refusal), never an internal error, and malformed evaluation data never changes the numbers silently."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from exporter.check.harness import Gates, apply_gates
from exporter.check.rows import ArtifactRow
from exporter.errors import UserError
from exporter.evaluation.dataset import DatasetError, load_dataset
from runtimes.base import Detections
from runtimes.preprocess import letterbox, list_images, preprocess, scale_boxes, truncated_image

DATA = Path(__file__).parent / "data"
CKPT = DATA / "yolov7-tiny-shapes.pt"
VAL = DATA / "shapes" / "images" / "val"


def _jpeg(path: Path, h: int = 48, w: int = 64) -> Path:
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path


# ------------------------------------------------------------------------------------------ images, lists
@pytest.mark.parametrize("shape", [(1, 10000), (10000, 1), (1, 1), (3, 7001)])
def test_letterbox_of_extreme_aspect_ratios(shape):
    img = np.full((*shape, 3), 200, np.uint8)
    batch, infos = preprocess([img], (320, 320))
    assert batch.shape == (1, 3, 320, 320)
    back = scale_boxes(np.array([[0, 0, 320, 320]], np.float32), infos[0])
    assert back[0, 2] == pytest.approx(shape[1], abs=1) and back[0, 3] == pytest.approx(shape[0], abs=1)
    out, _ = letterbox(img, (64, 96))
    assert out.shape[:2] == (64, 96)


def test_txt_list_rules_and_bad_lists(tmp_path):
    img = _jpeg(tmp_path / "imgs" / "a.jpg")
    lst = tmp_path / "lists" / "l.txt"
    lst.parent.mkdir()
    lst.write_text(f"../imgs/a.jpg\n\n{img}\n")  # relative to the list's folder; absolute as is
    assert list_images(lst) == [lst.parent / "../imgs/a.jpg", img]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text"):
        list_images(bad)
    long = tmp_path / "long.txt"
    long.write_text("x" * 300 + ".jpg\n")
    with pytest.raises(UserError, match=r"long.txt:1: not a file path \(304 characters\)"):
        list_images(long)
    long.write_text("a/" * 2100 + "b.jpg\n")
    with pytest.raises(UserError, match=r"long.txt:1: not a file path"):
        list_images(long)


def test_truncated_images_are_recognised(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    assert truncated_image(good) is None
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated" in truncated_image(cut)
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), np.zeros((8, 8, 3), np.uint8))
    assert truncated_image(png) is None
    png.write_bytes(png.read_bytes()[:-20])
    assert "truncated" in truncated_image(png)
    (tmp_path / "junk_after_eoi.jpg").write_bytes(data + b"\0" * 100)  # trailing padding after EOI is fine
    assert truncated_image(tmp_path / "junk_after_eoi.jpg") is None


# ------------------------------------------------------------------------------------------- COCO json
def _coco(tmp_path: Path, n: int = 2) -> tuple[Path, dict]:
    root = tmp_path / "ds"
    images = []
    for i in range(1, n + 1):
        _jpeg(root / "images" / "val" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48})
    gt = {"images": images, "categories": [{"id": 0, "name": "circle"}, {"id": 1, "name": "square"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [4, 4, 20, 10], "area": 200,
                           "iscrowd": 0}]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    return root / "annotations" / "instances_val.json", gt


def _write(path: Path, gt: dict) -> Path:
    path.write_text(json.dumps(gt))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda g: g["annotations"][0].update(category_id="0"), r"annotations\[0\] \(id 1\): needs an integer 'category_id', got '0'"),
    (lambda g: g["annotations"][0].update(image_id="1"), r"needs an integer 'image_id'"),
    (lambda g: g["annotations"][0].update(bbox=[4, 4, float("nan"), 10]), r"needs 'bbox' \[x, y, w, h\] of 4 finite numbers"),
    (lambda g: g["annotations"][0].update(bbox=[4, 4, -20, 10]), r"bbox width and height must be >= 0"),
    (lambda g: g["annotations"][0].pop("bbox"), r"needs 'bbox'"),
    (lambda g: g["annotations"][0].update(bbox="4 4 20 10"), r"needs 'bbox'"),
    (lambda g: g["images"][0].pop("file_name"), r"images\[0\] \(id 1\): needs a 'file_name' string"),
    (lambda g: g["images"][1].update(id="2"), r"images\[1\] \(id '2'\): needs an integer 'id'"),
    (lambda g: g["images"][0].pop("width"), r"needs integer 'width' and 'height' > 0"),
    (lambda g: g.update(annotations={}), r"not a COCO instances file"),
    (lambda g: g["categories"][0].update(id=None), r"categories\[0\]: needs an integer 'id'"),
])
def test_coco_json_with_missing_or_mistyped_fields(tmp_path, edit, message):
    path, gt = _coco(tmp_path)
    edit(gt)
    with pytest.raises(DatasetError, match=message):
        load_dataset(_write(path, gt))


def test_coco_absolute_first_file_name_does_not_move_the_relative_ones(tmp_path):
    path, gt = _coco(tmp_path)
    gt["images"][0]["file_name"] = str(path.parent.parent / "images" / "val" / "1.jpg")  # absolute first
    ds = load_dataset(_write(path, gt))
    assert [im.path for im in ds.images] == [path.parent.parent / "images" / "val" / "1.jpg",
                                            path.parent.parent / "images" / "val" / "2.jpg"]


def test_truncated_jpeg_in_data_fails_at_load(tmp_path):
    path, gt = _coco(tmp_path)
    img = path.parent.parent / "images" / "val" / "2.jpg"
    img.write_bytes(img.read_bytes()[:300])
    with pytest.raises(DatasetError, match=r"2.jpg: truncated or damaged JPEG"):
        load_dataset(_write(path, gt))
    yolo = tmp_path / "y"
    _jpeg(yolo / "images" / "a.jpg")
    (yolo / "labels").mkdir()
    (yolo / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (yolo / "images" / "b.jpg").write_bytes(img.read_bytes())
    (yolo / "labels" / "b.txt").write_text("")
    with pytest.raises(DatasetError, match=r"b.jpg: truncated"):
        load_dataset(yolo / "images")


def test_yolo_labels_nan_negative_and_all_empty(tmp_path):
    root = tmp_path / "y"
    _jpeg(root / "images" / "a.jpg")
    (root / "labels").mkdir()
    for line in ("0 0.5 0.5 nan 0.2", "0 0.5 0.5 -0.005 0.2", "1 0.5 0.5 0.2", "x 0.5 0.5 0.2 0.2"):
        (root / "labels" / "a.txt").write_text(line + "\n")
        with pytest.raises(DatasetError, match=r"a.txt:1: "):
            load_dataset(root / "images")
    (root / "labels" / "a.txt").write_bytes(b"\xff\xfe0 0.5\n")
    with pytest.raises(DatasetError, match=r"cannot read label file"):
        load_dataset(root / "images")
    (root / "labels" / "a.txt").write_text("")  # every label file empty: mAP would be -1
    with pytest.raises(DatasetError, match=r"no labelled objects .* mAP would be undefined"):
        load_dataset(root / "images").for_model(["circle"])


def test_undefined_map_and_skipped_artifacts_never_pass_a_gate():
    ref = ArtifactRow("pt", reference=True, map={"map50_95": -1.0}, latency=[{"batch": 1, "model_ms": {"p50": 3.0}}])
    art = ArtifactRow("m.onnx", map={"map50_95": -1.0}, delta_ap=0.0, parity={"finite": True, "cosine": 1.0},
                      latency=[{"batch": 1, "model_ms": {"p50": 2.0}}])
    _, failures = apply_gates([ref, art], Gates(max_map_drop=1.0))
    assert any("mAP is undefined" in f for f in failures)
    eng = ArtifactRow("m.engine", skipped="no TensorRT")
    good = replace(art, map={"map50_95": 0.4}, name="ok.onnx")
    _, failures = apply_gates([replace(ref, map={"map50_95": 0.4}), good, eng], Gates(max_map_drop=1.0))
    assert failures == ["m.engine was not checked (no TensorRT), so no gate covers it"]
    _, failures = apply_gates([replace(ref, map={"map50_95": 0.4}), good, eng], Gates())
    assert failures == []  # no gate asked for: a skip is reported, not a failure


# ------------------------------------------------------------------------------- CLI flags and outputs
def _run(main, args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.err.strip()


@pytest.mark.parametrize("extra, message", [
    (["--calib", "imgs/"], "--calib has no effect without --int8"),
    (["--calib-cache", "c.json"], "--calib-cache has no effect without --int8"),
    (["--hardware-compat", "ampere+"], "--hardware-compat has no effect without --trt"),
    (["--workspace", "4"], "--workspace has no effect without --trt"),
    (["--timing-cache", "t.cache"], "--timing-cache has no effect without --trt"),
    (["--max-batch", "8"], "--max-batch has no effect without --trt"),
    (["--max-map-drop", "1"], "--max-map-drop has no effect without --check"),
    (["--max-latency-ms", "5"], "--max-latency-ms has no effect without --check"),
    (["--min-parity-cos", "0.99"], "--min-parity-cos has no effect without --check"),
    (["--conf", "0.4"], "--conf has no effect without an NMS tail"),
    (["-o", "README.md"], "-o README.md is an existing file"),
])
def test_export_refuses_ignored_flags_and_a_file_as_output_folder(tmp_path, capsys, extra, message, monkeypatch):
    from exporter.cli import main

    monkeypatch.chdir(Path(__file__).parents[1])
    code, err = _run(main, [CKPT, "--img", "160", *(["-o", tmp_path / "out"] if "-o" not in extra else []), *extra],
                     capsys)
    assert code == 2 and err == f"error: {message}" or (code == 2 and err.startswith(f"error: {message}")), err
    assert not (tmp_path / "out").exists()


def test_nms_efficient_without_trt_says_where_it_runs(tmp_path, caplog):
    from exporter.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(CKPT), "--img", "160", "--nms", "efficient", "-o", str(tmp_path / "o")])
    assert exc.value.code in (0, None)
    assert "only TensorRT can run" in caplog.text


def test_bench_bad_batches_is_a_usage_error(tmp_path, capsys):
    from exporter.check.cli import main

    for value in ("1,x", "a,b", "0"):
        code, err = _run(main, [CKPT, "--data", VAL, "--batches", value, "-o", tmp_path / "r"], capsys)
        assert code == 2 and err.startswith("error: --batches: ") and "\n" not in err, err
    (tmp_path / "f").write_text("x")
    code, err = _run(main, [CKPT, "--data", VAL, "-o", tmp_path / "f"], capsys)
    assert code == 2 and "is an existing file" in err


def test_detect_several_sources_and_conf_filter_recorded(tmp_path, capsys):
    from exporter.options import ExportOptions, NmsOptions
    from exporter.pipeline import run as export
    from runtimes.cli import main

    onnx = export(ExportOptions(checkpoint=CKPT, out_dir=tmp_path / "m", imgsz=(160, 160),
                                nms=NmsOptions(mode="onnx"))).onnx_path
    images = sorted(VAL.glob("*.jpg"))[:3]
    code, err = _run(main, [onnx, *images, images[0], "-o", tmp_path / "d", "--conf", "0.5", "--no-save-images"], capsys)
    assert code in (0, None), err
    result = json.loads((tmp_path / "d" / "detections.json").read_text())
    assert [Path(r["file"]).name for r in result["images"]] == [p.name for p in images]  # each image once
    assert result["filter"] == {"conf": 0.5, "max_det": None}
    assert all(d["score"] >= 0.5 for r in result["images"] for d in r["detections"])
    (tmp_path / "file").write_text("x")
    code, err = _run(main, [onnx, images[0], "-o", tmp_path / "file"], capsys)
    assert code == 2 and "is an existing file" in err
    lst = tmp_path / "l.txt"
    lst.write_bytes(b"\xff\xfe\n")
    code, err = _run(main, [onnx, lst, "-o", tmp_path / "d2"], capsys)
    assert code == 2 and "not UTF-8" in err and not (tmp_path / "d2").exists()


def test_two_labels_on_one_box_do_not_overlap():
    from runtimes.draw import _place_labels

    box = [40, 50, 200, 190]
    dets = Detections(np.array([box, box, box], np.float32), np.array([0.9, 0.8, 0.7], np.float32), np.array([0, 1, 2]))
    font = cv2.FONT_HERSHEY_SIMPLEX
    placed = _place_labels(dets, ["circle", "square", "triangle"], 320, font, 0.5, 1)
    rects = [(left, top, left + tw + 2, top + th + base + 2) for _, (left, top, tw, th, base) in placed.values()]
    for i in range(len(rects)):
        for j in range(i + 1, len(rects)):
            a, b = rects[i], rects[j]
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert placed[0][1][1] < box[1]  # the most confident label keeps the spot above the box


def test_shapes_yaml_points_at_the_repository():
    import yaml

    root = Path(__file__).parents[1]
    data = yaml.safe_load((DATA / "shapes" / "shapes.yaml").read_text())
    assert (root / data["val"]).is_dir() and len(data["names"]) == data["nc"]
    text = (DATA / "shapes" / "shapes.yaml").read_text()
    assert "shared/" not in text and "tools/make_shapes_dataset.py" in text
    assert os.path.isfile(root / "tools" / "make_shapes_dataset.py")
