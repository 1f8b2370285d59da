"""Triton model repository: config.pbtxt parsed back and checked against the artifact's real IO.

Two readers: a small protobuf-text parser of our own (always), and, where tritonclient is installed, Triton's
own ``inference.ModelConfig`` message (strict: unknown fields or wrong enum names fail to parse).
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter.errors import UserError
from exporter.options import ExportOptions, NmsOptions
from exporter.pipeline import run
from exporter.triton import write_triton_repository
from runtimes.contract import ModelInfo

CKPT = Path(__file__).parent / "data" / "yolov7-tiny-shapes.pt"
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 6: "TYPE_INT32", 7: "TYPE_INT64"}

_TOKEN = re.compile(r'\s*(?:#[^\n]*\n\s*)*("(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+)')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> dict; every field maps to a list of values (repeated or not)."""
    tokens = [m.group(1) for m in _TOKEN.finditer(text)]
    pos = 0

    def scalar(tok):
        if tok.startswith('"'):
            return json.loads(tok)
        try:
            return int(tok)
        except ValueError:
            return tok  # enum name

    def message(end):
        nonlocal pos
        out: dict = {}
        while tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            out.setdefault(key, []).extend(value())
            if tokens[pos] == ",":
                pos += 1
        pos += 1
        return out

    def value():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return [message("}")]
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items += value()
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        return [scalar(tok)]

    tokens.append("<eof>")
    return message("<eof>")


