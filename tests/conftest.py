"""Shared test data locations. Tests never read ../shared: everything they need is in tests/data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
OFFICIAL = DATA / "official"
TRAINED = DATA / "yolov7-tiny-shapes.pt"
SHAPES = DATA / "shapes"
OFFICIAL_NAMES = sorted(p.stem for p in OFFICIAL.glob("*.pt"))


def official_reference(name: str) -> dict:
    """The official code's outputs for a fixture: input image, unfused/fused outputs, NMS result, meta."""
    with np.load(OFFICIAL / f"{name}.npz") as d:
        ref = {k: d[k] for k in d.files}
    ref["meta"] = json.loads(str(ref["meta"]))
    ref["input"] = ref["image_u8"].astype(np.float32) / 255.0
    return ref


@pytest.fixture(scope="session")
def trained_ckpt() -> Path:
    return TRAINED


@pytest.fixture(scope="session")
def shapes_dir() -> Path:
    return SHAPES


@pytest.fixture(scope="session")
def trained_fp32_onnx(trained_ckpt):
    """The trained example exported to an in-memory FP32 ONNX at 320x320, and its ModelInfo."""
    from exporter.onnx_export import ExportConfig, export_onnx
    from exporter.pipeline import load_fused
    from runtimes.contract import ModelInfo

    imgsz = (320, 320)
    ckpt, model = load_fused(trained_ckpt)
    info = ModelInfo(names=ckpt.names, stride=ckpt.stride, imgsz=imgsz)
    return export_onnx(model, info, ExportConfig(imgsz=imgsz)), info


def pytest_terminal_summary(terminalreporter):
    """Say how many real engines TensorRT-RTX built in this run (tests/rtx_util.py counts them)."""
    import sys

    rtx_util = sys.modules.get("rtx_util")
    if rtx_util is not None and rtx_util.BUILT:
        terminalreporter.write_line(f"TensorRT-RTX engines built in this run: {len(rtx_util.BUILT)}")
