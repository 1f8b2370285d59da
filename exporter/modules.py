"""Our own implementations of every module the official YOLOv7 cfgs (training and deploy) use.

Attribute names follow the official state-dict layout (``conv``, ``bn``, ``rbr_dense`` ...) so checkpoint
tensors load by name. Each block knows how to fold itself for deployment (``fuse()``); the heads live in
``heads.py``.
"""
from __future__ import annotations

import torch
from torch import nn


def autopad(k: int, p: int | None = None) -> int:
    """'same' padding for odd kernels, as the official cfgs assume."""
    return k // 2 if p is None else p


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a convolution into that convolution's weight and bias.

    Done in float64 so the folded fp32 model stays as close to the unfused one as rounding allows.
    """
    std = (bn.running_var.double() + bn.eps).sqrt()
    scale = bn.weight.double() / std
    w = weight.double() * scale.view(-1, 1, 1, 1)
    b = (bias.double() if bias is not None else torch.zeros_like(scale)) - bn.running_mean.double()
    b = b * scale + bn.bias.double()
    return w.float(), b.float()


def _fused_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    groups=conv.groups, bias=True)
    new.weight.data.copy_(weight)
    new.bias.data.copy_(bias)
    return new


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + activation; ``fuse()`` folds the BN into the conv."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool | nn.Module = True, bn_eps: float = 1e-3):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c2, eps=bn_eps)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = _fused_conv(self.conv, *fold_bn(self.conv.weight, self.conv.bias, self.bn))
            self.bn = nn.Identity()

    def to_fused_layout(self) -> None:
        """Match a checkpoint that was saved after the official fuse() (conv has a bias, no bn)."""
        self.conv = _fused_conv(self.conv, self.conv.weight.data, torch.zeros(self.conv.out_channels))
        self.bn = nn.Identity()


class RepConv(nn.Module):
    """RepVGG block: 3x3 conv+BN, 1x1 conv+BN and (if shapes allow) an identity BN, summed.

    ``fuse()`` re-parameterizes the three branches into one 3x3 conv with bias (``rbr_reparam``).
    """

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool | nn.Module = True, deploy: bool = False, bn_eps: float = 1e-3):
        super().__init__()
        if k != 3 or autopad(k, p) != 1:
            raise ValueError("RepConv supports only 3x3 kernels with padding 1")
        self.groups, self.in_channels, self.out_channels = g, c1, c2
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        self.rbr_identity = nn.BatchNorm2d(c1, eps=bn_eps) if c1 == c2 and s == 1 else None
        self.rbr_dense = nn.Sequential(nn.Conv2d(c1, c2, 3, s, 1, groups=g, bias=False), nn.BatchNorm2d(c2, eps=bn_eps))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, 0, groups=g, bias=False), nn.BatchNorm2d(c2, eps=bn_eps))
        self.rbr_reparam: nn.Conv2d | None = None
        if deploy:
            self.to_fused_layout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return self.act(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(out)

    def _identity_kernel(self) -> torch.Tensor:
        per_group = self.in_channels // self.groups
        kernel = torch.zeros(self.in_channels, per_group, 3, 3)
        for i in range(self.in_channels):
            kernel[i, i % per_group, 1, 1] = 1.0
        return kernel

    def fuse(self) -> None:
        if self.rbr_reparam is not None:
            return
        w3, b3 = fold_bn(self.rbr_dense[0].weight, None, self.rbr_dense[1])
        w1, b1 = fold_bn(self.rbr_1x1[0].weight, None, self.rbr_1x1[1])
        weight, bias = w3 + nn.functional.pad(w1, [1, 1, 1, 1]), b3 + b1
        if self.rbr_identity is not None:
            wi, bi = fold_bn(self._identity_kernel(), None, self.rbr_identity)
            weight, bias = weight + wi, bias + bi
        self.rbr_reparam = _fused_conv(self.rbr_dense[0], weight, bias)
        self.rbr_dense = self.rbr_1x1 = self.rbr_identity = None

    def to_fused_layout(self) -> None:
        conv = self.rbr_dense[0]
        self.rbr_reparam = _fused_conv(conv, conv.weight.data, torch.zeros(self.out_channels))
        self.rbr_dense = self.rbr_1x1 = self.rbr_identity = None


class MP(nn.Module):
    """k x k max pool with stride k (downsampling)."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class SP(nn.Module):
    """'same' max pool (yolov7-tiny's SPP branches)."""

    def __init__(self, k: int = 3, s: int = 1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class ReOrg(nn.Module):
    """Space-to-depth (P6 stems): (b, c, h, w) -> (b, 4c, h/2, w/2) in the official channel order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)


class Concat(nn.Module):
    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Shortcut(nn.Module):
    """Sum of two earlier layers (yolov7-e6e)."""

    def __init__(self, dimension: int = 0):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return x[0] + x[1]


class DownC(nn.Module):
    """P6 downsampling: strided 3x3 conv branch beside a max-pool + 1x1 conv branch."""

    def __init__(self, c1: int, c2: int, n: int = 1, k: int = 2, bn_eps: float = 1e-3):
        super().__init__()
        self.cv1 = Conv(c1, c1, 1, 1, bn_eps=bn_eps)
        self.cv2 = Conv(c1, c2 // 2, 3, k, bn_eps=bn_eps)
        self.cv3 = Conv(c1, c2 // 2, 1, 1, bn_eps=bn_eps)
        self.mp = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.cv2(self.cv1(x)), self.cv3(self.mp(x))), dim=1)


class SPPCSPC(nn.Module):
    """CSP spatial pyramid pooling (max pools 5/9/13) of yolov7 and the P6 models."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5,
                 k: tuple[int, ...] = (5, 9, 13), bn_eps: float = 1e-3):
        super().__init__()
        c_ = int(2 * c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, bn_eps=bn_eps)
        self.cv2 = Conv(c1, c_, 1, 1, bn_eps=bn_eps)
        self.cv3 = Conv(c_, c_, 3, 1, bn_eps=bn_eps)
        self.cv4 = Conv(c_, c_, 1, 1, bn_eps=bn_eps)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)
        self.cv5 = Conv(4 * c_, c_, 1, 1, bn_eps=bn_eps)
        self.cv6 = Conv(c_, c_, 3, 1, bn_eps=bn_eps)
        self.cv7 = Conv(2 * c_, c2, 1, 1, bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1] + [m(x1) for m in self.m], 1)))
        return self.cv7(torch.cat((y1, self.cv2(x)), dim=1))
