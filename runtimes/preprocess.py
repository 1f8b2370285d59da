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

from .errors import UserError

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
    # At least one pixel per side: a 1x10000 strip scales to 0.03 px high, which cv2.resize refuses.
    new_w, new_h = max(1, int(round(w0 * r))), max(1, int(round(h0 * r)))
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


def stride_fit(shapes: list[tuple[int, int]], size: tuple[int, int], stride: int,
               min_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Input (H, W) for a batch of images of ``shapes`` (h, w) into a dynamic-size artifact (``--dynamic``).

    Each image is scaled as into ``size`` (same ratio as the square letterbox, so the same pixels reach the
    model); the batch input is the smallest stride multiple holding every scaled image (the official
    rectangular inference), never below ``min_size`` (the engine profile's minimum) nor above ``size``.
    A single 4:3 image at 640 becomes 480x640 instead of 640x640: a quarter less padding to compute.
    """
    H, W = size
    need_h = need_w = 0
    for h0, w0 in shapes:
        r = min(H / h0, W / w0)
        need_h, need_w = max(need_h, int(round(h0 * r))), max(need_w, int(round(w0 * r)))
    lo_h, lo_w = min_size or (stride, stride)
    fit_h = min(H, max(lo_h, -(-need_h // stride) * stride))
    fit_w = min(W, max(lo_w, -(-need_w // stride) * stride))
    return fit_h, fit_w


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


class ImageReadError(UserError, ValueError):
    """An image that cannot be read: bad input, so one line and exit 2 wherever it surfaces."""


_TAIL = 4096  # bytes read from the end of a file to find its end marker (trailing junk after it is allowed)


def truncated_image(path: str | Path) -> str | None:
    """Why ``path`` looks cut short (JPEG without its EOI marker, PNG without IEND), or None.

    OpenCV decodes a truncated JPEG into a half-gray image with only a libjpeg warning, so a dataset with one
    would load, then score wrong numbers; reading the file's last few KB catches it before any work is done.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    marker = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND"}.get(suffix)
    if marker is None:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if marker not in tail:
        return f"truncated or damaged {'PNG' if suffix == '.png' else 'JPEG'} (no end-of-image marker)"
    return None


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
        return read_list_file(source)
    return []


MAX_LIST_LINE = 4096  # PATH_MAX / NAME_MAX on Linux: longer lines or names cannot be paths (os.stat fails on them)
MAX_NAME = 255


def read_list_file(source: Path) -> list[Path]:
    """A .txt list: one image path per line (UTF-8), blank lines skipped; a relative path is relative to the
    list file's folder (not the current directory), so a list moves together with its images."""
    try:
        text = source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{source}: not UTF-8 text (byte {exc.start}); expected one image path per line") from None
    except OSError as exc:
        raise UserError(f"cannot read list file {source}: {exc.strerror or exc}") from None
    paths = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if (len(line) > MAX_LIST_LINE or "\0" in line
                or any(len(part.encode("utf-8", "surrogateescape")) > MAX_NAME for part in Path(line).parts)):
            raise UserError(f"{source}:{n}: not a file path ({len(line)} characters); expected one image path per line")
        paths.append(Path(line) if Path(line).is_absolute() else source.parent / line)
    return paths
