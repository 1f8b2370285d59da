"""Stage 3a: the fused model -> a simplified, deterministic ONNX with our IO contract and metadata.

Exporter choice: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), on purpose.
* It writes one self-contained protobuf; dynamo writes weights as external data by default, which breaks
  "one file, one sha256" artifacts and TensorRT's file-based parsing of a moved file.
* Its graph for the same module, input shape and flags is byte-stable run to run (tested); that is the
  basis of the byte-identical-ONNX promise.
* dynamo silently drops ``autograd.Function.symbolic`` ops; we don't rely on them (the NMS tails are added
  by graph surgery in nms_tail.py), but a future custom op would vanish without an error.
The decode (sigmoid, grid, anchors) is traced as plain tensor math so every runtime executes it.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import onnx
import torch

from runtimes.contract import INPUT_NAME, RAW_OUTPUT, ModelInfo

from .errors import UserError
from .model import YoloModel

DEFAULT_OPSET = 17
MIN_OPSET = 11  # Resize semantics and NonMaxSuppression both need >= 11


@dataclass
class ExportConfig:
    imgsz: tuple[int, int]
    batch: int = 1
    dynamic_batch: bool = False
    opset: int = DEFAULT_OPSET
    simplify: bool = True


def check_image_size(imgsz: tuple[int, int], max_stride: int) -> tuple[int, int]:
    """Each side must be a positive multiple of the largest stride; say the nearest valid sizes if not."""
    for side in imgsz:
        if side <= 0 or side % max_stride:
            lower = max(max_stride, side // max_stride * max_stride)
            upper = (side // max_stride + 1) * max_stride
            options = f"{lower} or {upper}" if lower != upper and side > 0 else f"{upper}"
            raise UserError(f"image size {side} is not a multiple of the model's max stride {max_stride}; "
                            f"nearest valid sizes: {options}")
    return int(imgsz[0]), int(imgsz[1])


def export_onnx(model: YoloModel, info: ModelInfo, cfg: ExportConfig) -> onnx.ModelProto:
    """Trace the (fused) model to ONNX in memory, simplify, attach metadata."""
    if cfg.opset < MIN_OPSET:
        raise UserError(f"--opset {cfg.opset} is too old; use {MIN_OPSET} or newer (default {DEFAULT_OPSET})")
    if cfg.batch < 1:
        raise UserError(f"--batch must be >= 1 (got {cfg.batch})")
    h, w = cfg.imgsz
    dummy = torch.zeros(cfg.batch, 3, h, w)
    buf = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: "batch"}, RAW_OUTPUT: {0: "batch"}} if cfg.dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python ints in the decode are expected
        torch.onnx.export(model.eval(), (dummy,), buf, dynamo=False, opset_version=cfg.opset,
                          input_names=[INPUT_NAME], output_names=[RAW_OUTPUT], dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    if cfg.simplify:
        proto = simplify(proto)
    return finalize(proto, info)


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold and clean the graph with onnxslim (pure Python, deterministic)."""
    import onnxslim

    return onnxslim.slim(proto)


def finalize(proto: onnx.ModelProto, info: ModelInfo) -> onnx.ModelProto:
    """Fixed producer fields and sorted metadata, so equal inputs give equal bytes; then validate."""
    from . import __version__

    proto.producer_name = "yolo7-export"
    proto.producer_version = __version__
    proto.doc_string = ""
    proto.graph.doc_string = ""
    del proto.metadata_props[:]
    for key, value in sorted(info.to_metadata().items()):
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    return proto


def copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Carry our metadata over to a graph rebuilt by another tool (AutoCast, quantize_static and
    onnx-graphsurgeon all drop it); runtimes read the artifact's ModelInfo from it."""
    del dst.metadata_props[:]
    for prop in src.metadata_props:
        dst.metadata_props.add(key=prop.key, value=prop.value)


def read_info(proto: onnx.ModelProto) -> ModelInfo:
    """Our metadata from an ONNX; a clear error for a foreign ONNX."""
    try:
        return ModelInfo.from_metadata({p.key: p.value for p in proto.metadata_props})
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError("this ONNX was not made by yolo7-export (no yolo7_export.* metadata); "
                        "export it from the checkpoint with yolo7-export") from exc