def triton_model_config():
    """Triton's ModelConfig message from tritonclient's generated module, without importing grpc."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.ModelConfig


def check_against_onnx(folder: Path, onnx_path: Path, expect_batch: int | None) -> dict:
    cfg = parse_pbtxt((folder / "config.pbtxt").read_text())
    assert cfg["platform"] == ["onnxruntime_onnx"] and cfg["name"] == [folder.name]
    assert (folder / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    max_batch = cfg["max_batch_size"][0]
    graph = onnx.load(str(onnx_path)).graph
    for section, values in (("input", graph.input), ("output", graph.output)):
        real = {v.name: v.type.tensor_type for v in values}
        written = {t["name"][0]: t for t in cfg[section]}
        assert set(written) == set(real), section
        for name, tt in real.items():
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            assert written[name]["data_type"] == [ONNX_TO_TRITON[tt.elem_type]]
            if expect_batch is None:  # dynamic batch: Triton's batch dim is implicit
                assert dims[0] == -1 and written[name]["dims"] == dims[1:]
            else:
                assert written[name]["dims"] == dims and dims[0] == expect_batch
    if expect_batch is None:
        assert max_batch > 0 and "dynamic_batching" in cfg
    else:
        assert max_batch == 0 and "dynamic_batching" not in cfg
    params = {p["key"][0]: json.loads(p["value"][0]["string_value"][0]) for p in cfg["parameters"]}
    assert params["yolo7_export.names"] == ["circle", "square", "triangle", "star", "cross"]
    model_config = triton_model_config()
    if model_config is not None:
        from google.protobuf import text_format

        msg = text_format.Parse((folder / "config.pbtxt").read_text(), model_config())
        assert msg.max_batch_size == max_batch and [i.name for i in msg.input] == ["images"]
    return cfg


@pytest.mark.parametrize("nms,dynamic", [("none", False), ("none", True), ("onnx", False), ("onnx", True)])
def test_repository_matches_the_onnx_io(tmp_path, nms, dynamic):
    opts = ExportOptions(checkpoint=CKPT, out_dir=tmp_path / "out", imgsz=(160, 160), batch=2,
                         dynamic_batch=dynamic, nms=NmsOptions(mode=nms, topk=50), triton=tmp_path / "repo")
    result = run(opts)
    folder = tmp_path / "repo" / "yolov7-tiny-shapes_onnx"
    cfg = check_against_onnx(folder, result.onnx_path, None if dynamic else 2)
    outputs = [t["name"][0] for t in cfg["output"]]
    assert outputs == (["output"] if nms == "none" else  # the onnx tail also reports det_indices (contract.py)
                       ["num_dets", "det_boxes", "det_scores", "det_classes", "det_indices"])
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["triton_repository"] == str(folder)


def _fake_engine(tmp_path: Path, dynamic: bool, profile_max: int = 16) -> tuple[Path, ModelInfo]:
    info = ModelInfo(names=["a", "b"], stride=[8, 16, 32], imgsz=(320, 320), nms="efficient", batch=None)
    engine = tmp_path / "m.fp16.engine"
    engine.write_bytes(np.random.default_rng(0).bytes(64))
    b = -1 if dynamic else 4
    io = [{"name": "images", "mode": "input", "shape": [b, 3, 320, 320], "dtype": "FLOAT"},
          {"name": "num_dets", "mode": "output", "shape": [b, 1], "dtype": "INT32"},
          {"name": "det_boxes", "mode": "output", "shape": [b, 100, 4], "dtype": "FLOAT"},
          {"name": "det_scores", "mode": "output", "shape": [b, 100], "dtype": "HALF"},
          {"name": "det_classes", "mode": "output", "shape": [b, 100], "dtype": "INT32"}]
    profile = {"input_name": "images", "min": [1, 3, 320, 320], "opt": [1, 3, 320, 320],
               "max": [profile_max, 3, 320, 320]} if dynamic else None
    (tmp_path / "m.fp16.engine.json").write_text(json.dumps({"io": io, "build": {"profile": profile}}))
    return engine, info


@pytest.mark.parametrize("dynamic", [False, True])
def test_engine_repository_from_the_build_sidecar(tmp_path, dynamic):
    engine, info = _fake_engine(tmp_path, dynamic)
    folder = write_triton_repository(tmp_path / "repo", engine, info)
    assert folder.name == "m_fp16_trt" and (folder / "1" / "model.plan").read_bytes() == engine.read_bytes()
    cfg = parse_pbtxt((folder / "config.pbtxt").read_text())
    assert cfg["platform"] == ["tensorrt_plan"] and cfg["instance_group"][0]["kind"] == ["KIND_GPU"]
    assert cfg["max_batch_size"] == [16 if dynamic else 0]
    out = {t["name"][0]: (t["data_type"][0], t["dims"]) for t in cfg["output"]}
    lead = [] if dynamic else [4]
    assert out["det_scores"] == ("TYPE_FP16", lead + [100]) and out["num_dets"] == ("TYPE_INT32", lead + [1])
    if triton_model_config() is not None:
        from google.protobuf import text_format

        text_format.Parse((folder / "config.pbtxt").read_text(), triton_model_config()())
    if dynamic:
        with pytest.raises(UserError, match="exceeds the engine's profile max batch 16"):
            write_triton_repository(tmp_path / "repo", engine, info, max_batch_size=64)


def test_errors(tmp_path):
    engine, info = _fake_engine(tmp_path, True)
    (tmp_path / "m.fp16.engine.json").unlink()
    with pytest.raises(UserError, match="m.fp16.engine.json .* missing or unreadable"):
        write_triton_repository(tmp_path / "repo", engine, info)
    fake = tmp_path / "x.onnx"
    fake.write_bytes(b"")
    with pytest.raises(UserError, match="EfficientNMS_TRT, which Triton's onnxruntime backend cannot run"):
        write_triton_repository(tmp_path / "repo", fake, info)
    with pytest.raises(UserError, match="don't know how to serve 'x.txt'"):
        write_triton_repository(tmp_path / "repo", tmp_path / "x.txt", info)


def test_own_parser_reads_nested_text_format():
    cfg = parse_pbtxt('name: "a" # comment\nmax_batch_size: 8\ninput [ { name: "x" dims: [ 3, -1 ] } ]\n'
                      'dynamic_batching { }\nparameters { key: "k" value { string_value: "{\\"a\\": 1}" } }')
    assert cfg["name"] == ["a"] and cfg["input"][0]["dims"] == [3, -1] and cfg["dynamic_batching"] == [{}]
    assert json.loads(cfg["parameters"][0]["value"][0]["string_value"][0]) == {"a": 1}
