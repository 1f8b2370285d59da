"""Stages 1-2 as one call, for everyone who needs a runnable model: the pipeline, the PyTorch runtime,
the check harness and the benchmarks.

Model layer: it imports only the loader, our modules and fusion, so a runtime can load a checkpoint
without importing the pipeline or any export stage.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .checkpoint import Checkpoint, load_checkpoint
from .errors import UserError
from .fuse import fuse_model
from .model import YoloModel, build_model

log = logging.getLogger("yolo7_export")


def default_imgsz(ckpt: Checkpoint) -> tuple[int, int]:
    """The official defaults: 640 for P5 models, 1280 for P6 (four detection levels)."""
    side = 1280 if len(ckpt.stride) == 4 else 640
    return side, side


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


def load_fused(checkpoint: Path) -> tuple[Checkpoint, YoloModel]:
    """Load (safely) and fuse: the deploy graph that gets exported and that every artifact is checked against."""
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt)
    report = fuse_model(model)
    log.info("fused: %d conv+bn, %d RepConv, %d implicit heads, %d aux layers removed",
             report.conv_bn, report.repconv, report.implicit_heads, report.aux_layers_removed)
    return ckpt, model
