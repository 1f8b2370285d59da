"""Stage 1a: read an official YOLOv7 checkpoint *without executing anything from it*, at a bounded cost.

Official checkpoints are pickled ``nn.Module`` trees (``models.yolo.Model`` holding ``models.common.Conv`` ...)
in torch's zip format. Loading them normally imports and runs the official source tree, and a hostile file can
run any callable it names (or, as a TorchScript archive, its own code inside ``torch.jit.load``). So
``torch.load`` is never called:

* :mod:`exporter.checkpoint_zip` reads the zip itself: only the member layout ``torch.save`` writes, stored
  members, sizes bounded by the file, CRCs verified; TorchScript archives, tar and legacy files are refused;
* :mod:`exporter.safe_pickle` unpickles ``data.pkl`` with exact ``(module, name)`` pairs: official and
  ``torch.nn`` classes become inert placeholders, tensors are checked views of the records present;
* here, the module tree is walked iteratively with a node budget (a pickle of shared submodules is a DAG
  whose paths grow exponentially), the yaml/names must be plain bounded data, and
  :mod:`exporter.weights_check` refuses non-finite weights, negative BN variance, impossible strides and
  names/nc mismatches with one line naming the tensor or field.

From the placeholders we take the flat state dict (fp16 -> fp32), the embedded yaml, class names, and the
Detect module's stride and anchors (autoanchor may have changed them, so the yaml's anchors are not used).
"""
from __future__ import annotations

import collections
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from runtimes.files import sha256_file

from .checkpoint_zip import open_torch_zip
from .errors import UserError
from .safe_pickle import PickledObject, UnsafeCheckpointError, first_line, placeholder, unpickle
from .weights_check import check_weights

__all__ = ["Checkpoint", "PickledObject", "UnsafeCheckpointError", "load_checkpoint", "placeholder", "sha256_file"]

# Model classes we rebuild: detection (models.yolo.Model) and the u7 seg tree's SegmentationModel.
_MODEL_CLASSES = ("models.yolo.Model", "models.yolo.SegmentationModel")
SEGMENT_HEADS = ("ISegment",)
KEYPOINT_HEADS = ("IKeypoint",)

# Bounds on what a checkpoint may ask us to walk (a full yolov7-e6e has ~2,000 modules, depth 5).
MAX_MODULES = 100_000
MAX_DEPTH = 64
MAX_PLAIN_NODES = 1_000_000  # yaml / names: nodes visited while checking they are plain data
MAX_NC = 100_000


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
    head_type: str  # 'Detect' | 'IDetect' | 'IAuxDetect' | 'ISegment'
    bn_eps: float = 1e-3
    source_key: str = "model"
    module_census: dict[str, int] = field(default_factory=dict)
    nm: int = 0  # mask coefficients per anchor (segmentation heads), 0 otherwise
    nkpt: int = 0  # keypoints per anchor (pose head IKeypoint), 0 otherwise
    dw_conv_kpt: bool = False  # pose head: depth-wise keypoint branch (yaml dw_conv_kpt) or one 1x1 conv

    @property
    def task(self) -> str:
        """'segment' for the u7 seg head, 'pose' for the pose-branch keypoint head, else 'detect'."""
        if self.head_type in KEYPOINT_HEADS:
            return "pose"
        return "segment" if self.head_type in SEGMENT_HEADS else "detect"

    @property
    def nc(self) -> int:
        return int(self.yaml["nc"])

    @property
    def max_stride(self) -> int:
        return int(max(self.stride))



