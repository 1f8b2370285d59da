"""A Triton Inference Server model repository for one artifact: how users scale serving past one machine.

Layout: ``<root>/<name>/config.pbtxt`` + ``<root>/<name>/1/model.onnx|model.plan``. The config's IO is
read from the artifact itself (the ONNX graph, or the engine's build sidecar), never assumed, so it
matches what Triton finds when it loads the model. Batching follows Triton's rule: a dynamic batch dim
becomes ``max_batch_size`` > 0, dims without the batch dim, and ``dynamic_batching``; a fixed batch is
served as is (``max_batch_size: 0``, full dims).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from runtimes.contract import ModelInfo

from .artifacts import atomic_path, write_bytes_atomic
from .errors import UserError

DEFAULT_MAX_BATCH = 32  # ONNX with a dynamic batch has no upper bound of its own; engines use their profile max
PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx", "onnx"),
             ".engine": ("tensorrt_plan", "model.plan", "trt"), ".plan": ("tensorrt_plan", "model.plan", "trt")}
# onnx.TensorProto element type -> Triton DataType
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 6: "TYPE_INT32", 7: "TYPE_INT64", 3: "TYPE_INT8",
              2: "TYPE_UINT8", 9: "TYPE_BOOL", 16: "TYPE_BF16"}
# tensorrt.DataType member name (as the build sidecar records it) -> Triton DataType
TRT_TYPES = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT32": "TYPE_INT32",
             "INT64": "TYPE_INT64", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton TYPE_*
    shape: tuple[int, ...]  # -1 for a dynamic dimension, batch first


def model_name(artifact: Path) -> str:
    """'yolov7.int8.onnx' -> 'yolov7_int8_onnx': Triton names are folder names; keep them plain."""
    suffix = PLATFORMS[artifact.suffix.lower()][2]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", artifact.stem) + f"_{suffix}"


def write_triton_repository(root: Path, artifact: Path, info: ModelInfo, name: str | None = None,
                            max_batch_size: int | None = None) -> Path:
    """Write ``<root>/<name>/`` for ``artifact`` (.onnx, .engine or .plan); returns the model folder."""
    artifact = Path(artifact)
    suffix = artifact.suffix.lower()
    if suffix not in PLATFORMS:
        raise UserError(f"Triton repository: don't know how to serve '{artifact.name}' (expected .onnx or .engine)")
    if not artifact.is_file():
        raise UserError(f"Triton repository: artifact not found: {artifact}")
    platform, filename, _ = PLATFORMS[suffix]
    if suffix == ".onnx":
        if info.nms == "efficient":
            raise UserError(f"{artifact.name} ends in EfficientNMS_TRT, which Triton's onnxruntime backend cannot run; "
                            f"serve the TensorRT engine (--trt) or export with --nms onnx")
        inputs, outputs, engine_max = *onnx_io(artifact), None
    else:
        inputs, outputs, engine_max = engine_io(artifact)
    batch = 0  # fixed batch: served as is
    if inputs[0].shape[0] < 0:
        if max_batch_size and engine_max and max_batch_size > engine_max:
            raise UserError(f"max_batch_size {max_batch_size} exceeds the engine's profile max batch {engine_max}")
        batch = max_batch_size or engine_max or DEFAULT_MAX_BATCH
    name = name or model_name(artifact)
    text = render_config(name, platform, batch, inputs, outputs, info, gpu=platform == "tensorrt_plan")
    folder = Path(root) / name
    with atomic_path(folder / "1" / filename) as tmp:
        shutil.copyfile(artifact, tmp)
    write_bytes_atomic(folder / "config.pbtxt", text.encode())
    return folder


def onnx_io(path: Path) -> tuple[list[Tensor], list[Tensor]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in graph.initializer}

    def tensors(values):
        out = []
        for v in values:
            if v.name in init:
                continue
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(Tensor(v.name, ONNX_TYPES.get(t.elem_type, f"TYPE_INVALID({t.elem_type})"), dims))
        return out

    return tensors(graph.input), tensors(graph.output)


def engine_io(path: Path) -> tuple[list[Tensor], list[Tensor], int | None]:
    """IO and profile max batch from the engine's build sidecar (reading the plan itself needs a GPU)."""
    side = path.with_name(path.name + ".json")
    try:
        data = json.loads(side.read_text())
        io = data["io"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"Triton repository: {side.name} (the engine's build record, with its IO) is missing or "
                        f"unreadable ({type(exc).__name__}); rebuild the engine with yolo7-export --trt") from None
    tensors = {m: [Tensor(t["name"], TRT_TYPES.get(t["dtype"], "TYPE_INVALID"), tuple(int(d) for d in t["shape"]))
                   for t in io if t["mode"] == m] for m in ("input", "output")}
    profile = (data.get("build") or {}).get("profile")
    return tensors["input"], tensors["output"], int(profile["max"][0]) if profile else None


def render_config(name: str, platform: str, max_batch_size: int, inputs: list[Tensor], outputs: list[Tensor],
                  info: ModelInfo, gpu: bool = False) -> str:
    """config.pbtxt in protobuf text format (inference.ModelConfig)."""
    skip = 1 if max_batch_size > 0 else 0

    def block(t: Tensor) -> str:
        dims = ", ".join(str(d) for d in t.shape[skip:])
        return f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {dims} ]\n  }}'

    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(block(t) for t in inputs), "]",
             "output [", ",\n".join(block(t) for t in outputs), "]"]
    if max_batch_size > 0:
        lines.append("dynamic_batching { }")
    if gpu:
        lines.append("instance_group [ { kind: KIND_GPU, count: 1 } ]")
    params = {"names": info.names, "imgsz": list(info.imgsz), "nms": info.nms, "nms_params": info.nms_params,
              "precision": info.precision, "letterbox": "square, gray 114, RGB 0..1 (yolo7-export runtimes.preprocess)"}
    for key, value in params.items():
        lines.append(f'parameters {{ key: "yolo7_export.{key}" value {{ string_value: {_quote(json.dumps(value))} }} }}')
    return "\n".join(lines) + "\n"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
