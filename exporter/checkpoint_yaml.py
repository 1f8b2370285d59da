"""The embedded yaml's downsampling must agree with the pickled Detect strides, checked before any module exists.

A conv stride of 0, a pooling or upsampling factor that does not fit, or a pickled stride that disagrees with
the architecture used to pass loading and fail later (or export boxes all at [0, 0, 0, 0]). We follow the
rows' stride-like arguments through the layer graph (a few dozen integer operations). An earlier version ran
the model forward on the ``meta`` device instead; that cost 4-13 s per load (torch's meta decompositions).

Only the modules whose geometry we know are followed; a row of any other module makes the result unknown
and the check is skipped rather than refusing a valid checkpoint of a head we have not seen.
"""
from __future__ import annotations

from fractions import Fraction

from .errors import UserError

# module name -> (index of its stride/pool factor in the raw yaml args, default when the arg is absent)
_FACTOR_ARG = {"Conv": (2, 1), "RepConv": (2, 1), "DownC": (1, 2), "MP": (0, 2), "SP": (1, 1)}
_SAME = {"SPPCSPC", "Concat", "Shortcut"}


def _factor(value, name: str, i: int) -> int:
    if type(value) is not int or not 1 <= value <= 64:
        raise UserError(f"checkpoint yaml: layer {i} ({name}) has stride/factor {value!r}; expected an integer in 1..64")
    return value


def head_input_strides(cfg: dict) -> list[Fraction] | None:
    """Downsampling of each head input, from the yaml rows; None where a module's geometry is unknown."""
    down: list[Fraction | None] = []
    rows = list(cfg["backbone"]) + list(cfg["head"])
    for i, (f, _n, name, args) in enumerate(rows):
        sources = [f] if isinstance(f, int) else list(f)
        try:
            ins = [(down[-1] if down else Fraction(1)) if j == -1 else down[j] for j in sources]
        except (IndexError, TypeError) as exc:
            raise UserError(f"checkpoint yaml: layer {i} reads from {f!r}, which is not an earlier layer") from exc
        if i == len(rows) - 1:  # the head
            return None if any(x is None for x in ins) else list(ins)
        x = ins[0]
        if name in ("Concat", "Shortcut") and len({v for v in ins}) > 1 and None not in ins:
            raise UserError(f"checkpoint yaml: layer {i} ({name}) joins inputs of different resolutions "
                            f"(downsampling {', '.join(str(v) for v in ins)})")
        if x is None:
            down.append(None)
        elif name in _FACTOR_ARG:
            index, default = _FACTOR_ARG[name]
            down.append(x * _factor(args[index] if len(args) > index else default, name, i))
        elif name == "ReOrg":
            down.append(x * 2)
        elif name == "nn.Upsample":
            scale = args[1] if len(args) > 1 else None
            down.append(x / _factor(scale, name, i) if scale is not None else None)
        elif name in _SAME:
            down.append(x)
        else:
            down.append(None)
    return None


def check_downsampling(cfg: dict, stride: list[float]) -> None:
    """Refuse (one line) a yaml whose head inputs are not downsampled by the pickled Detect strides."""
    got = head_input_strides(cfg)
    if got is None:
        return
    for level, s in enumerate(stride):
        if level >= len(got) or got[level] != s:
            seen = str(got[level]) if level < len(got) else "nothing"
            raise UserError(f"checkpoint yaml: head input {level} is downsampled by {seen}, but the Detect stride is "
                            f"{s:g} (a stride, pooling or upsampling in the yaml does not match the checkpoint)")
