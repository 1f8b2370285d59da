"""The check harness end to end on small settings (160 px, a subset of the shapes set, few timed runs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.check.cli import main as bench_main
from exporter.check.harness import BenchConfig, GateFailure, Gates, apply_gates, run_bench
from exporter.check.rows import ArtifactRow
from exporter.errors import UserError
from exporter.options import CheckOptions, ExportOptions, NmsOptions
from exporter.pipeline import run as export
from runtimes import trt_env

DATA = Path(__file__).parent / "data"
CKPT = DATA / "yolov7-tiny-shapes.pt"
JSON = DATA / "shapes" / "annotations" / "instances_val.json"
SMALL = {"batches": (1, 2), "runs": 2, "warmup": 1, "max_images": 12, "parity_images": 4, "threads": 1,
         "progress": False}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("artifacts")
    made = {}
    for key, kw in {"raw": {}, "dyn": {"dynamic_batch": True}, "nms": {"nms": NmsOptions(mode="onnx")},
                    "eff": {"nms": NmsOptions(mode="efficient")}}.items():
        made[key] = export(ExportOptions(checkpoint=CKPT, out_dir=out / key, imgsz=(160, 160), **kw)).onnx_path
    return made


def _bench(tmp_path, arts, **kw) -> BenchConfig:
    return BenchConfig(checkpoint=CKPT, artifacts=list(arts), out_dir=tmp_path / "report", **(SMALL | {"data": JSON} | kw))


def test_report_for_raw_and_dynamic_onnx(tmp_path, artifacts):
    report = run_bench(_bench(tmp_path, [artifacts["raw"], artifacts["dyn"]]))
    for name in ("report.json", "report.md", "fps_vs_map.png"):
        assert (tmp_path / "report" / name).stat().st_size > 200
    assert json.loads((tmp_path / "report" / "report.json").read_text())["passed"] is True
    ref, raw, dyn = report["artifacts"]
    assert ref.reference and ref.runtime == "PyTorch CPU" and ref.map["n_images"] == 12
    assert 0.05 < ref.map["map50_95"] < ref.map["map50"] < 1
    for row in (raw, dyn):
        assert abs(row.delta_ap) < 0.1 and row.parity["cosine"] > 0.99999 and row.parity["finite"]
        assert row.parity["detections"]["matched_share"] > 0.98
    assert [lat["batch"] for lat in raw.latency] == [1]  # fixed batch 1: timed at 1 only
    assert [lat["batch"] for lat in dyn.latency] == [1, 2]
    lat = dyn.latency[1]
    assert lat["model_ms"]["p50"] <= lat["model_ms"]["p99"] and lat["fps"] == pytest.approx(2000 / lat["model_ms"]["p50"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| raw/yolov7-tiny-shapes.onnx | ONNX Runtime CPU | fp32 |" in md and "## Gates\n\nnone set" in md
    assert report["versions"]["onnxruntime"] and report["device"]["cpu_cores"] >= 1


def test_gates_fail_with_a_reason_after_writing_the_report(tmp_path, artifacts):
    cfg = _bench(tmp_path, [artifacts["raw"]], batches=(1,), gates=Gates(max_map_drop=-1.0, max_latency_ms=1e6,
                                                                          min_parity_cos=0.999))
    with pytest.raises(GateFailure, match=r"gate failed: max-map-drop -1 AP: yolov7-tiny-shapes.onnx is -?0\.\d\d AP "
                                          r"below PyTorch") as err:
        run_bench(cfg)
    assert err.value.exit_code == 3 and "\n" not in str(err.value)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] is False and len(report["failures"]) == 1
    assert {g["gate"]: g["passed"] for g in report["gates"]} == {"max-map-drop": False, "max-latency-ms": True,
                                                                "min-parity-cos": True}
    assert "FAIL" in (tmp_path / "report" / "report.md").read_text()


def test_nms_tail_compares_detections_and_skips_what_cannot_run(tmp_path, artifacts):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    cfg = _bench(tmp_path, [artifacts["nms"], artifacts["eff"], engine], batches=(1,), gates=Gates(min_parity_cos=0.9))
    with pytest.raises(GateFailure, match="min-parity-cos: no artifact with a raw output"):
        run_bench(cfg)
    rows = {r["name"]: r for r in json.loads((tmp_path / "report" / "report.json").read_text())["artifacts"]}
    nms = rows["nms/yolov7-tiny-shapes.onnx"]
    assert nms["nms"] == "onnx" and nms["parity"]["raw"] == {} and nms["parity"]["cosine"] is None
    assert nms["parity"]["detections"]["matched_share"] > 0.95 and "NMS inside the graph" in nms["map"]["protocol_note"]
    assert nms["map"]["map50_95"] > 0.05 and "same NMS (conf 0.25, IoU 0.45, top-100" in nms["delta_basis"]
    assert abs(nms["delta_ap"]) < 0.5  # vs PyTorch under the tail's own settings, not the conf-0.001 protocol
    skipped = [r for r in rows.values() if r["skipped"]]
    assert len(skipped) == 2 and any("TensorRT" in r["skipped"] for r in skipped)
    assert any("EfficientNMS_TRT" in r["skipped"] for r in skipped)
    assert "skipped: " in (tmp_path / "report" / "report.md").read_text()


def test_input_errors(tmp_path, artifacts):
    with pytest.raises(UserError, match=r"yolov7-tiny-shapes.onnx takes 160x160 input but --img is 320x320"):
        run_bench(_bench(tmp_path, [artifacts["raw"]], imgsz=(320, 320)))
    with pytest.raises(UserError, match="a labelled set is needed"):
        run_bench(_bench(tmp_path, [artifacts["raw"]], data=None))
    with pytest.raises(UserError, match="artifact not found"):
        run_bench(_bench(tmp_path, [tmp_path / "missing.onnx"]))
    with pytest.raises(UserError, match="dataset not found"):
        run_bench(_bench(tmp_path, [artifacts["raw"]], data=tmp_path / "nowhere"))
    engine = tmp_path / "m.engine"  # an engine built at 320 (its sidecar says so), beside a 160 ONNX
    engine.write_bytes(b"plan")
    model = {"names": ["circle", "square", "triangle", "star", "cross"], "stride": [8, 16, 32], "imgsz": [320, 320]}
    (tmp_path / "m.engine.json").write_text(json.dumps({"format": trt_env.SIDECAR_FORMAT, "model": model}))
    with pytest.raises(UserError, match=r"different input sizes \(.*onnx 160x160, m.engine 320x320\)"):
        run_bench(_bench(tmp_path, [artifacts["raw"], engine]))
    assert not (tmp_path / "report").exists()


def test_gate_rules_on_rows():
    ref = ArtifactRow("pt", reference=True, map={"map50_95": 0.5}, latency=[{"batch": 1, "model_ms": {"p50": 3.0}}])
    art = ArtifactRow("int8", map={"map50_95": 0.49}, delta_ap=-1.0, parity={"finite": False, "cosine": 0.98},
                      latency=[{"batch": 1, "model_ms": {"p50": 2.0}}])
    gates, failures = apply_gates([ref, art], Gates(max_map_drop=1.0, max_latency_ms=1.5, min_parity_cos=0.99))
    assert [(g.gate, g.passed) for g in gates] == [("max-map-drop", True), ("max-latency-ms", False),
                                                   ("min-parity-cos", False)]
    assert failures[0] == "int8 produced NaN/Inf outputs" and "median 2.00 ms at batch 1" in failures[1]


def test_cli_exit_codes(tmp_path, artifacts, capsys):
    args = [str(CKPT), str(artifacts["raw"]), "--data", str(JSON), "-o", str(tmp_path / "r"), "--img", "160", "160",
            "--runs", "1", "--warmup", "0", "--max-images", "6", "--parity-images", "2", "--threads", "1",
            "--no-progress"]
    with pytest.raises(SystemExit) as ok:
        bench_main(args + ["--max-map-drop", "0.5"])
    assert ok.value.code in (0, None) and "gates passed: max-map-drop" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        bench_main(args + ["--max-latency-ms", "0.001"])
    err = capsys.readouterr().err.strip()
    assert bad.value.code == 3 and err.startswith("error: gate failed: max-latency-ms 0.001") and "\n" not in err
    with pytest.raises(SystemExit) as usage:
        bench_main(args[:2] + ["--data", str(tmp_path / "nope.json")])
    assert usage.value.code == 2 and "dataset not found" in capsys.readouterr().err


def test_export_check_writes_report_and_applies_gates(tmp_path, monkeypatch):
    import exporter.check.harness as harness

    small = {k: v for k, v in SMALL.items() if k != "batches"}
    monkeypatch.setattr(harness, "CHECK_SETTINGS", small | {"runs": 1, "warmup": 0, "max_images": 6})
    import exporter.loading as loading

    loads = []
    monkeypatch.setattr(loading, "load_checkpoint", lambda path, _load=loading.load_checkpoint: loads.append(path)
                        or _load(path))
    opts = ExportOptions(checkpoint=CKPT, out_dir=tmp_path / "out", imgsz=(160, 160),
                         check=CheckOptions(enabled=True, data=JSON, max_map_drop=0.5))
    check = export(opts).reports["check"]
    assert check["passed"] and (tmp_path / "out" / "check" / "report.md").is_file()
    assert len(loads) == 1, "--check reuses the model the export loaded and fused (the PyTorch reference)"
    assert [a["name"] for a in check["artifacts"]] == ["yolov7-tiny-shapes.pt", "yolov7-tiny-shapes.onnx"]
    opts.check.max_map_drop, opts.check.max_latency_ms = None, 0.0001
    with pytest.raises(GateFailure, match="max-latency-ms"):
        export(opts)
    assert json.loads((tmp_path / "out" / "check" / "report.json").read_text())["passed"] is False


def test_rows_are_typed_and_report_json_keeps_its_layout():
    """Rows are ArtifactRow in memory; report.json holds the dicts it always held (keys only some rows carry
    are left out when unset), and a saved row reads back into the same ArtifactRow (re-rendering)."""
    from exporter.check.rows import KeypointSection, report_json

    ref = ArtifactRow("pt", kind="pytorch", reference=True, map={"map50_95": 0.5}, seconds=1.0, mem_kind="cpu")
    pose = ArtifactRow("m.onnx", map={"map50_95": 0.4}, delta_ap=-10.0, delta_basis="PyTorch",
                       reference_map50_95=0.5, keypoints=KeypointSection(ap={"ap50_95": 0.3}))
    skipped = ArtifactRow("m.engine", kind="tensorrt", skipped="no GPU")
    saved = json.loads(json.dumps(report_json({"artifacts": [ref, pose, skipped]})))["artifacts"]
    assert list(saved[0])[:16] == ["name", "path", "kind", "runtime", "precision", "nms", "batch", "size_mb",
                                   "sha256", "reference", "skipped", "map", "delta_ap", "parity", "latency",
                                   "peak_mem_mb"]
    assert "delta_basis" not in saved[0] and saved[0]["seconds"] == 1.0 and "keypoints" not in saved[0]
    assert saved[1]["keypoints"] == {"ap": {"ap50_95": 0.3}, "parity": None} and saved[1]["delta_basis"] == "PyTorch"
    assert "seconds" not in saved[2] and "mem_kind" not in saved[2] and saved[2]["latency"] == []
    assert [ArtifactRow.from_json(r) for r in saved] == [ref, pose, skipped]
