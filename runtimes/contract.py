"""The IO contract every artifact of ours honours: tensor names, layouts and ONNX metadata keys.

The exporter writes it, runtimes/ read it, the check harness relies on it: change it here only.

Raw graph (``--nms none``):
    images  float32 [B,3,H,W]   RGB, 0..1, letterboxed (runtimes/preprocess.py)
    output  float32 [B,N,5+nc]  cx, cy, w, h (input pixels), objectness, class probabilities
End-to-end graph (``--nms efficient|onnx|portable``):
    num_dets int32 [B,1]; det_boxes float32 [B,K,4] (x1,y1,x2,y2 input pixels);
    det_scores float32 [B,K]; det_classes int32 [B,K]; rows past num_dets are zero.
    det_indices int32 [B,K] (``onnx`` and ``portable`` tails only; EfficientNMS_TRT cannot report it):
    the row of each kept detection in the raw output's N anchors, -1 past num_dets. Pose / segmentation
    gather keypoints or mask coefficients from the raw output by it.
Pose (task "pose"): ``output`` is [B,N,5+nc+3*nkpt] (keypoint j at 5+nc+3j: x, y input pixels, visibility),
    laid out like the official pose eval output; its NMS tails add det_kpts float32 [B,K,nkpt,3].
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

# One spelling per value: the Literal types annotate options and ModelInfo, the tuples are their values
# (CLI choices, metadata validation).
Task = Literal["detect", "pose", "segment"]
NmsMode = Literal["none", "efficient", "onnx", "portable"]
Precision = Literal["fp32", "fp16", "int8"]
HardwareCompat = Literal["none", "ampere+"]  # TensorRT hardware compatibility of an engine ("none": this GPU's)

INPUT_NAME = "images"
RAW_OUTPUT = "output"
NMS_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
PROTO_OUTPUT = "protos"  # segmentation: float32 [B,nm,H/4,W/4] prototype masks (beside `output`)
MASK_OUTPUTS = ("det_masks", "det_coefs")  # seg NMS tail: float32 [B,K,H/4,W/4] masks, [B,K,nm] coefficients
TASKS: tuple[str, ...] = get_args(Task)
NMS_INDICES = "det_indices"  # int32 [B,K]: kept detection's anchor row in the raw output, -1 past num_dets
KPT_OUTPUT = "det_kpts"  # pose NMS tail: float32 [B,K,nkpt,3] (x, y input pixels, visibility), zero past num_dets
NMS_MODES: tuple[str, ...] = get_args(NmsMode)
PRECISIONS: tuple[str, ...] = get_args(Precision)
HARDWARE_COMPAT: tuple[str, ...] = get_args(HardwareCompat)
META_PREFIX = "yolo7_export."


@dataclass
class ModelInfo:
    """What a runtime needs to know about an artifact, stored as ONNX metadata (and engine sidecars)."""

    names: list[str]
    stride: list[float]
    imgsz: tuple[int, int]  # (H, W) of the network input
    nms: NmsMode = "none"
    precision: Precision = "fp32"
    batch: int | None = 1  # None: dynamic batch
    source_sha256: str = ""
    tool_version: str = ""
    nms_params: dict = field(default_factory=dict)  # conf, iou, topk, agnostic, best_class
    task: Task = "detect"
    nm: int = 0  # segment: mask coefficients per detection (output rows are 5+nc+nm wide)
    nkpt: int = 0  # pose: keypoints per detection (output rows are 5+nc+3*nkpt wide: x, y, visibility each)
    dynamic_hw: bool = False  # --dynamic: H, W chosen at run time (stride multiples); imgsz = letterbox target
    min_imgsz: tuple[int, int] | None = None  # --dynamic: smallest (H, W) the artifact accepts (engine profile min)

    @property
    def nc(self) -> int:
        return len(self.names)

    def to_metadata(self) -> dict[str, str]:
        """Flat string dict (ONNX metadata_props only hold strings); values are JSON."""
        return {META_PREFIX + k: json.dumps(v, sort_keys=True) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> "ModelInfo":
        """Inverse of to_metadata; raises KeyError/ValueError if the metadata is not ours."""
        values = {k[len(META_PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(META_PREFIX)}
        if "names" not in values or "imgsz" not in values:
            raise KeyError("no yolo7-export metadata")
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        known["imgsz"] = tuple(known["imgsz"])
        if known.get("min_imgsz") is not None:
            known["min_imgsz"] = tuple(known["min_imgsz"])
        info = cls(**known)
        for value, allowed in ((info.nms, NMS_MODES), (info.precision, PRECISIONS), (info.task, TASKS)):
            if value not in allowed:  # a newer tool's value, or an edited file: refuse instead of guessing
                raise ValueError(f"metadata value {value!r} is not one of {', '.join(allowed)}")
        return info
