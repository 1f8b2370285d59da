"""The one preprocessing and box-mapping path used by every backend, by calibration and by the harness.

Letterbox with gray 114 padding (the official ``letterbox(auto=False)``: centered, the same rounding),
BGR -> RGB, HWC -> CHW, /255, batched NCHW float32. Calibrating on anything else (e.g. stretched images)
quantizes for inputs the deployed model never sees.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PAD_VALUE = 114


@dataclass(frozen=True)
class Letterbox:
    """How one image was mapped into the network input: scale, then pad (left, top)."""

    ratio: float
    pad: tuple[float, float]  # (dw, dh) in input pixels
    orig_shape: tuple[int, int]  # (h, w) of the original image


def letterbox(image: np.ndarray, size: tuple[int, int], color: int = PAD_VALUE) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio to fit (H, W), pad the rest; same geometry as the official letterbox.

    Shrinking uses INTER_AREA and enlarging INTER_LINEAR, as the official dataset loader (test.py) does.
    """
    h0, w0 = image.shape[:2]
    H, W = size
    r = min(H / h0, W / w0)
    new_w, new_h = int(round(w0 * r)), int(round(h0 * r))
    if (new_w, new_h) != (w0, h0):
        interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (new_w, new_h), interpolation=interp)
    dw, dh = (W - new_w) / 2, (H - new_h) / 2
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(color, color, color))
    return image, Letterbox(ratio=r, pad=(dw, dh), orig_shape=(h0, w0))


def to_tensor(images_rgb_u8: list[np.ndarray]) -> np.ndarray:
    """[H,W,3] uint8 RGB images of equal size -> float32 [B,3,H,W] in 0..1."""
    batch = np.stack(images_rgb_u8).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32) / np.float32(255.0)


def preprocess(images_bgr: list[np.ndarray], size: tuple[int, int]) -> tuple[np.ndarray, list[Letterbox]]:
    """OpenCV BGR images -> network batch [B,3,H,W] float32 and each image's letterbox."""
    boxed, infos = [], []
    for img in images_bgr:
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        out, lb = letterbox(img[..., :3], size)
        boxed.append(out[..., ::-1])
        infos.append(lb)
    return to_tensor(boxed), infos


def scale_boxes(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """xyxy boxes in network-input pixels -> original image pixels, clipped to the image."""
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    out[:, [0, 2]] -= lb.pad[0]
    out[:, [1, 3]] -= lb.pad[1]
    out /= lb.ratio
    h, w = lb.orig_shape
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


class ImageReadError(ValueError):
    pass


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as BGR uint8; a clear error instead of OpenCV's silent None."""
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if img is None:
        raise ImageReadError(f"cannot read image: {path}")
    return img


def list_images(source: str | Path) -> list[Path]:
    """A folder (sorted, non-recursive), a single image, or a text file listing image paths."""
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [source]
    if source.suffix.lower() == ".txt" and source.is_file():
        base = source.parent
        lines = [ln.strip() for ln in source.read_text().splitlines() if ln.strip()]
        return [Path(ln) if Path(ln).is_absolute() else base / ln for ln in lines]
    return []
