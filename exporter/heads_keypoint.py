"""The YOLOv7-pose head (official ``models.yolo.IKeypoint``, branch ``pose``), our own implementation.

Per level: a detection conv ``m`` (ImplicitA before, ImplicitM after; na*(5+nc) channels) and a keypoint
head ``m_kpt`` (na*3*nkpt channels, no implicit layers) read the same feature. Their outputs are
concatenated and *then* viewed as (na, 5+nc+3*nkpt): anchor a takes channels ``no*a .. no*a+no-1`` of the
concatenation, so anchors 1.. take box/score channels from the keypoint head (trap 1 of the fixtures'
README). We keep that layout exactly; re-slicing per anchor would silently permute the channels.

Decode (eval): box/objectness/class as in ``Detect`` (same grid and box helpers); keypoint x/y are *not*
sigmoided, ``(t*2 - 0.5 + grid) * stride``; keypoint visibility is sigmoided. Output [B, N, 5+nc+3*nkpt]
laid out like the official eval output. Unlike the official head this one accepts any nc/nkpt (the
official forward hard-codes nc == 1 and 17 keypoints).

``fold_implicit()`` folds ImplicitA/ImplicitM into the detection conv (the official ``fuse()`` leaves them;
folding is exact up to float rounding, see tests/test_pose_export.py).
"""
from __future__ import annotations

import torch
from torch import nn

from . import modules
from .heads import Detect, ImplicitA, ImplicitM

DW_KPT_BLOCKS = 6  # dw keypoint head: 6 x (DWConv 3x3 [, Conv 1x1]) then the output conv


def keypoint_branch(c: int, out: int, dw: bool, bn_eps: float) -> nn.Module:
    """The official ``m_kpt`` of one level: a 1x1 conv, or the depth-wise stack (``dw_conv_kpt: True``)."""
    if not dw:
        return nn.Conv2d(c, out, 1)
    layers: list[nn.Module] = []
    for k in range(DW_KPT_BLOCKS):
        layers.append(modules.Conv(c, c, 3, g=c, bn_eps=bn_eps))  # DWConv: groups = channels
        if k < DW_KPT_BLOCKS - 1:
            layers.append(modules.Conv(c, c, 1, bn_eps=bn_eps))
    layers.append(nn.Conv2d(c, out, 1))
    return nn.Sequential(*layers)


class IKeypoint(Detect):
    """Detection + keypoints; ``no = 5 + nc + 3*nkpt`` values per anchor."""

    def __init__(self, nc: int, anchors_px: list, ch: list[int], stride: list[float], nkpt: int = 17,
                 dw_conv_kpt: bool = False, bn_eps: float = 1e-3):
        super().__init__(nc, anchors_px, ch, stride)
        self.nkpt, self.dw_conv_kpt = int(nkpt), bool(dw_conv_kpt)
        self.no_det, self.no_kpt = nc + 5, 3 * self.nkpt
        self.no = self.no_det + self.no_kpt
        self.m = nn.ModuleList(nn.Conv2d(c, self.no_det * self.na, 1) for c in ch[: self.nl])
        self.ia = nn.ModuleList(ImplicitA(c) for c in ch[: self.nl])
        self.im = nn.ModuleList(ImplicitM(self.no_det * self.na) for _ in ch[: self.nl])
        self.m_kpt = nn.ModuleList(keypoint_branch(c, self.no_kpt * self.na, self.dw_conv_kpt, bn_eps)
                                   for c in ch[: self.nl])
        self.implicit_folded = False

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Raw [B, na*no, ny, nx]: det conv (with its implicit ops unless folded) ++ keypoint head."""
        det = self.m[i](x) if self.implicit_folded else self.im[i](self.m[i](self.ia[i](x)))
        return torch.cat((det, self.m_kpt[i](x)), 1)

    def decode(self, i: int, raw: torch.Tensor) -> torch.Tensor:
        bs, _, ny, nx = raw.shape
        p = raw.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2)  # [B,na,ny,nx,no]
        det = p[..., : self.no_det].sigmoid()
        grid = self.make_grid(raw)
        xy, wh = self.decode_boxes(i, det, grid)
        kpt = p[..., self.no_det:].reshape(bs, self.na, ny, nx, self.nkpt, 3)
        stride = float(self.stride[i])
        kxy = (kpt[..., 0:2] * 2.0 - 0.5 + grid.unsqueeze(-2)) * stride  # raw, not sigmoided (trap 2)
        kconf = kpt[..., 2:3].sigmoid()
        kpts = torch.cat((kxy, kconf), -1).reshape(bs, self.na, ny, nx, self.no_kpt)
        return torch.cat((xy, wh, det[..., 4:], kpts), -1).reshape(bs, -1, self.no)

    @torch.no_grad()
    def fold_implicit(self) -> bool:
        """m(x + a) * s == (s*W) x + s*(b + W a): ImplicitA/M into the det conv; the keypoint head has none.
        Returns False when already folded (idempotent)."""
        if self.implicit_folded:
            return False
        for i, conv in enumerate(self.m):
            w = conv.weight.double()
            a = self.ia[i].implicit.double().flatten()
            s = self.im[i].implicit.double().flatten()
            bias = (conv.bias.double() + w.flatten(1) @ a) * s
            conv.weight.copy_((w * s.view(-1, 1, 1, 1)).float())
            conv.bias.copy_(bias.float())
        del self.ia, self.im
        self.implicit_folded = True
        return True
