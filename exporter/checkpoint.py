"""Stage 1a: read an official YOLOv7 checkpoint *without executing anything from the pickle*.

Official checkpoints are pickled ``nn.Module`` trees (``models.yolo.Model`` holding
``models.common.Conv`` ...). Unpickling them normally imports and runs the official source tree, and a
hostile pickle can run any callable it names. We unpickle with a restricted ``find_class``:

* every class of the official tree (``models.*``) and every ``torch.nn.modules.*`` class becomes an inert
  placeholder that only records its pickled state (no ``__init__``, no ``__setstate__`` of the real class);
* a short allowlist of real callables that only rebuild data (tensors, numpy arrays, ordered dicts, sets)
  is accepted;
* anything else (``os.system``, ``builtins.exec``, ``subprocess.Popen``, ``ultralytics.*`` ...) is refused
  before it is called.

From the placeholders we take the flat state dict (fp16 -> fp32), the embedded yaml, class names, and the
Detect module's stride and anchors (autoanchor may have changed them, so the yaml's anchors are not used).
"""
from __future__ import annotations

import collections
import hashlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .errors import UserError


class UnsafeCheckpointError(UserError):
    """The pickle names a global outside the allowlist."""


class PickledObject:
    """Inert stand-in for a pickled class: keeps the pickled ``__dict__`` state, runs nothing."""

    _pickled_path = "?"

    def __setstate__(self, state: Any) -> None:
        # nn.Module pickles its __dict__; some objects pickle (dict, slots) pairs.
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        self.__dict__["state"] = state if isinstance(state, dict) else {"_value": state}

    @property
    def class_path(self) -> str:
        return type(self)._pickled_path

    @property
    def class_name(self) -> str:
        return type(self)._pickled_path.rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get("state", {}).get(key, default)

    def children(self) -> "collections.OrderedDict[str, PickledObject]":
        return self.get("_modules") or collections.OrderedDict()


_placeholder_types: dict[str, type] = {}


def _placeholder(path: str) -> type:
    if path not in _placeholder_types:
        _placeholder_types[path] = type(path.rsplit(".", 1)[-1], (PickledObject,), {"_pickled_path": path})
    return _placeholder_types[path]


def _numpy_global(name: str) -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core -> numpy._core
    return getattr(core.multiarray, name)


# Real callables the pickle may use. Each only rebuilds data from the arguments it is given.
_ALLOWED_CALLABLES: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): __import__("codecs").encode,  # numpy arrays pickled with protocol 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy-1 and numpy-2 pickles
    _ALLOWED_CALLABLES[(_mod, "_reconstruct")] = _numpy_global("_reconstruct")
    _ALLOWED_CALLABLES[(_mod, "scalar")] = _numpy_global("scalar")
for _mod in ("builtins", "__builtin__"):
    for _name in ("set", "frozenset", "dict", "list", "tuple", "int", "float", "bool", "str", "bytes",
                  "bytearray", "slice", "complex"):
        _ALLOWED_CALLABLES[(_mod, _name)] = getattr(__import__("builtins"), _name)
for _dt in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool"):
    _ALLOWED_CALLABLES[("torch", _dt)] = getattr(torch, _dt)

# Class paths that become placeholders: the official tree and torch's own module classes.
_PLACEHOLDER_PREFIXES = ("models.", "torch.nn.modules.", "torch.nn.parameter.")


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        path = f"{module}.{name}"
        if (module, name) in _ALLOWED_CALLABLES:
            return _ALLOWED_CALLABLES[(module, name)]
        if path.startswith(_PLACEHOLDER_PREFIXES):
            return _placeholder(path)
        raise UnsafeCheckpointError(
            f"refused to load: the checkpoint's pickle references '{path}', which is not part of an official "
            "YOLOv7 checkpoint (nothing was executed)"
        )


# torch.load(pickle_module=...) needs a module-like object with Unpickler and load.
_SAFE_PICKLE = SimpleNamespace(
    Unpickler=_SafeUnpickler,
    load=lambda f, **kw: _SafeUnpickler(f, **kw).load(),
    __name__="yolo7_export_safe_pickle",
)


