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

from . import heads, heads_keypoint, heads_segment, modules
from .checkpoint import Checkpoint
from .checkpoint_yaml import check_downsampling
from .errors import UserError

_CHANNEL_MODULES = {"Conv": modules.Conv, "RepConv": modules.RepConv, "DownC": modules.DownC,
                    "SPPCSPC": modules.SPPCSPC}
_REPEAT_ARG_MODULES = {"DownC", "SPPCSPC"}  # the official parser inserts `n` as their third argument
_HEADS = {"Detect": heads.Detect, "IDetect": heads.IDetect, "IAuxDetect": heads.IAuxDetect,
          "ISegment": heads_segment.ISegment, "IKeypoint": heads_keypoint.IKeypoint}
_SEG_HEADS = {"ISegment"}  # yaml args [nc, anchors, nm, npr]; npr scaled by width like the official parser
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
    nkpt: int = 0  # keypoints per anchor (pose head)
    dw_conv_kpt: bool = False  # pose head: depth-wise keypoint branch instead of one 1x1 conv


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


# Bounds on what a checkpoint's yaml may ask us to build (official: <= ~200 rows, n <= 9, <= 1280 channels,
# depth/width multiples <= 1.33). Checked before any module exists; a yaml asking for 1e8 repeats or 1e6
# channels ran for minutes at 7 GB before these.
MAX_ROWS, MAX_REPEATS, MAX_TOTAL_REPEATS, MAX_CHANNELS, MAX_MULTIPLE = 1000, 64, 4000, 16384, 8.0


def _bounded(value, lo: float, hi: float, what: str, integer: bool = True):
    ok = (type(value) is int) if integer else (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or not (lo <= value <= hi) or value != value:
        kind = "an integer" if integer else "a number"
        raise UserError(f"checkpoint yaml: {what} is {repr(value)[:60]}; expected {kind} in {lo:g}..{hi:g}")
    return value


def _parse(cfg: dict, spec: BuildSpec) -> tuple[list[nn.Module], list[int]]:
    gd = _bounded(cfg.get("depth_multiple", 1.0), 1e-3, MAX_MULTIPLE, "depth_multiple", integer=False)
    gw = _bounded(cfg.get("width_multiple", 1.0), 1e-3, MAX_MULTIPLE, "width_multiple", integer=False)
    gd, gw = float(gd), float(gw)
    _bounded(cfg.get("ch", 3), 1, 64, "ch (input channels)")
    if not isinstance(cfg["backbone"], list) or not isinstance(cfg["head"], list) \
            or not 1 <= len(cfg["backbone"]) + len(cfg["head"]) <= MAX_ROWS:
        raise UserError(f"checkpoint yaml: backbone + head must be lists of 1..{MAX_ROWS} rows")
    total_repeats = 0
    na = len(spec.anchors_px[0])
    no = na * (spec.nc + 5)
    ch = [int(cfg.get("ch", 3))]
    layers, save = [], []
    rows = list(cfg["backbone"]) + list(cfg["head"])
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise UserError(f"malformed yaml row {i}: {repr(row)[:80]}")
        f, n, name, args = row
        if name not in SUPPORTED_MODULES:
            raise UserError(f"unsupported module '{name}' in layer {i} of the checkpoint's yaml: not a YOLOv7 "
                            f"model (supported: {', '.join(SUPPORTED_MODULES)})")
        if not isinstance(args, list):
            raise UserError(f"checkpoint yaml: layer {i} has args {str(args)[:60]}, not a list")
        args = [_resolve_arg(a, spec.nc, spec.anchors_px) for a in args]
        n = _bounded(n, 1, MAX_REPEATS, f"layer {i} repeat count")
        n = max(round(n * gd), 1) if n > 1 else n
        total_repeats += _bounded(n, 1, MAX_REPEATS, f"layer {i} repeat count x depth_multiple")
        if total_repeats > MAX_TOTAL_REPEATS:
            raise UserError(f"checkpoint yaml: more than {MAX_TOTAL_REPEATS} modules in total")
        if name in _CHANNEL_MODULES:
            c1, c2 = ch[f], args[0]
            _bounded(c2, 1, MAX_CHANNELS, f"layer {i} output channels")
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if name != "SPPCSPC" and len(args) > 2:  # Conv/RepConv [c1, c2, k, s, ...]; DownC [c1, c2, k=stride]
                _bounded(args[2], 1, 64, f"layer {i} kernel size")
            if name in ("Conv", "RepConv") and len(args) > 3:
                _bounded(args[3], 1, 64, f"layer {i} stride")
            if name in _REPEAT_ARG_MODULES:
                args.insert(2, n)
                n = 1
            kwargs = {"bn_eps": spec.bn_eps}
            build = lambda: _CHANNEL_MODULES[name](*args, **kwargs)  # noqa: E731
        elif name in _HEADS:
            c2 = None
            ch_in = [ch[x] for x in f]
            if name in _SEG_HEADS:
                nm, npr = int(args[2]), make_divisible(int(args[3]) * gw, 8)
                build = lambda: _HEADS[name](spec.nc, spec.anchors_px, nm, npr, ch_in, spec.stride,  # noqa: E731
                                             bn_eps=spec.bn_eps)
            elif name == "IKeypoint":  # yaml args [nc, anchors, nkpt]; nkpt/dw_conv_kpt come from the checkpoint
                build = lambda: _HEADS[name](spec.nc, spec.anchors_px, ch_in, spec.stride, nkpt=spec.nkpt,  # noqa: E731
                                             dw_conv_kpt=spec.dw_conv_kpt, bn_eps=spec.bn_eps)
            else:
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
    spec = BuildSpec(nc=ckpt.nc, anchors_px=ckpt.anchors_px, stride=ckpt.stride, bn_eps=ckpt.bn_eps,
                     nkpt=ckpt.nkpt, dw_conv_kpt=ckpt.dw_conv_kpt)
    state = {k: v for k, v in ckpt.state_dict.items() if not k.endswith(".anchors")}
    try:
        with torch.device("meta"):  # first on the meta device: nothing is allocated until the yaml fits the weights
            probe = YoloModel(ckpt.yaml, spec)
            _check_fit(probe, state, ckpt.head_type)
        check_downsampling(ckpt.yaml, spec.stride)
        model = YoloModel(ckpt.yaml, spec)
    except UserError:
        raise
    except Exception as exc:
        msg = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"could not rebuild the network from the checkpoint's yaml: {type(exc).__name__}: {msg}") from exc
    _check_fit(model, state, ckpt.head_type)
    model.load_state_dict(state, strict=False)
    model.names = list(ckpt.names)
    return model.float().eval()


def _check_fit(model: YoloModel, state: dict[str, torch.Tensor], head_type: str) -> None:
    """The checkpoint's tensors must be exactly the model's (names and shapes)."""
    if type(model.head).__name__ != head_type:
        raise UserError(f"yaml head '{type(model.head).__name__}' does not match the pickled head '{head_type}'")
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
