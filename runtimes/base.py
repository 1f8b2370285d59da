"""One face for every backend (PyTorch, ONNX Runtime, TensorRT), in the spirit of Polygraphy's runners.

A ``Backend`` runs a preprocessed batch and returns the contract's named outputs (raw access, for parity
checks). A ``Detector`` wraps a backend with the shared preprocessing, NMS (for raw-output artifacts) and
the mapping of boxes back to the original images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import Backend  # noqa: F401 - re-exported: the face every backend implements
from .contract import NMS_OUTPUTS, RAW_OUTPUT, ModelInfo
from .preprocess import Letterbox, preprocess, scale_boxes, stride_fit


@dataclass
class Detections:
    """Detections of one image, boxes in original-image pixels (x1, y1, x2, y2)."""

    boxes: np.ndarray  # [n, 4] float32
    scores: np.ndarray  # [n] float32
    classes: np.ndarray  # [n] int32
    # segmentation only: from postprocess, soft masks [n,H/4,W/4] at prototype resolution (network input);
    # after detect(), boolean masks [n,h,w] in the image's own pixels (runtimes/masks.py)
    masks: np.ndarray | None = None
    # pose only: keypoints [n,nkpt,3] (x, y, visibility); input pixels from postprocess, image pixels after detect()
    keypoints: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))

    def to_list(self, names: list[str]) -> list[dict]:
        out = [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 5), "class_id": int(c),
                "class_name": names[int(c)] if 0 <= int(c) < len(names) else str(int(c))}
               for b, s, c in zip(self.boxes, self.scores, self.classes)]
        if self.masks is not None and self.masks.dtype == bool:  # COCO RLE of each image-sized mask
            from .masks import rle_encode

            for record, mask in zip(out, self.masks):
                record["mask"] = rle_encode(mask)
        if self.keypoints is not None:  # [[x, y, visibility], ...] in the image's own pixels
            from .keypoints import keypoints_to_list

            for record, kpts in zip(out, self.keypoints):
                record["keypoints"] = keypoints_to_list(kpts)
        return out



@dataclass
class DetectConfig:
    """NMS settings used when the artifact outputs raw predictions (an in-graph NMS has its own)."""

    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    multi_label: bool = False
    agnostic: bool = False


def open_backend(path: str | Path, device: str = "cpu", **kwargs) -> Backend:
    """Pick the backend from the file: .pt/.pth -> PyTorch, .onnx -> ONNX Runtime, .engine/.plan -> TensorRT."""
    from .errors import UserError

    path = Path(path)

    suffix = path.suffix.lower()
    if not path.exists():
        raise UserError(f"artifact not found: {path}")
    if suffix in (".pt", ".pth"):
        from .torch_backend import TorchBackend

        return TorchBackend(path, device=device, **kwargs)
    if suffix == ".onnx":
        from .onnx_backend import OnnxBackend

        return OnnxBackend(path, device=device, **kwargs)
    if suffix in (".engine", ".plan", ".trt"):
        from .trt_backend import TrtBackend

        return TrtBackend(path, **kwargs)
    raise UserError(f"don't know how to run '{path.name}': expected a .pt checkpoint, .onnx, or .engine/.plan")


class Detector:
    """images in, detections out; the same steps whatever the backend."""

    def __init__(self, backend: Backend, config: DetectConfig | None = None):
        self.backend = backend
        self.config = config or DetectConfig()

    @classmethod
    def from_path(cls, path: str | Path, config: DetectConfig | None = None, device: str = "cpu", **kwargs) -> "Detector":
        return cls(open_backend(path, device=device, **kwargs), config)

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    def close(self) -> None:
        """Close the backend now (runtimes.backend: lifecycle); ``with Detector(...) as det:`` does it on exit."""
        self.backend.close()

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


    def detect(self, images_bgr: list[np.ndarray], config: DetectConfig | None = None) -> list[Detections]:
        """OpenCV BGR images (any sizes) -> detections in each image's own pixels.

        ``config``: NMS settings for this call instead of ``self.config`` (e.g. an evaluation protocol).
        """
        batch, boxes = preprocess(images_bgr, self.input_size(images_bgr))
        return self.detect_batch(batch, boxes, config)

    def input_size(self, images_bgr: list[np.ndarray]) -> tuple[int, int]:
        """The letterbox size for this batch: the artifact's own, or for a ``--dynamic`` artifact the smallest
        stride multiple that holds the batch (runtimes.preprocess.stride_fit)."""
        if not getattr(self.info, "dynamic_hw", False):
            return tuple(self.info.imgsz)
        return stride_fit([im.shape[:2] for im in images_bgr], tuple(self.info.imgsz), int(max(self.info.stride)),
                          self.info.min_imgsz)

    def detect_batch(self, batch: np.ndarray, letterboxes: list[Letterbox],
                     config: DetectConfig | None = None) -> list[Detections]:
        outputs = self.run(batch)
        return [self._scale(d, lb) for d, lb in zip(self.postprocess(outputs, config), letterboxes)]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Backend inference, split into the artifact's fixed batch size where it has one."""
        fixed = self.backend.fixed_batch
        if not fixed or fixed == len(batch):
            return self.backend.infer(batch)
        parts = []
        for start in range(0, len(batch), fixed):
            chunk = batch[start:start + fixed]
            n = len(chunk)
            if n < fixed:  # pad the last chunk; padded rows are dropped below
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
            parts.append({k: v[:n] for k, v in self.backend.infer(chunk).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def postprocess(self, outputs: dict[str, np.ndarray], config: DetectConfig | None = None) -> list[Detections]:
        """Contract outputs -> per-image detections in network-input pixels (``config`` as in detect)."""
        if self.info.task == "segment":  # + masks: in-graph det_masks, or decoded here from output + protos
            from .masks import decode_segment

            return [Detections(b, s, c, m) for b, s, c, m in decode_segment(outputs, self.info, config or self.config)]
        if self.info.task == "pose":  # + keypoints: in-graph det_kpts, or the official keypoint NMS here
            from .keypoints import decode_pose

            return [Detections(b, s, c, keypoints=k) for b, s, c, k in decode_pose(outputs, self.info,
                                                                                   config or self.config)]
        if all(k in outputs for k in NMS_OUTPUTS):
            num, boxes, scores, classes = (outputs[k] for k in NMS_OUTPUTS)
            result = []
            for i in range(len(num)):
                n = int(num[i].reshape(-1)[0])
                result.append(Detections(boxes[i, :n].astype(np.float32), scores[i, :n].astype(np.float32),
                                         classes[i, :n].astype(np.int32)))
            return result
        from .nms_reference import non_max_suppression

        c = config or self.config
        dets = non_max_suppression(outputs[RAW_OUTPUT], conf=c.conf, iou=c.iou, multi_label=c.multi_label,
                                   agnostic=c.agnostic, max_det=c.max_det, nc=self.info.nc)
        return [Detections(d[:, :4].astype(np.float32), d[:, 4].astype(np.float32), d[:, 5].astype(np.int32))
                for d in dets]

    @staticmethod
    def _scale(d: Detections, lb: Letterbox) -> Detections:
        masks = None
        if d.masks is not None:  # prototype resolution is exactly 1/4 of the network input
            from .masks import masks_to_image

            masks = masks_to_image(d.masks, (4 * d.masks.shape[1], 4 * d.masks.shape[2]), lb)
        keypoints = None
        if d.keypoints is not None:
            from .keypoints import scale_keypoints

            keypoints = scale_keypoints(d.keypoints, lb)
        return Detections(scale_boxes(d.boxes, lb), d.scores, d.classes, masks, keypoints)
