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

from runtimes.contract import INPUT_NAME, PROTO_OUTPUT, RAW_OUTPUT, ModelInfo
from runtimes.metadata import copy_metadata, read_info, write_metadata  # noqa: F401 - read_info/copy_metadata re-exported

from .errors import UserError
from .loading import check_image_size  # noqa: F401 - re-exported (the model layer owns it)
from .model import YoloModel

DEFAULT_OPSET = 17
MIN_OPSET = 11  # Resize semantics and NonMaxSuppression both need >= 11


@dataclass
class ExportConfig:
    imgsz: tuple[int, int]
    batch: int = 1
    dynamic_batch: bool = False
    dynamic_size: bool = False  # --dynamic: height and width too (the head's grids come from the feature maps)
    opset: int = DEFAULT_OPSET
    simplify: bool = True



def resolve_dynamic_sizes(imgsz: tuple[int, int], min_imgsz: tuple[int, int] | None,
                          max_imgsz: tuple[int, int] | None, max_stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(min, max) (H, W) of a --dynamic export's size range; ``imgsz`` (--img) is the optimum in between.

    Defaults: min = half of --img rounded up to a stride multiple (letterboxing a 2:1 image to --img gives
    that), max = --img (runtimes letterbox into --img, so larger inputs only come from explicit callers).
    Each must be a multiple of the max stride: the feature maps of every level must have whole cells.
    """
    def half(side: int) -> int:
        return max(max_stride, -(-side // 2 // max_stride) * max_stride)

    lo = check_image_size(min_imgsz, max_stride) if min_imgsz else (half(imgsz[0]), half(imgsz[1]))
    hi = check_image_size(max_imgsz, max_stride) if max_imgsz else tuple(imgsz)
    if not all(a <= o <= b for a, o, b in zip(lo, imgsz, hi)):
        raise UserError(f"--dynamic needs --min-img {lo[0]}x{lo[1]} <= --img {imgsz[0]}x{imgsz[1]} <= "
                        f"--max-img {hi[0]}x{hi[1]} (H x W, each side)")
    return (int(lo[0]), int(lo[1])), (int(hi[0]), int(hi[1]))


def export_onnx(model: YoloModel, info: ModelInfo, cfg: ExportConfig) -> onnx.ModelProto:
    """Trace the (fused) model to ONNX in memory, simplify, attach metadata."""
    if cfg.opset < MIN_OPSET:
        raise UserError(f"--opset {cfg.opset} is too old; use {MIN_OPSET} or newer (default {DEFAULT_OPSET})")
    if cfg.batch < 1:
        raise UserError(f"--batch must be >= 1 (got {cfg.batch})")
    h, w = cfg.imgsz
    dummy = torch.zeros(cfg.batch, 3, h, w)
    buf = io.BytesIO()
    outputs = [RAW_OUTPUT, PROTO_OUTPUT] if info.task == "segment" else [RAW_OUTPUT]  # seg: + prototypes
    dynamic_axes = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]} if cfg.dynamic_batch else None
    if cfg.dynamic_size:  # batch, H, W; the raw output's anchor count and the prototypes' H/W follow them
        dynamic_axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, RAW_OUTPUT: {0: "batch", 1: "anchors"},
                        PROTO_OUTPUT: {0: "batch", 2: "proto_height", 3: "proto_width"}}
        dynamic_axes = {k: v for k, v in dynamic_axes.items() if k in (INPUT_NAME, *outputs)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python ints in the decode are expected
        torch.onnx.export(model.eval(), (dummy,), buf, dynamo=False, opset_version=cfg.opset,
                          input_names=[INPUT_NAME], output_names=outputs, dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    if cfg.simplify:
        proto = simplify(proto)
    if cfg.dynamic_batch and not cfg.dynamic_size:
        pin_output_dims(proto, model, dummy)
    return finalize(proto, info)


def pin_output_dims(proto: onnx.ModelProto, model: YoloModel, dummy: torch.Tensor) -> None:
    """--dynamic-batch: the tracer names every output dim after the head's ``reshape(bs, -1, no)`` symbolic
    ('Concatoutput_dim_1'), although only the batch varies. One forward pass at the export batch gives the
    real sizes, written into the graph outputs, so runtimes, Triton configs and TensorRT see [batch, N, 5+nc].
    """
    with torch.no_grad():
        outs = model.eval()(dummy)
    outs = [outs] if isinstance(outs, torch.Tensor) else [o for o in outs if isinstance(o, torch.Tensor)]
    for value, out in zip(proto.graph.output, outs):
        for dim, size in zip(list(value.type.tensor_type.shape.dim)[1:], out.shape[1:]):
            dim.Clear()
            dim.dim_value = int(size)


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
    write_metadata(proto, info)
    onnx.checker.check_model(proto)
    return proto