def _unpickle(path: Path) -> Any:
    """Checked zip -> checked pickle -> placeholders and tensors. Never hands the file to torch.load."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {path}: {first_line(exc)}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"checkpoint path is a directory, not a file: {path}")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise UserError(f"refused to load: {path} is not a regular file (a pipe, device or socket)")
    if st.st_size == 0:
        raise UserError(f"checkpoint is empty (0 bytes): {path}")
    archive = open_torch_zip(path)
    try:
        with warnings.catch_warnings():  # torch/numpy warnings would print before our one-line error
            warnings.simplefilter("ignore")
            return unpickle(archive.pickle, archive.read_record)
    finally:
        archive.close()


def _iter_modules(root: PickledObject, path: Path) -> Iterator[tuple[str, PickledObject]]:
    """Depth-first (prefix, module) pairs in pickled order, within :data:`MAX_MODULES` and :data:`MAX_DEPTH`."""
    stack: list[tuple[str, PickledObject, int]] = [("", root, 0)]
    seen = 0
    while stack:
        prefix, module, depth = stack.pop()
        seen += 1
        if seen > MAX_MODULES or depth > MAX_DEPTH:
            raise UserError(f"refused to load: {path}'s module tree is larger than {MAX_MODULES} modules or deeper "
                            f"than {MAX_DEPTH} (shared or cyclic submodules?)")
        yield prefix, module
        kids = [(f"{prefix}{name}.", child) for name, child in module.children().items() if child is not None]
        for name_prefix, child in reversed(kids):
            if not isinstance(child, PickledObject):
                raise UserError(f"corrupt checkpoint: submodule {name_prefix[:-1]} is a {type(child).__name__}")
            stack.append((name_prefix, child, depth + 1))


def _flatten_state(root: PickledObject, prefix: str, path: Path) -> tuple[dict[str, torch.Tensor], collections.Counter]:
    """The flat state dict (floats as fp32) and a census of module classes.

    Tensors are views of the file's storage records, and many views may share one record; the fp32 copies
    made here are bounded by the file's size (every element needs at least one byte in it), so 2,000 views
    of one 2 MB fp16 record cannot ask for 8 GB.
    """
    out: dict[str, torch.Tensor] = {}
    census: collections.Counter = collections.Counter()
    budget = path.stat().st_size + (1 << 20)
    for sub, module in _iter_modules(root, path):
        census[module.class_path] += 1
        for key in ("_parameters", "_buffers"):
            entries = module.get(key) or {}
            if not isinstance(entries, dict):
                raise UserError(f"corrupt checkpoint: {prefix}{sub}{key} is a {type(entries).__name__}, not a dict")
            for name, tensor in entries.items():
                if tensor is None:
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise UserError(f"corrupt checkpoint: {prefix}{sub}{name} is a {type(tensor).__name__}, "
                                    "not a tensor")
                budget -= tensor.numel()
                if budget < 0:
                    raise UserError(f"refused to load: {path}'s tensors claim more elements than the file holds "
                                    "(overlapping views of one storage record; crafted file)")
                out[f"{prefix}{sub}{name}"] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
    return out, census


def _check_plain(value: Any, what: str, path: Path) -> None:
    """Refuse anything but bounded plain data (dict/list/tuple/str/number/None) in the yaml or names.

    A pickle can make a list that holds itself, or a DAG whose every level references the level below twice:
    printing or walking it would then never end. We visit every node once per path, within a budget.
    """
    budget = MAX_PLAIN_NODES
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0 or depth > 32:
            raise UserError(f"refused to load: {path}'s {what} is too large or nested too deeply "
                            "(shared or cyclic references?)")
        if isinstance(node, dict):
            stack.extend((x, depth + 1) for kv in node.items() for x in kv)
        elif isinstance(node, (list, tuple)):
            stack.extend((x, depth + 1) for x in node)
        elif node is not None and not isinstance(node, (str, int, float)):
            raise UserError(f"corrupt checkpoint: {path}'s {what} holds a {type(node).__name__}")


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
    keys = [k[:40] if isinstance(k, str) else type(k).__name__ for k in list(obj)[:8]]
    raise UserError(f"not a YOLOv7 checkpoint: {path} has no 'model' or 'ema' entry (keys: {keys})")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Safely load an official YOLOv7 training or deploy checkpoint."""
    path = Path(path)
    obj = _unpickle(path)
    model, key = _pick_model(obj, path)
    if model.class_path not in _MODEL_CLASSES:
        raise UserError(f"not a YOLOv7 checkpoint: the model is a '{model.class_path}', expected models.yolo.Model "
                        "(or models.yolo.SegmentationModel)")
    yaml = model.get("yaml")
    if not isinstance(yaml, dict) or "backbone" not in yaml or "head" not in yaml:
        raise UserError(f"checkpoint {path} has no embedded model yaml (backbone/head); cannot rebuild the network")
    _check_plain(yaml, "model yaml", path)
    nc = yaml.get("nc")
    if type(nc) is not int or not 1 <= nc <= MAX_NC:
        raise UserError(f"checkpoint {path}: the model yaml's 'nc' (number of classes) is {nc!r}; expected an "
                        f"integer in 1..{MAX_NC}")
    seq = model.children().get("model")
    if not isinstance(seq, PickledObject) or not seq.children():
        raise UserError(f"checkpoint {path} has no layers under model.model")
    head = list(seq.children().values())[-1]
    if not isinstance(head, PickledObject):
        raise UserError(f"checkpoint {path}: the last layer is a {type(head).__name__}, not a module")
    state, census = _flatten_state(seq, "model.", path)

    stride = head.get("stride")
    if stride is None:
        stride = model.get("stride")
    stride = _numbers(stride, "stride", path, limit=16)
    if not stride:
        raise UserError(f"checkpoint {path}: the Detect module has no stride")
    head_buffers = head.get("_buffers") or {}
    if "anchor_grid" in head_buffers:  # what the official forward multiplies by (pixels)
        anchors, scale = head_buffers["anchor_grid"], 1.0
    elif "anchors" in head_buffers:  # grid units
        anchors, scale = head_buffers["anchors"], torch.tensor(stride).view(-1, 1, 1)
    else:
        raise UserError(f"checkpoint {path}: the Detect module has no anchors")
    if not isinstance(anchors, torch.Tensor) or anchors.numel() == 0 or anchors.numel() % (2 * len(stride)) \
            or anchors.numel() > 2 * len(stride) * 64:
        raise UserError(f"checkpoint {path}: the Detect module's anchors do not form [{len(stride)} levels, n, 2]")
    anchors = anchors.float().reshape(len(stride), -1, 2) * scale
    bn_eps = [m.get("eps") for _, m in _iter_modules(seq, path) if m.class_name == "BatchNorm2d"]
    eps = bn_eps[0] if bn_eps and bn_eps[0] is not None else 1e-3
    if not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise UserError(f"checkpoint {path}: BatchNorm eps is {eps!r}; expected a number in (0, 1)")
    names = model.get("names")
    if names is None:
        names = [str(i) for i in range(nc)]
    _check_plain(names, "class names", path)
    if isinstance(names, dict):  # some forks store {id: name}
        try:
            names = [names[k] for k in sorted(names)]
        except TypeError as exc:
            raise UserError(f"checkpoint {path}: class-name ids are not all numbers") from exc
    if not isinstance(names, (list, tuple)):
        raise UserError(f"checkpoint {path}: class names are a {type(names).__name__}, not a list")
    names = [str(n) for n in names]
    check_weights(state, nc=nc, names=names, stride=stride, anchors_px=anchors, source=str(path))
    return Checkpoint(
        path=path, sha256=sha256_file(path), yaml=yaml, state_dict=state, names=names,
        stride=stride, anchors_px=anchors.tolist(), head_type=head.class_name, bn_eps=float(eps),
        source_key=key, module_census=dict(census),
        nm=int(head.get("nm") or 0) if head.class_name in SEGMENT_HEADS else 0,
        **_keypoint_facts(head, state, path),
    )


