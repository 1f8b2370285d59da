"""Instance-segmentation head of the official ``u7`` branch (``seg/``): ISegment + Proto (YOLACT style).

Per anchor the head predicts the detection values (box, objectness, class probabilities) plus ``nm`` raw
mask coefficients; ``Proto`` turns the finest feature map into ``nm`` prototype masks at 1/4 of the input
size. A mask is ``sigmoid(coef @ protos)`` cropped to its box (exporter/nms_masks.py puts that in the graph).

Decisions, following the official eval forward (``ISegment.forward`` = Proto + ``IDetect.forward`` of u7):

* ImplicitA is applied before each head conv, ImplicitM is **not** (u7's ``IDetect.forward`` never calls it;
  its parameters are in the checkpoint with a shape that does not even fit the seg conv). We keep ``im`` only
  so the state dict loads strictly, and never fold it.
* The detection columns are decoded by ``heads.Detect.decode`` itself: ``self.no`` stays the *detection*
  width 5+nc, the conv's extra nm channels per anchor are split off first. So the grid and anchor maths
  (and any change to them, e.g. grids taken from the feature-map shape) are shared with detection.
  u7's grid holds the -0.5 (``(2s + (g - 0.5)) * stride``); Detect computes ``(2s - 0.5 + g) * stride``:
  the same value up to float rounding. Anchors are the pickled ``anchors`` buffer x stride (checkpoint.py).
* Mask coefficients stay raw (no sigmoid), as in the official output.
* ``fold_implicit()`` folds ImplicitA into the conv bias (exact: m(x + a) = W x + (b + W a)).
"""
from __future__ import annotations

import torch
from torch import nn

from . import heads, modules


class Proto(nn.Module):
    """Prototype branch: Conv3x3 -> 2x nearest upsample -> Conv3x3 -> Conv1x1 (each Conv+BN+SiLU).

    The last layer is a full Conv (BN + SiLU), so prototypes are >= -0.2785 (SiLU's minimum).
    """

    def __init__(self, c1: int, c_: int = 256, c2: int = 32, bn_eps: float = 1e-3):
        super().__init__()
        self.cv1 = modules.Conv(c1, c_, 3, bn_eps=bn_eps)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.cv2 = modules.Conv(c_, c_, 3, bn_eps=bn_eps)
        self.cv3 = modules.Conv(c_, c2, 1, bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


class ISegment(heads.Detect):
    """Detect + nm raw mask coefficients per anchor + a Proto branch on the first head input.

    ``forward`` returns ``(output [B,N,5+nc+nm], protos [B,nm,H/4,W/4])``, the official eval's
    ``(pred, proto)`` (``Detect.export=True`` form).
    """

    task = "segment"

    def __init__(self, nc: int, anchors_px: list, nm: int, npr: int, ch: list[int], stride: list[float],
                 bn_eps: float = 1e-3):
        super().__init__(nc, anchors_px, ch, stride)
        self.nm, self.npr = int(nm), int(npr)
        width = self.no + self.nm
        self.m = nn.ModuleList(nn.Conv2d(c, width * self.na, 1) for c in ch[: self.nl])
        self.ia: nn.ModuleList | None = nn.ModuleList(heads.ImplicitA(c) for c in ch[: self.nl])
        # dead in the official forward; kept so the checkpoint's tensors load by name (never applied)
        self.im: nn.ModuleList | None = nn.ModuleList(heads.ImplicitM(self.no * self.na) for _ in ch[: self.nl])
        self.proto = Proto(ch[0], self.npr, self.nm, bn_eps=bn_eps)
        # anchors come from the checkpoint's `anchors` buffer (seg pickles have no anchor_grid buffer)
        anchor_grid = self.anchor_grid
        del self._buffers["anchor_grid"]
        self.register_buffer("anchor_grid", anchor_grid, persistent=False)

    @property
    def n_out(self) -> int:
        """Values per row of the raw output: 5 + nc + nm."""
        return self.no + self.nm

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.m[i](x if self.ia is None else self.ia[i](x))

    def decode(self, i: int, raw: torch.Tensor) -> torch.Tensor:
        bs, _, ny, nx = raw.shape
        r = raw.view(bs, self.na, self.n_out, ny, nx)
        det = super().decode(i, r[:, :, : self.no].reshape(bs, self.na * self.no, ny, nx))
        coef = r[:, :, self.no:].permute(0, 1, 3, 4, 2).reshape(bs, -1, self.nm)
        return torch.cat((det, coef), -1)

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        protos = self.proto(xs[0])
        return torch.cat([self.decode(i, self.level(i, xs[i])) for i in range(self.nl)], 1), protos

    def raw_outputs(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for i in range(self.nl):
            r = self.level(i, xs[i])
            bs, _, ny, nx = r.shape
            outs.append(r.view(bs, self.na, self.n_out, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        return outs

    @torch.no_grad()
    def fold_implicit(self) -> bool:
        """Fold ImplicitA into the conv biases and drop both implicit lists; True if anything was folded."""
        if self.ia is None:
            return False
        for conv, ia in zip(self.m, self.ia):
            w = conv.weight.double().flatten(1)
            conv.bias.copy_((conv.bias.double() + w @ ia.implicit.double().flatten()).float())
        self.ia = None
        self.im = None
        return True
