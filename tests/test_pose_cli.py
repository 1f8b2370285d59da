"""Pose through the three commands: yolo7-detect writes keypoints (and draws them), yolo7-bench writes keypoint
AP and keypoint parity into the report, and bad input (a pose model where detection is expected and the
reverse, a keypoint count that does not match the labels) is one clear line with exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from exporter.check.cli import bench_command
from exporter.cli import export_command
from runtimes.cli import detect_command

from conftest import TRAINED
from pose_data import make_pose_set

POSE = Path(__file__).parent / "data" / "pose"
CKPT = POSE / "dev_yolov7-w6-pose-kpt1x1_w00625.pt"


def _invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


@pytest.fixture(scope="module")
def pose_onnx(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pose_export")
    r = _invoke(export_command, CKPT, "--img", "320", "--nms", "portable", "--topk", "300", "-o", out)
    assert r.exit_code == 0, r.output
    return out / f"{CKPT.stem}.onnx"


@pytest.fixture(scope="module")
def pose_set(tmp_path_factory):
    return make_pose_set(tmp_path_factory.mktemp("pose_set"), n_images=3, size=(240, 400), seed=11)


def test_detect_writes_keypoints_and_matches_the_checkpoint(pose_onnx, pose_set, tmp_path):
    results = {}
    for name, artifact in (("onnx", pose_onnx), ("pt", CKPT)):
        args = [artifact, pose_set.images_dir, "-o", tmp_path / name]
        if name == "pt":
            args += ["--img", "320"]
        r = _invoke(detect_command, *args)
        assert r.exit_code == 0, r.output
        results[name] = json.loads((tmp_path / name / "detections.json").read_text())
    n_total = 0
    for a, b in zip(results["onnx"]["images"], results["pt"]["images"]):
        assert len(a["detections"]) == len(b["detections"])
        for da, db in zip(a["detections"], b["detections"]):
            ka, kb = np.array(da["keypoints"]), np.array(db["keypoints"])
            assert ka.shape == (17, 3)
            assert (ka[:, 0] >= 0).all() and (ka[:, 0] <= a["width"]).all() and (ka[:, 1] <= a["height"]).all()
            np.testing.assert_allclose(ka[:, :2], kb[:, :2], atol=0.05)  # image pixels, both paths
            np.testing.assert_allclose(ka[:, 2], kb[:, 2], atol=1e-3)
            n_total += 1
    assert n_total > 0
    image = cv2.imread(str(tmp_path / "onnx" / results["onnx"]["images"][0]["annotated"]))
    assert image is not None and image.shape[:2] == (240, 400)


def test_bench_reports_keypoint_ap_and_parity(pose_onnx, pose_set, tmp_path):
    r = _invoke(bench_command, CKPT, pose_onnx, "--data", pose_set.coco_json, "-o", tmp_path, "--batches", "1",
                "--runs", "1", "--warmup", "0", "--parity-images", "3", "--threads", "1", "--no-progress")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report.json").read_text())
    ref, art = report["artifacts"]
    for row in (ref, art):
        ap = row["keypoints"]["ap"]
        assert 0.0 <= ap["ap50_95"] <= 1.0 and ap["sigmas"] == "coco17" and ap["n_instances"] > 0
        assert ap["evaluator"] == "faster-coco-eval" and len(ap["stats"]) == 10
    assert ref["keypoints"]["parity"] is None
    par = art["keypoints"]["parity"]
    assert par["matched"] == par["n_reference"] > 0  # every PyTorch detection reproduced
    assert par["max_px"] < 0.05 and par["visibility_max_abs"] < 1e-3
    assert "## Keypoints" in (tmp_path / "report.md").read_text()


def _line(result) -> str:
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


def test_pose_model_with_detection_labels_is_one_line(pose_onnx, pose_set, tmp_path):
    boxes = tmp_path / "boxes"
    (boxes / "images").mkdir(parents=True)
    (boxes / "labels").mkdir()
    for img in sorted(pose_set.images_dir.iterdir()):
        (boxes / "images" / img.name).write_bytes(img.read_bytes())
        rows = (pose_set.root / "labels" / f"{img.stem}.txt").read_text().splitlines()
        (boxes / "labels" / f"{img.stem}.txt").write_text("".join(" ".join(r.split()[:5]) + "\n" for r in rows))
    r = _invoke(bench_command, CKPT, pose_onnx, "--data", boxes / "images", "-o", tmp_path / "rep", "--no-progress")
    assert "no keypoint labels" in _line(r)


def test_keypoint_count_mismatch_is_one_line(pose_onnx, pose_set, tmp_path):
    gt = json.loads(pose_set.coco_json.read_text())
    for a in gt["annotations"]:
        a["keypoints"] = a["keypoints"][:15]  # 5 keypoints
    (tmp_path / "annotations").mkdir()
    bad = tmp_path / "annotations" / "person_keypoints.json"
    bad.write_text(json.dumps(gt))
    for img in pose_set.images_dir.iterdir():
        (tmp_path / img.name).write_bytes(img.read_bytes())
    r = _invoke(bench_command, CKPT, pose_onnx, "--data", bad, "-o", tmp_path / "rep", "--no-progress")
    assert "has 5 keypoints but the model predicts 17" in _line(r)


def test_pose_artifact_against_a_detection_checkpoint_is_one_line(pose_onnx, pose_set, tmp_path):
    r = _invoke(bench_command, TRAINED, pose_onnx, "--data", pose_set.coco_json, "-o", tmp_path / "rep",
                "--no-progress")
    assert "exported from another checkpoint" in _line(r) or "pose model" in r.output


def test_efficient_nms_for_a_pose_checkpoint_is_one_line(tmp_path):
    r = _invoke(export_command, CKPT, "--img", "320", "--nms", "efficient", "-o", tmp_path)
    assert "--nms portable" in _line(r)
