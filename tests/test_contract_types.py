"""Typed contracts: one spelling per option value, and metadata values outside the contract are refused."""
from __future__ import annotations

import pytest
from onnx import ModelProto

from exporter.cli import export_command
from exporter.errors import UserError
from exporter.options import TrtOptions
from runtimes.contract import HARDWARE_COMPAT, NMS_MODES, PRECISIONS, TASKS, ModelInfo
from runtimes.metadata import read_info, write_metadata


def _proto(**changes) -> ModelProto:
    proto = ModelProto()
    write_metadata(proto, ModelInfo(names=["a"], stride=[8.0, 16.0, 32.0], imgsz=(64, 64)))
    for prop in proto.metadata_props:
        key = prop.key.split(".", 1)[1]
        if key in changes:
            prop.value = f'"{changes[key]}"'
    return proto


def test_metadata_round_trip_and_refusals():
    assert read_info(_proto()).nms == "none"
    for field, bad in (("nms", "fancy"), ("precision", "fp8"), ("task", "classify")):
        with pytest.raises(ValueError, match=bad):
            ModelInfo.from_metadata({p.key: p.value for p in _proto(**{field: bad}).metadata_props})
        with pytest.raises(UserError, match=f"unreadable yolo7-export metadata.*{bad}"):
            read_info(_proto(**{field: bad}))
    with pytest.raises(UserError, match="not made by yolo7-export"):
        read_info(ModelProto())


def test_one_spelling_per_value():
    assert TrtOptions().hardware_compat == "none" and "none" in HARDWARE_COMPAT
    params = {p.name: p for p in export_command.params}
    assert tuple(params["hardware_compat"].type.choices) == HARDWARE_COMPAT
    assert tuple(params["nms"].type.choices) == ("auto", *NMS_MODES)
    assert {"fp32", "fp16", "int8"} == set(PRECISIONS) and "detect" in TASKS
