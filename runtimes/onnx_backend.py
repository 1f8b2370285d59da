"""ONNX Runtime backend: runs our ONNX artifacts (raw output or with the ``--nms onnx`` tail).

Everything it needs to know (class names, input size, batch, NMS mode) comes from the artifact's own
metadata, written by the exporter; an ONNX without it is refused rather than guessed at. The session is
sequential and single-provider so repeated runs give the same numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import Backend
from .contract import INPUT_NAME, NMS_OUTPUTS, RAW_OUTPUT, ModelInfo
from .errors import UserError
from .metadata import info_from_props


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxBackend(Backend):
    """Runs one of our ONNX files in ONNX Runtime (CPU provider, or CUDA with onnxruntime-gpu)."""

    name = "onnxruntime"

    def __init__(self, model: str | Path | bytes | object, device: str = "cpu", threads: int | None = None):
        """``model``: a path, or an in-memory graph (serialized bytes, or an ``onnx.ModelProto``), so a tool that
        edits graphs (INT8 recovery) runs them without writing temp files."""
        import onnxruntime as ort

        if isinstance(model, (str, Path)):
            self.path: Path | None = Path(model)
            self.label = self.path.name
            if not self.path.is_file():
                raise UserError(f"ONNX file not found: {self.path}")
            source = str(self.path)
        else:  # ONNX Runtime takes the serialized model directly; a ModelProto is serialized here
            self.path, self.label = None, "the in-memory ONNX"
            source = model if isinstance(model, (bytes, bytearray)) else model.SerializeToString()
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # warnings about unused initializers etc. are noise to a user
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        providers = _providers(device)
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types for bad files and unknown ops
            raise UserError(_explain_load_failure(self.path, self.label, exc)) from exc
        if device.startswith("cuda") and "CUDAExecutionProvider" not in self.session.get_providers():
            raise UserError("--device cuda: onnxruntime could not start its CUDA provider (check the CUDA/cuDNN "
                            "libraries that onnxruntime-gpu needs); use --device cpu")
        self.device = device
        self.info = _read_info(self.session)
        self._check_io()

    # -- validation -------------------------------------------------------------------------------------
    def _check_io(self) -> None:
        """The graph must have our input and outputs; its shapes are the truth for size and batch."""
        inputs = self.session.get_inputs()
        outputs = {o.name for o in self.session.get_outputs()}
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise UserError(f"{self.label}: expected one input named '{INPUT_NAME}', found "
                            f"{[i.name for i in inputs]}; not a yolo7-export ONNX")
        wanted = [RAW_OUTPUT] if self.info.nms == "none" else list(NMS_OUTPUTS)
        missing = [name for name in wanted if name not in outputs]
        if missing:
            raise UserError(f"{self.label}: metadata says nms={self.info.nms!r} but the graph lacks outputs "
                            f"{missing} (has {sorted(outputs)}); not a yolo7-export ONNX or it was edited")
        shape = inputs[0].shape
        if len(shape) != 4:
            raise UserError(f"{self.label}: input '{INPUT_NAME}' has rank {len(shape)}, expected [B,3,H,W]")
        hw = tuple(shape[2:])
        if all(isinstance(s, int) for s in hw) and hw != tuple(self.info.imgsz):
            raise UserError(f"{self.label}: graph input is {hw[0]}x{hw[1]} but its metadata says "
                            f"{self.info.imgsz[0]}x{self.info.imgsz[1]}; the file was edited after export")
        # A fixed leading dimension means the artifact only takes that batch size (Detector.run splits/pads).
        self.info.batch = shape[0] if isinstance(shape[0], int) else None
        self._input_dtype = _ORT_TYPES.get(inputs[0].type, np.float32)
        self._output_names = [o.name for o in self.session.get_outputs()]

    # -- inference --------------------------------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self._ensure_open()
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise UserError(f"expected a batch [B,3,H,W], got shape {list(batch.shape)}")
        if self.info.dynamic_hw:  # --dynamic: any stride multiple (within the engine profile's minimum)
            stride, lo = int(max(self.info.stride)), tuple(self.info.min_imgsz or (0, 0))
            if any(s % stride or s < m for s, m in zip(batch.shape[2:], lo)):
                raise UserError(f"input is {batch.shape[2]}x{batch.shape[3]}; {self.label} takes multiples of "
                                f"{stride} from {lo[0]}x{lo[1]} (letterbox with runtimes.preprocess.stride_fit)")
        elif tuple(batch.shape[2:]) != tuple(self.info.imgsz):
            raise UserError(f"input is {batch.shape[2]}x{batch.shape[3]} but {self.label} was exported for "
                            f"{self.info.imgsz[0]}x{self.info.imgsz[1]} (letterbox images with runtimes.preprocess)")
        if self.info.batch is not None and len(batch) != self.info.batch:
            raise UserError(f"{self.label} has a fixed batch of {self.info.batch}, got {len(batch)} images "
                            "(use Detector.run, which splits and pads batches)")
        feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        values = self.session.run(self._output_names, feed)
        return {name: (v.astype(np.float32) if v.dtype == np.float16 else v)
                for name, v in zip(self._output_names, values)}

    def _release(self) -> None:
        self.session = None

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.session.get_providers() if self.session else []}


def _providers(device: str) -> list:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise UserError(f"--device {device} needs onnxruntime-gpu (pip install onnxruntime-gpu) and a CUDA GPU; "
                            f"this onnxruntime {ort.__version__} only has {', '.join(available)}")
        device_id = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    raise UserError(f"unknown device {device!r}: use cpu or cuda")


def _read_info(session) -> ModelInfo:
    """ModelInfo from the session's custom metadata (the one parser, runtimes.metadata; no onnx/torch import)."""
    return info_from_props(session.get_modelmeta().custom_metadata_map)



def _explain_load_failure(path: Path | None, label: str, exc: Exception) -> str:
    """One line for a user: a TensorRT-only graph, a foreign custom op, or a broken file."""
    text = str(exc)
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    if "EfficientNMS_TRT" in text:
        return (f"{label} ends in TensorRT's EfficientNMS_TRT plugin, which ONNX Runtime cannot run; export "
                "with --nms onnx (or --nms none) for ONNX Runtime, or build a TensorRT engine")
    if "protobuf" in text.lower() or "INVALID_PROTOBUF" in text:
        return f"not a valid ONNX file: {path or label} ({first})"
    return f"ONNX Runtime cannot load {label}: {first}"
