"""Detection heads: Detect (deploy), IDetect (implicit knowledge), IAuxDetect (P6, auxiliary heads).

In eval mode every head returns the official inference tensor [B, N, 5+nc]: per level, anchors-major then
rows then columns, with decoded cx, cy, w, h in input pixels, objectness and per-class probabilities.
``fuse()`` on IDetect/IAuxDetect folds ImplicitA/ImplicitM into the 1x1 convs; the model then swaps the
head for a plain ``Detect`` (aux convs dropped).
"""
from __future__ import annotations

import torch
from torch import nn


class ImplicitA(nn.Module):
    """Learned per-channel offset added before the head conv."""

    def __init__(self, channel: int):
        super().__init__()
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit + x


class ImplicitM(nn.Module):
    """Learned per-channel scale applied after the head conv."""

    def __init__(self, channel: int):
        super().__init__()
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit * x


class Detect(nn.Module):
    """1x1 conv per level + box decode. Anchors are in input pixels (the official ``anchor_grid``)."""

    def __init__(self, nc: int, anchors_px: list, ch: list[int], stride: list[float]):
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl, self.na = len(anchors_px), len(anchors_px[0])
        self.register_buffer("anchor_grid", torch.tensor(anchors_px, dtype=torch.float32).view(self.nl, 1, self.na, 1, 1, 2))
        self.register_buffer("stride", torch.tensor(stride, dtype=torch.float32), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch[: self.nl])

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Raw head output of level i: the conv (plus implicit ops in subclasses)."""
        return self.m[i](x)

    def decode(self, i: int, raw: torch.Tensor) -> torch.Tensor:
        bs, _, ny, nx = raw.shape
        p = raw.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
        xy, wh = self.decode_boxes(i, p, self.make_grid(raw))
        return torch.cat((xy, wh, p[..., 4:]), -1).reshape(bs, -1, self.no)

    @staticmethod
    def make_grid(raw: torch.Tensor) -> torch.Tensor:
        """Cell offsets [1,1,ny,nx,2] (x, y) for a level's raw conv output [B,C,ny,nx] (shared with the
        keypoint head, which offsets keypoints by the same grid)."""
        _, _, ny, nx = raw.shape
        yv, xv = torch.meshgrid(torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32), indexing="ij")
        return torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2)

    def decode_boxes(self, i: int, p: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoided p [B,na,ny,nx,>=4] -> (cx, cy) and (w, h) in input pixels, the official arithmetic."""
        stride = float(self.stride[i])  # python float: a constant in the exported graph
        xy = (p[..., 0:2] * 2.0 - 0.5 + grid) * stride
        wh = (p[..., 2:4] * 2.0) ** 2 * self.anchor_grid[i]
        return xy, wh

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.decode(i, self.level(i, xs[i])) for i in range(self.nl)], 1)

    def raw_outputs(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-level raw outputs [B, na, ny, nx, no] (the official eval's second return value)."""
        outs = []
        for i in range(self.nl):
            r = self.level(i, xs[i])
            bs, _, ny, nx = r.shape
            outs.append(r.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        return outs


class IDetect(Detect):
    """Detect with ImplicitA before and ImplicitM after each head conv."""

    def __init__(self, nc: int, anchors_px: list, ch: list[int], stride: list[float]):
        super().__init__(nc, anchors_px, ch, stride)
        self.ia = nn.ModuleList(ImplicitA(c) for c in ch[: self.nl])
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch[: self.nl])

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.im[i](self.m[i](self.ia[i](x)))

    def to_detect(self) -> Detect:
        """Fold the implicit ops into the convs: m(x + a) * s == (s*W) x + s*(b + W a)."""
        ch = [conv.in_channels for conv in self.m]
        head = Detect(self.nc, self.anchor_grid.view(self.nl, self.na, 2).tolist(), ch, self.stride.tolist())
        head.anchor_grid.copy_(self.anchor_grid)
        with torch.no_grad():
            for i, conv in enumerate(self.m):
                w = conv.weight.double().flatten(1)  # [out, in]
                a = self.ia[i].implicit.double().flatten()
                s = self.im[i].implicit.double().flatten()
                bias = (conv.bias.double() + w @ a) * s
                head.m[i].weight.copy_((conv.weight.double() * s.view(-1, 1, 1, 1)).float())
                head.m[i].bias.copy_(bias.float())
        return head


class IAuxDetect(IDetect):
    """P6 training head: lead heads (m, ia, im) on the first nl inputs, auxiliary heads (m2) on the rest.

    The auxiliary heads only shape the training loss; inference uses the lead heads alone.
    """

    def __init__(self, nc: int, anchors_px: list, ch: list[int], stride: list[float]):
        super().__init__(nc, anchors_px, ch, stride)
        self.m2 = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch[self.nl:])
