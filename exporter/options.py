"""Options of every stage as dataclasses: the CLI fills them, the pipeline passes them on, tests build them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import Literal

from runtimes.contract import HardwareCompat, NmsMode, Precision

from .onnx_export import DEFAULT_OPSET


@dataclass
class NmsOptions:
    """The NMS tail appended to the graph (nms_tail.py)."""

    mode: NmsMode | Literal["auto"] = "none"  # auto: resolved by pipeline.resolve_nms_mode
    conf: float = 0.25
    iou: float = 0.45
    topk: int = 100  # max detections per image (K)
    agnostic: bool = False
    best_class: bool = False  # onnx/portable tails: one label per box, like the official non_max_suppression
    # score = obj alone when nc == 1 (official detection rule: a single-class model's class output is never
    # trained). The official pose NMS and the u7 seg NMS use obj * cls always: those heads set it False.
    obj_only_single_class: bool = True
    candidates: int = 1024  # portable tail: pre-NMS candidate cap (<= 3840, TensorRT's TopK limit)


@dataclass
class CalibOptions:
    """INT8 calibration (precision/int8.py)."""

    source: Path | None = None  # folder, list file or COCO json
    num_images: int = 1024  # precision/calibrate.py: 1024 beat 512 on the tune splits
    method: Literal["percentile", "max", "entropy"] = "percentile"  # precision/calibrate.py says why percentile
    cache: Path | None = None
    max_drop: float | None = None  # --int8-max-drop (AP points, mAP50-95 x 100)
    eval_data: Path | None = None  # labelled set for --int8-max-drop (required; no image shared with source)


@dataclass
class TrtOptions:
    """TensorRT engine build (trt_build.py)."""

    enabled: bool = False
    workspace_gib: float | None = None
    opt_level: int | None = None
    timing_cache: Path | None = None
    version_compatible: bool = False
    hardware_compat: HardwareCompat = "none"  # one spelling: "none", never None
    opt_batch: int | None = None
    max_batch: int | None = None
    lib: str = "auto"  # --trt-lib auto | tensorrt | rtx; preflight() resolves 'auto' to the library it found
    arch: tuple[str, ...] | None = None  # --trt-arch (TensorRT-RTX targets, e.g. ('sm86', 'sm120'))


@dataclass
class CheckOptions:
    """--check: run the harness on what was just made (check/)."""

    enabled: bool = False
    data: Path | None = None
    max_map_drop: float | None = None
    max_latency_ms: float | None = None
    min_parity_cos: float | None = None


@dataclass
class ExportOptions:
    checkpoint: Path
    out_dir: Path = Path("out")
    imgsz: tuple[int, int] | None = None  # None: from the checkpoint (640, or 1280 for P6)
    batch: int = 1
    dynamic_batch: bool = False
    dynamic: bool = False  # --dynamic: batch, height and width chosen at run time
    min_imgsz: tuple[int, int] | None = None  # --min-img (--dynamic engine profile); default: half of --img
    max_imgsz: tuple[int, int] | None = None  # --max-img; default: --img
    opset: int = DEFAULT_OPSET
    simplify: bool = True
    precision: Precision = "fp32"
    nms: NmsOptions = field(default_factory=NmsOptions)
    calib: CalibOptions = field(default_factory=CalibOptions)
    trt: TrtOptions = field(default_factory=TrtOptions)
    check: CheckOptions = field(default_factory=CheckOptions)
    triton: Path | None = None
    task: str = "auto"  # --task: auto | detect | segment | pose; a checkpoint of another task is refused
    overwrite: bool = False  # --overwrite: replace an artifact made with other settings (artifacts.refuse_replacing)
