"""Stage 2: fold the training-time structure away so the exported graph is the deploy graph.

* Conv + BatchNorm -> one conv with bias;
* RepConv's 3x3, 1x1 and identity branches -> one 3x3 conv;
* ImplicitA / ImplicitM -> folded into the head convs (IDetect/IAuxDetect become Detect); the seg head
  (ISegment) folds ImplicitA only, because its official forward never applies ImplicitM; the pose head
  (IKeypoint) folds both into its detection conv (its keypoint branch has none);
* P6 IAuxDetect: the auxiliary heads and every layer that only fed them are removed.

The result computes the same function as the unfused model (up to float rounding; see tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import heads, heads_keypoint, heads_segment, modules
from .model import YoloModel, _Pruned


@dataclass
class FuseReport:
    conv_bn: int = 0
    repconv: int = 0
    implicit_heads: int = 0
    aux_layers_removed: int = 0


def _needed_layers(model: YoloModel, head_inputs: list[int]) -> set[int]:
    """Indices of layers that the given head inputs depend on."""
    needed: set[int] = set()
    stack = list(head_inputs)
    while stack:
        i = stack.pop()
        if i < 0 or i in needed:  # i < 0: the network input
            continue
        needed.add(i)
        f = model.model[i].f
        for j in ([f] if isinstance(f, int) else f):
            stack.append(i + j if j < 0 else j)  # negative 'from' is relative to the layer
    return needed


@torch.no_grad()
def fuse_model(model: YoloModel) -> FuseReport:
    """Fuse in place; idempotent."""
    report = FuseReport()
    head = model.head
    n = len(model.model)
    if isinstance(head, heads.IAuxDetect):
        lead = ([head.f] if isinstance(head.f, int) else list(head.f))[: head.nl]
        lead_abs = [n - 1 + j if j < 0 else j for j in lead]
        needed = _needed_layers(model, lead_abs)
        for i in range(n - 1):
            if i not in needed and not isinstance(model.model[i], _Pruned):
                old = model.model[i]
                stub = _Pruned()
                stub.i, stub.f, stub.type = old.i, old.f, old.type
                model.model[i] = stub
                report.aux_layers_removed += 1
        head.f = lead
    if isinstance(head, heads.IDetect):  # IAuxDetect is an IDetect too
        new_head = head.to_detect()
        new_head.i, new_head.f, new_head.type = head.i, head.f, "Detect"
        model.model[-1] = new_head
        report.implicit_heads += 1
    if isinstance(head, heads_segment.ISegment) and head.fold_implicit():  # ImplicitA only (see heads_segment)
        report.implicit_heads += 1
    if isinstance(head, heads_keypoint.IKeypoint) and head.fold_implicit():  # det conv only; the official fuse
        report.implicit_heads += 1                                          # leaves them (heads_keypoint)
    for module in model.modules():
        if isinstance(module, modules.Conv) and isinstance(module.bn, nn.BatchNorm2d):
            module.fuse()
            report.conv_bn += 1
        elif isinstance(module, modules.RepConv) and module.rbr_reparam is None:
            module.fuse()
            report.repconv += 1
    model.fused = True
    return report