def _keypoint_facts(head: Any, state: dict[str, torch.Tensor], path: Path) -> dict:
    """nkpt and the keypoint-branch form of a pose head, from the pickled head (the official forward reads
    its attributes, not the yaml); the branch form is checked against the weights actually present."""
    if head.class_name not in KEYPOINT_HEADS:
        return {}
    nkpt = head.get("nkpt")
    if not isinstance(nkpt, int) or not 0 < nkpt <= 1000:
        raise UserError(f"checkpoint {path}: the pose head's keypoint count nkpt is {nkpt!r}; expected a positive int")
    prefix = next((k.rsplit(".m_kpt.", 1)[0] for k in state if ".m_kpt." in k), None)
    if prefix is None:
        raise UserError(f"checkpoint {path}: the pose head (IKeypoint) has no keypoint branch weights (m_kpt)")
    dw = f"{prefix}.m_kpt.0.0.conv.weight" in state  # Sequential(DWConv, Conv, ...) vs one nn.Conv2d
    return {"nkpt": nkpt, "dw_conv_kpt": dw}



def _numbers(value: Any, what: str, path: Path, limit: int) -> list[float]:
    """A short list of finite numbers from a tensor/list (the pickled Detect.stride), or a one-line error."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        if value.numel() > limit:
            raise UserError(f"checkpoint {path}: the Detect module's {what} has {value.numel()} values")
        return [float(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)) and len(value) <= limit \
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    raise UserError(f"checkpoint {path}: the Detect module's {what} is not a short list of numbers")


_TASK_WORDS = {"detect": "a detection", "segment": "an instance-segmentation", "pose": "a pose (keypoint)"}


def check_task(ckpt: Checkpoint, expected: str) -> None:
    """Refuse a checkpoint of another task than the one asked for ('auto' accepts any), in one line."""
    if expected in (None, "", "auto") or ckpt.task == expected:
        return
    if expected not in _TASK_WORDS:
        raise UserError(f"unknown task {expected!r}; choose auto, detect, segment or pose")
    raise UserError(f"{ckpt.path.name} is {_TASK_WORDS[ckpt.task]} checkpoint ({ckpt.head_type} head), not "
                    f"{_TASK_WORDS[expected]} one; drop --task {expected} or use --task {ckpt.task}")
