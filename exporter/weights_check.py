"""Sanity of the numbers in a checkpoint: refuse weights that would export "successfully" into garbage.

A fuzzing campaign found 83 of 407 corrupted checkpoints exporting with exit 0: NaN/Inf weights (most gave
all-NaN outputs), negative BatchNorm variance (sqrt of a negative number after fusion), a negative or zero
stride (every box [0, 0, 0, 0]) and a ``names`` list whose length differs from ``nc`` (wrong metadata).
Each check names the tensor or field, so the user sees *what* is damaged in one line. The checks take plain
values (the flat state dict, strides, anchors), not the checkpoint, so any loader can call them.
"""
from __future__ import annotations

import math

import torch

from .errors import UserError

MAX_STRIDE = 1024


def check_weights(state: dict[str, torch.Tensor], *, nc: int, names: list[str], stride: list[float],
                  anchors_px: torch.Tensor, source: str) -> None:
    """Raise :class:`UserError` (one line) for non-finite weights or impossible values."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"corrupt checkpoint: {source}: tensor {key} holds {bad} NaN/Inf value(s) "
                            f"of {tensor.numel()}")
        if key.endswith("running_var") and tensor.numel() and float(tensor.min()) < 0:
            raise UserError(f"corrupt checkpoint: {source}: BatchNorm variance {key} is negative "
                            f"(min {float(tensor.min()):.4g})")
    for i, s in enumerate(stride):
        if not (math.isfinite(s) and s == int(s) and 2 <= s <= MAX_STRIDE and int(s) & (int(s) - 1) == 0):
            raise UserError(f"corrupt checkpoint: {source}: Detect stride[{i}] is {s:g}; strides are powers of "
                            f"two in 2..{MAX_STRIDE} (official: 8, 16, 32, 64)")
    if not bool(torch.isfinite(anchors_px).all()) or float(anchors_px.min()) <= 0:
        raise UserError(f"corrupt checkpoint: {source}: Detect anchors must be finite and positive")
    if len(names) != nc:
        raise UserError(f"corrupt checkpoint: {source}: {len(names)} class names for nc={nc} classes "
                        "(the checkpoint's 'names' and its yaml's 'nc' disagree)")
