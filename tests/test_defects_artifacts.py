"""Issue 14, what a run leaves behind and what yolo7-bench measures: no silent replacement of an artifact made
with other settings, no kill -9 debris that outlives the next run, a manifest that never describes files
that are not there, real output dims with --dynamic-batch, and a bench that checks before it measures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from exporter.artifacts import Manifest
from exporter.check.harness import BenchConfig, run_bench
from exporter.errors import UserError
from exporter.options import ExportOptions, NmsOptions
from exporter.pipeline import run as export
from runtimes.files import clean_stale_partials, write_bytes_atomic

DATA = Path(__file__).parent / "data"
CKPT = DATA / "yolov7-tiny-shapes.pt"
JSON = DATA / "shapes" / "annotations" / "instances_val.json"


def _dims(path: Path) -> list[list]:
    model = onnx.load(str(path), load_external_data=False)
    return [[d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output]


def test_other_settings_never_replace_an_artifact_silently(tmp_path):
    out = tmp_path / "out"
    first = export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(160, 160))).onnx_path
    before = first.read_bytes()
    for kw in ({"imgsz": (192, 192)}, {"imgsz": (160, 160), "batch": 2}, {"imgsz": (160, 160), "dynamic_batch": True},
               {"imgsz": (160, 160), "nms": NmsOptions(mode="onnx")}):
        with pytest.raises(UserError, match=r"was exported with other settings \(.*\); use another -o folder, or pass "
                                            r"--overwrite"):
            export(ExportOptions(checkpoint=CKPT, out_dir=out, **kw))
        assert first.read_bytes() == before
    again = export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(160, 160))).onnx_path  # same settings: fine
    assert again.read_bytes() == before
    replaced = export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(192, 192), overwrite=True)).onnx_path
    assert replaced == first and replaced.read_bytes() != before
    with_nms = export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(192, 192), overwrite=True,
                                    nms=NmsOptions(mode="onnx", conf=0.3))).onnx_path
    with pytest.raises(UserError, match=r"nms_params"):  # thresholds count too
        export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(192, 192), nms=NmsOptions(mode="onnx", conf=0.4)))
    assert with_nms.is_file()


def test_stale_partials_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale_file = tmp_path / f".m.onnx.{dead_pid}.abc123.partial"
    stale_dir = tmp_path / f".detect.{dead_pid}.xyz.partial"
    legacy = tmp_path / ".detect-q1w2e3.partial"  # older versions wrote no pid: stale by definition
    live = tmp_path / f".other.onnx.{os.getpid()}.def456.partial"
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "a.jpg").write_bytes(b"x")
    legacy.mkdir()
    live.write_bytes(b"being written")
    (tmp_path / "keep.partial").write_bytes(b"not hidden: not ours")
    write_bytes_atomic(tmp_path / "m.onnx", b"new")  # any write into the folder cleans it
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([live.name, "keep.partial", "m.onnx"])
    assert clean_stale_partials(tmp_path) == []


def test_kill_between_outputs_and_manifest_leaves_no_stale_manifest(tmp_path, monkeypatch):
    out = tmp_path / "out"
    export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(160, 160)))
    old = json.loads((out / "manifest.json").read_text())

    def killed(self, out_dir):  # what kill -9 right before the manifest rename looks like to the folder
        raise KeyboardInterrupt

    monkeypatch.setattr(Manifest, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(160, 160), simplify=False))
    onnx_sha = __import__("hashlib").sha256((out / "yolov7-tiny-shapes.onnx").read_bytes()).hexdigest()
    assert onnx_sha != old["outputs"][0]["sha256"]  # the new ONNX is in place ...
    assert not (out / "manifest.json").exists()  # ... and no manifest claims the old one


def test_manifest_records_effective_settings_and_triton_files(tmp_path, caplog):
    caplog.set_level("INFO", logger="yolo7_export")
    out = tmp_path / "out"
    result = export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(160, 160), dynamic_batch=True,
                                  triton=out / "triton"))
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["model"]["imgsz"] == [160, 160] and manifest["model"]["batch"] is None
    paths = {o["path"]: o for o in manifest["outputs"]}
    config = "triton/yolov7-tiny-shapes_onnx/config.pbtxt"
    assert config in paths and "triton/yolov7-tiny-shapes_onnx/1/model.onnx" in paths
    assert paths[config]["kind"] == "triton"
    assert "wrote Triton model" in caplog.text and "config.pbtxt" in caplog.text
    # --dynamic-batch keeps the fixed sizes: N = 3 anchors x (20^2 + 10^2 + 5^2) cells at 160 px, 5 + 5 classes
    assert _dims(result.onnx_path) == [["batch", 1575, 10]]
    text = (out / config).read_text()
    assert "dims: [ 1575, 10 ]" in text and "-1" not in text.split("output [")[1].split("]")[0]


def test_default_imgsz_recorded_in_manifest(tmp_path):
    result = export(ExportOptions(checkpoint=CKPT, out_dir=tmp_path))  # no --img: the checkpoint's 640
    assert json.loads(result.manifest_path.read_text())["model"]["imgsz"] == [640, 640]


# ------------------------------------------------------------------------------------------ yolo7-bench
SMALL = {"runs": 1, "warmup": 0, "max_images": 4, "parity_images": 2, "threads": 1, "progress": False}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("made")
    return {"raw": export(ExportOptions(checkpoint=CKPT, out_dir=out / "raw", imgsz=(160, 160))).onnx_path,
            "eff": export(ExportOptions(checkpoint=CKPT, out_dir=out / "eff", imgsz=(160, 160),
                                        nms=NmsOptions(mode="efficient"))).onnx_path}


def test_bench_times_the_reference_only_at_the_artifacts_batches(tmp_path, made):
    cfg = BenchConfig(checkpoint=CKPT, artifacts=[made["raw"]], out_dir=tmp_path / "r", data=JSON,
                      batches=(1, 2, 4), **SMALL)
    report = run_bench(cfg)
    ref, raw = report["artifacts"]
    assert [lat["batch"] for lat in raw.latency] == [1]
    assert [lat["batch"] for lat in ref.latency] == [1]  # was 1, 2, 4: minutes of PyTorch for nothing
    assert ref.peak_mem_mb is None and "not reported on CPU" in ref.mem_kind
    assert all(lat["peak_mem_mb"] is None for lat in raw.latency)


def test_bench_refuses_before_measuring_when_nothing_can_run(tmp_path, made, monkeypatch):
    import exporter.check.harness as harness

    calls = []
    monkeypatch.setattr(harness, "_measure", lambda *a, **k: calls.append(a) or {})
    cfg = BenchConfig(checkpoint=CKPT, artifacts=[made["eff"]], out_dir=tmp_path / "r", data=JSON, **SMALL)
    with pytest.raises(UserError, match=r"nothing to check on this machine: yolov7-tiny-shapes.onnx: EfficientNMS_TRT"):
        run_bench(cfg)
    assert calls == [] and not (tmp_path / "r").exists()


def test_bench_opens_every_artifact_before_measuring(tmp_path, made, monkeypatch):
    import exporter.check.harness as harness

    calls = []
    real_open = harness.open_backend

    def broken(path, **kw):
        if Path(path).suffix == ".onnx":
            raise UserError(f"cannot open {Path(path).name}")
        return real_open(path, **kw)

    monkeypatch.setattr(harness, "_measure", lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(harness, "open_backend", broken)
    with pytest.raises(UserError, match="cannot open"):
        run_bench(BenchConfig(checkpoint=CKPT, artifacts=[made["raw"]], out_dir=tmp_path / "r", data=JSON, **SMALL))
    assert calls == []


def test_bench_says_what_was_checked_and_skipped(tmp_path, made, capsys):
    from exporter.check.cli import main

    args = [str(CKPT), str(made["raw"]), str(made["eff"]), "--data", str(JSON), "-o", str(tmp_path / "r"),
            "--runs", "1", "--warmup", "0", "--max-images", "4", "--parity-images", "2", "--threads", "1",
            "--no-progress"]
    with pytest.raises(SystemExit) as ok:
        main(args)
    out = capsys.readouterr().out
    assert ok.value.code in (0, None)
    assert "checked 1 artifact(s) against PyTorch (raw/yolov7-tiny-shapes.onnx); skipped 1: eff/yolov7-tiny-shapes" \
           ".onnx (EfficientNMS_TRT" in out and "no gates set" in out and "all gates passed" not in out
    with pytest.raises(SystemExit) as gated:
        main(args + ["--max-map-drop", "5"])
    err = capsys.readouterr().err
    assert gated.value.code == 3 and "eff/yolov7-tiny-shapes.onnx was not checked" in err


def test_scratch_folders_live_inside_the_output_folder(tmp_path):
    import tempfile

    from runtimes.files import scratch_in

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    out = tmp_path / "out"
    (out / f".scratch.{dead}.k9.partial" / "yolo7_qdq_x").mkdir(parents=True)  # what kill -9 left
    before = tempfile.gettempdir()
    with scratch_in(out) as scratch:
        with tempfile.TemporaryDirectory(prefix="yolo7_calib_") as tmp:  # what the INT8 stages do
            assert Path(tmp).parent == scratch and scratch.parent == out
        assert sorted(p.name for p in out.iterdir()) == [scratch.name]  # the killed run's folder is gone
    assert tempfile.gettempdir() == before and list(out.iterdir()) == []  # nothing left
    with scratch_in(tmp_path / "fresh"):
        pass
    assert not (tmp_path / "fresh").exists()  # a folder made only for scratch space is removed again


def test_manifest_keeps_earlier_runs_outputs_that_are_still_intact(tmp_path):
    out = tmp_path / "out"
    export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(160, 160)))
    export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(160, 160), precision="fp16"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [o["path"] for o in manifest["outputs"]] == ["yolov7-tiny-shapes.fp16.onnx"]
    earlier = manifest["earlier_outputs"]
    assert [e["path"] for e in earlier] == ["yolov7-tiny-shapes.onnx"] and earlier[0]["flags"]["precision"] == "fp32"
    (out / "yolov7-tiny-shapes.onnx").write_bytes(b"changed by hand")
    export(ExportOptions(checkpoint=CKPT, out_dir=out, imgsz=(160, 160), precision="fp16"))
    assert "earlier_outputs" not in json.loads((out / "manifest.json").read_text())  # never a wrong entry