@dataclass
class Checkpoint:
    """Everything later stages need from a checkpoint; no official code involved."""

    path: Path
    sha256: str
    yaml: dict
    state_dict: dict[str, torch.Tensor]
    names: list[str]
    stride: list[float]
    anchors_px: list[list[list[float]]]  # [nl][na][2] anchor sizes in input pixels
    head_type: str  # 'Detect' | 'IDetect' | 'IAuxDetect'
    bn_eps: float = 1e-3
    source_key: str = "model"
    module_census: dict[str, int] = field(default_factory=dict)

    @property
    def nc(self) -> int:
        return int(self.yaml["nc"])

    @property
    def max_stride(self) -> int:
        return int(max(self.stride))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _unpickle(path: Path) -> Any:
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"checkpoint path is a directory, not a file: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint is empty (0 bytes): {path}")
    is_zip = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", pickle_module=_SAFE_PICKLE, weights_only=False)
    except UserError:
        raise
    except Exception as exc:  # torch raises many types for corrupt input; all mean the same to a user
        kind = "truncated or corrupt PyTorch checkpoint" if is_zip else "not a PyTorch checkpoint"
        raise UserError(f"{kind}: {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc


def _flatten_state(module: PickledObject, prefix: str, out: dict[str, torch.Tensor],
                   census: collections.Counter) -> None:
    census[module.class_path] += 1
    for key in ("_parameters", "_buffers"):
        for name, tensor in (module.get(key) or {}).items():
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise UserError(f"corrupt checkpoint: {prefix}{name} is a {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
    for name, child in module.children().items():
        if child is not None:
            _flatten_state(child, f"{prefix}{name}.", out, census)


def _pick_model(obj: Any, path: Path) -> tuple[PickledObject, str]:
    if isinstance(obj, PickledObject):
        return obj, "<root>"
    if not isinstance(obj, dict):
        raise UserError(f"not a YOLOv7 checkpoint: {path} holds a {type(obj).__name__}, not a checkpoint dict")
    for key in ("ema", "model"):  # strip_optimizer copies ema into model; prefer ema if still present
        candidate = obj.get(key)
        if isinstance(candidate, PickledObject):
            return candidate, key
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} is a plain state dict without the architecture; export needs the official "
                        "training checkpoint (with 'model' and its yaml), e.g. runs/train/exp/weights/best.pt")
    raise UserError(f"not a YOLOv7 checkpoint: {path} has no 'model' or 'ema' entry (keys: {sorted(obj)[:8]})")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Safely load an official YOLOv7 training or deploy checkpoint."""
    path = Path(path)
    obj = _unpickle(path)
    model, key = _pick_model(obj, path)
    if model.class_path != "models.yolo.Model":
        raise UserError(f"not a YOLOv7 checkpoint: the model is a '{model.class_path}', expected models.yolo.Model")
    yaml = model.get("yaml")
    if not isinstance(yaml, dict) or "backbone" not in yaml or "head" not in yaml:
        raise UserError(f"checkpoint {path} has no embedded model yaml (backbone/head); cannot rebuild the network")
    seq = model.children().get("model")
    if seq is None or not seq.children():
        raise UserError(f"checkpoint {path} has no layers under model.model")
    head = list(seq.children().values())[-1]
    state: dict[str, torch.Tensor] = {}
    census: collections.Counter = collections.Counter()
    _flatten_state(seq, "model.", state, census)

    stride = head.get("stride")
    if stride is None:
        stride = model.get("stride")
    if stride is None:
        raise UserError(f"checkpoint {path}: the Detect module has no stride")
    stride = [float(s) for s in torch.as_tensor(stride).flatten()]
    head_buffers = head.get("_buffers") or {}
    if "anchor_grid" in head_buffers:  # what the official forward multiplies by (pixels)
        anchors = head_buffers["anchor_grid"].float().reshape(len(stride), -1, 2)
    elif "anchors" in head_buffers:  # grid units
        anchors = head_buffers["anchors"].float().reshape(len(stride), -1, 2) * torch.tensor(stride).view(-1, 1, 1)
    else:
        raise UserError(f"checkpoint {path}: the Detect module has no anchors")
    bn_eps = [m.get("eps") for m in _walk(seq) if m.class_name == "BatchNorm2d"]
    names = model.get("names") or [str(i) for i in range(int(yaml["nc"]))]
    if isinstance(names, dict):  # some forks store {id: name}
        names = [names[k] for k in sorted(names)]
    return Checkpoint(
        path=path, sha256=sha256_file(path), yaml=yaml, state_dict=state, names=[str(n) for n in names],
        stride=stride, anchors_px=anchors.tolist(), head_type=head.class_name,
        bn_eps=float(bn_eps[0]) if bn_eps and bn_eps[0] is not None else 1e-3,
        source_key=key, module_census=dict(census),
    )


def _walk(module: PickledObject):
    yield module
    for child in module.children().values():
        if child is not None:
            yield from _walk(child)
