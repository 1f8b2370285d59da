"""Stage 1b: rebuild the network from the checkpoint's embedded yaml with our own modules, load the weights.

The yaml is the official cfg format: ``[from, number, module, args]`` rows under ``backbone`` + ``head``,
scaled by ``depth_multiple``/``width_multiple``. Module names and argument strings are resolved from a
fixed table (never ``eval``): a checkpoint cannot make us run code through its yaml either.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from . import heads, modules
from .checkpoint import Checkpoint
from .errors import UserError

_CHANNEL_MODULES = {"Conv": modules.Conv, "RepConv": modules.RepConv, "DownC": modules.DownC,
                    "SPPCSPC": modules.SPPCSPC}
_REPEAT_ARG_MODULES = {"DownC", "SPPCSPC"}  # the official parser inserts `n` as their third argument
_HEADS = {"Detect": heads.Detect, "IDetect": heads.IDetect, "IAuxDetect": heads.IAuxDetect}
_SIMPLE = {"MP": modules.MP, "SP": modules.SP, "ReOrg": modules.ReOrg, "Concat": modules.Concat,
           "Shortcut": modules.Shortcut, "nn.Upsample": nn.Upsample}
_ACTIVATIONS = {"nn.SiLU": nn.SiLU, "nn.LeakyReLU": nn.LeakyReLU, "nn.ReLU": nn.ReLU, "nn.Identity": nn.Identity,
                "nn.Hardswish": nn.Hardswish, "nn.Mish": nn.Mish, "nn.Sigmoid": nn.Sigmoid}
SUPPORTED_MODULES = sorted([*_CHANNEL_MODULES, *_HEADS, *_SIMPLE])
_CALL_RE = re.compile(r"^(nn\.[A-Za-z]+)\((.*)\)$")


def make_divisible(x: float, divisor: int = 8) -> int:
    return math.ceil(x / divisor) * divisor


def _resolve_arg(value, nc: int, anchors):
    """Turn a yaml argument string into a value without eval: 'None', 'nc', 'anchors', 'nn.LeakyReLU(0.1)'."""
    if not isinstance(value, str):
        return value
    if value == "nc":
        return nc
    if value == "anchors":
        return anchors
    match = _CALL_RE.match(value.replace(" ", ""))
    if match:
        name, inner = match.groups()
        if name not in _ACTIVATIONS:
            raise UserError(f"unsupported activation '{value}' in the checkpoint's yaml")
        args = ast.literal_eval(f"({inner},)") if inner else ()
        return _ACTIVATIONS[name](*args)
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # plain strings such as 'nearest'


@dataclass
class BuildSpec:
    nc: int
    anchors_px: list
    stride: list[float]
    bn_eps: float = 1e-3


class YoloModel(nn.Module):
    """The official layer graph: ``self.model[i]`` reads outputs of earlier layers listed in its ``f``."""

    def __init__(self, cfg: dict, spec: BuildSpec):
        super().__init__()
        self.yaml = cfg
        layers, self.save = _parse(cfg, spec)
        self.model = nn.Sequential(*layers)
        self.names = [str(i) for i in range(spec.nc)]
        self.stride = list(spec.stride)
        self.fused = False

    @property
    def head(self) -> heads.Detect:
        return self.model[-1]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run every layer but the head; return the head's inputs."""
        outputs: list[torch.Tensor | None] = []
        for layer in list(self.model)[:-1]:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            if isinstance(layer, _Pruned):
                x = None
            else:
                x = layer(x)
            outputs.append(x if layer.i in self.save else None)
        f = self.head.f
        return [x if j == -1 else outputs[j] for j in ([f] if isinstance(f, int) else f)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval output [B, N, 5+nc], laid out exactly like the official model's ``model(x)[0]``."""
        return self.head(self._features(x))

    def raw_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.head.raw_outputs(self._features(x))


class _Pruned(nn.Module):
    """Placeholder for a layer that only fed the auxiliary heads (removed at fuse time)."""

    def forward(self, x):  # pragma: no cover - never called
        raise RuntimeError("pruned layer called")


def _parse(cfg: dict, spec: BuildSpec) -> tuple[list[nn.Module], list[int]]:
    gd, gw = float(cfg.get("depth_multiple", 1.0)), float(cfg.get("width_multiple", 1.0))
    na = len(spec.anchors_px[0])
    no = na * (spec.nc + 5)
    ch = [int(cfg.get("ch", 3))]
    layers, save = [], []
    rows = list(cfg["backbone"]) + list(cfg["head"])
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise UserError(f"malformed yaml row {i}: {row!r}")
        f, n, name, args = row
        if name not in SUPPORTED_MODULES:
            raise UserError(f"unsupported module '{name}' in layer {i} of the checkpoint's yaml: not a YOLOv7 "
                            f"model (supported: {', '.join(SUPPORTED_MODULES)})")
        args = [_resolve_arg(a, spec.nc, spec.anchors_px) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        if name in _CHANNEL_MODULES:
            c1, c2 = ch[f], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if name in _REPEAT_ARG_MODULES:
                args.insert(2, n)
                n = 1
            kwargs = {"bn_eps": spec.bn_eps}
            build = lambda: _CHANNEL_MODULES[name](*args, **kwargs)  # noqa: E731
        elif name in _HEADS:
            c2 = None
            ch_in = [ch[x] for x in f]
            build = lambda: _HEADS[name](spec.nc, spec.anchors_px, ch_in, spec.stride)  # noqa: E731
        else:
            if name == "Concat":
                c2 = sum(ch[x] for x in f)
            elif name == "Shortcut":
                c2 = ch[f[0]]
            elif name == "ReOrg":
                c2 = ch[f] * 4
            else:
                c2 = ch[f]
            build = lambda: _SIMPLE[name](*args)  # noqa: E731
        layer = nn.Sequential(*[build() for _ in range(n)]) if n > 1 else build()
        layer.i, layer.f, layer.type = i, f, name
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(layer)
        if i == 0:
            ch = []
        ch.append(c2)
    return layers, sorted(save)


def _adapt_layout(model: YoloModel, state: dict[str, torch.Tensor]) -> None:
    """Match blocks to a checkpoint saved after the official fuse()/re-parameterization."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, modules.Conv) and f"{prefix}bn.weight" not in state and f"{prefix}conv.bias" in state:
            module.to_fused_layout()
        if isinstance(module, modules.RepConv) and f"{prefix}rbr_reparam.weight" in state:
            module.to_fused_layout()


def build_model(ckpt: Checkpoint) -> YoloModel:
    """Build our model from the checkpoint's yaml and load its (fp32) weights; eval mode."""
    spec = BuildSpec(nc=ckpt.nc, anchors_px=ckpt.anchors_px, stride=ckpt.stride, bn_eps=ckpt.bn_eps)
    try:
        model = YoloModel(ckpt.yaml, spec)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"could not rebuild the network from the checkpoint's yaml: {type(exc).__name__}: {exc}") from exc
    if type(model.head).__name__ != ckpt.head_type:
        raise UserError(f"yaml head '{type(model.head).__name__}' does not match the pickled head '{ckpt.head_type}'")
    state = {k: v for k, v in ckpt.state_dict.items() if not k.endswith(".anchors")}
    _adapt_layout(model, state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        sample = (missing or unexpected)[:3]
        raise UserError(f"checkpoint weights do not fit the architecture in its yaml ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors, e.g. {sample})")
    for key, tensor in expected.items():
        if key in state and tuple(tensor.shape) != tuple(state[key].shape):
            raise UserError(f"checkpoint weights do not fit the architecture in its yaml: {key} has shape "
                            f"{tuple(state[key].shape)}, the yaml expects {tuple(tensor.shape)}")
    model.load_state_dict(state, strict=False)
    model.names = list(ckpt.names)
    return model.float().eval()
