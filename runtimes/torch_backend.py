"""PyTorch backend: the checkpoint rebuilt with our own modules (the reference every artifact is checked against).

Loading goes through the exporter's safe loader, so running a ``.pt`` here executes nothing from its pickle.
``fuse=True`` runs the deploy graph that gets exported; ``fuse=False`` keeps BatchNorm, RepConv branches and
implicit layers, to check that fusing did not change the function.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import Backend
from .contract import PROTO_OUTPUT, RAW_OUTPUT, ModelInfo
from .errors import UserError


class TorchBackend(Backend):
    """Runs a YOLOv7 checkpoint in PyTorch; any batch size, raw ``output`` [B,N,5+nc]."""

    name = "pytorch"

    def __init__(self, path: str | Path, device: str = "cpu", fuse: bool = True, half: bool = False,
                 imgsz: tuple[int, int] | None = None, loaded: tuple | None = None):
        """``loaded``: the ``(Checkpoint, model)`` already loaded and fused from ``path`` (the pipeline's, for
        ``--check``), so a run loads and fuses a checkpoint once; ``path`` is then not read again."""
        from exporter.checkpoint import load_checkpoint
        from exporter.loading import check_image_size, default_imgsz, load_fused  # the model layer, not the pipeline
        from exporter.model import build_model

        self.device = _torch_device(device)
        if half and self.device.type != "cuda":
            raise UserError("half precision (FP16) in PyTorch needs --device cuda; on CPU run in FP32")
        if loaded is not None:
            ckpt, model = loaded
        elif fuse:
            ckpt, model = load_fused(Path(path))
        else:
            ckpt = load_checkpoint(Path(path))
            model = build_model(ckpt)
        size = check_image_size(tuple(imgsz) if imgsz else default_imgsz(ckpt), ckpt.max_stride)
        self.half = half
        self.model = model.to(self.device).eval()
        if half:
            self.model.half()
        self.info = ModelInfo(names=list(ckpt.names), stride=list(ckpt.stride), imgsz=size, nms="none",
                              precision="fp16" if half else "fp32", batch=None, source_sha256=ckpt.sha256,
                              task=ckpt.task, nm=ckpt.nm, nkpt=ckpt.nkpt)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        self._ensure_open()
        x = torch.from_numpy(
np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        if self.half:
            x = x.half()
        with torch.inference_mode():
            out = self.model(x)
        if isinstance(out, tuple):  # segmentation: (output, protos)
            return {RAW_OUTPUT: out[0].float().cpu().numpy(), PROTO_OUTPUT: out[1].float().cpu().numpy()}
        return {RAW_OUTPUT: out.float().cpu().numpy()}

    def _release(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()  # hand the cached blocks back now, for the next backend of a sweep

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device)}


def _torch_device(device: str):
    """'cpu', 'cuda' or 'cuda:N'; a clear error when CUDA was asked for but torch has none."""
    import torch


    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this PyTorch has no usable CUDA GPU "
                            f"(torch {torch.__version__}); use --device cpu")
        return torch.device(device)
    raise UserError(f"unknown device {device!r}: use cpu or cuda")
