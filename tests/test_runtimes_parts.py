"""runtimes/ pieces: letterbox mapping back to original pixels, the PyTorch backend's options and errors,
and the drawing of boxes."""
from __future__ import annotations

import numpy as np
import pytest

from exporter.errors import UserError
from runtimes.base import Backend, DetectConfig, Detections, Detector
from runtimes.contract import ModelInfo
from runtimes.draw import class_color, draw_detections
from runtimes.preprocess import preprocess, read_image
from runtimes.torch_backend import TorchBackend
from tests.conftest import SHAPES, TRAINED

NAMES = ["circle", "square", "triangle", "star", "cross"]


class _ScriptedBackend(Backend):
    """Returns prepared raw predictions, as a model would that found exactly the given boxes."""

    name = "scripted"

    def __init__(self, imgsz: tuple[int, int], raw: np.ndarray):
        self.info = ModelInfo(names=NAMES, stride=[8.0, 16.0, 32.0], imgsz=imgsz, batch=None)
        self.raw = raw

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        assert batch.shape[2:] == self.info.imgsz
        return {"output": self.raw[: len(batch)]}


def _labels(stem: str, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.array((SHAPES / "labels" / "val" / f"{stem}.txt").read_text().split(), np.float64).reshape(-1, 5)
    c, x, y, bw, bh = rows.T
    return c.astype(int), np.stack([(x - bw / 2) * w, (y - bh / 2) * h, (x + bw / 2) * w, (y + bh / 2) * h], 1)


@pytest.mark.parametrize("imgsz", [(320, 320), (256, 416), (416, 256)])
def test_detector_maps_boxes_back_to_original_pixels(imgsz):
    """Label boxes of non-square images, placed in the network input by the letterbox geometry (computed
    here independently: scale min(H/h, W/w), centered padding), come back as the label boxes."""
    paths = [p for p in sorted((SHAPES / "images" / "val").glob("*.jpg"))[:40]]
    images, truth = [], []
    for p in paths:
        im = read_image(p)
        if im.shape[0] != im.shape[1] and (SHAPES / "labels" / "val" / f"{p.stem}.txt").read_text().strip():
            images.append(im)
            truth.append(_labels(p.stem, *im.shape[:2]))
        if len(images) == 6:
            break
    assert len({im.shape for im in images}) >= 3
    H, W = imgsz
    n = max(len(c) for c, _ in truth)
    raw = np.zeros((len(images), n, 5 + len(NAMES)), np.float32)
    for i, (im, (cls, box)) in enumerate(zip(images, truth)):
        h, w = im.shape[:2]
        r = min(H / h, W / w)
        inp = box * r + np.array([(W - w * r) / 2, (H - h * r) / 2] * 2)
        raw[i, : len(cls), :4] = np.c_[(inp[:, :2] + inp[:, 2:]) / 2, inp[:, 2:] - inp[:, :2]]
        raw[i, : len(cls), 4] = 0.9
        raw[i, np.arange(len(cls)), 5 + cls] = 1.0
    dets = Detector(_ScriptedBackend(imgsz, raw), DetectConfig(conf=0.25, iou=0.99)).detect(images)
    for (cls, box), d in zip(truth, dets):
        assert len(d) == len(cls)
        order = np.lexsort((d.boxes[:, 1], d.boxes[:, 0]))
        ref = np.lexsort((box[:, 1], box[:, 0]))
        # rounding of the resized size moves the padding by <= 0.25 input px, i.e. < 0.4 original px here
        np.testing.assert_allclose(d.boxes[order], box[ref], atol=0.4)
        assert (d.classes[order] == cls[ref]).all()


# -- PyTorch backend -----------------------------------------------------------------------------------

def test_torch_backend_info_and_unfused_parity():
    fused = TorchBackend(TRAINED, imgsz=(320, 256))
    assert fused.info.imgsz == (320, 256) and fused.info.batch is None and fused.info.nms == "none"
    assert fused.info.names == NAMES and fused.info.source_sha256
    unfused = TorchBackend(TRAINED, imgsz=(320, 256), fuse=False)
    assert fused.model.fused and not unfused.model.fused
    images = [read_image(p) for p in sorted((SHAPES / "images" / "val").glob("*.jpg"))[:2]]
    batch, _ = preprocess(images, fused.info.imgsz)
    a, b = fused.infer(batch)["output"], unfused.infer(batch)["output"]
    assert a.shape == (2, 3 * (40 * 32 + 20 * 16 + 10 * 8), 10) and a.dtype == np.float32
    np.testing.assert_allclose(a[..., :4], b[..., :4], rtol=0, atol=5e-3)
    np.testing.assert_allclose(a[..., 4:], b[..., 4:], rtol=0, atol=1e-4)


def test_torch_backend_default_size_and_errors():
    assert TorchBackend(TRAINED).info.imgsz == (640, 640)  # official default for P5 models
    with pytest.raises(UserError, match="not a multiple of the model's max stride 32"):
        TorchBackend(TRAINED, imgsz=(300, 320))
    with pytest.raises(UserError, match="needs --device cuda"):
        TorchBackend(TRAINED, half=True)
    with pytest.raises(UserError, match="unknown device"):
        TorchBackend(TRAINED, device="tpu")


def test_torch_cuda_unavailable_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UserError, match="no usable CUDA GPU"):
        TorchBackend(TRAINED, device="cuda")


@pytest.mark.gpu
def test_torch_cuda_half_matches_cpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    images = [read_image(p) for p in sorted((SHAPES / "images" / "val").glob("*.jpg"))[:4]]
    cpu = Detector(TorchBackend(TRAINED, imgsz=(320, 320))).detect(images)
    gpu = Detector(TorchBackend(TRAINED, imgsz=(320, 320), device="cuda", half=True)).detect(images)
    assert all(b.boxes.dtype == np.float32 for b in gpu)
    assert_same_detections(cpu, gpu)


def assert_same_detections(ref: list[Detections], got: list[Detections], box_px: float = 1.0,
                           score_tol: float = 0.02, sure: float = 0.35) -> None:
    """Every detection clearly above the threshold (score >= ``sure``) in either run is in the other: same class,
    box corners within ``box_px``, score within ``score_tol``. Only scores near the threshold may differ (FP16
    can move those across it), so the counts alone are not compared."""
    checked = 0
    for one, other in ((ref, got), (got, ref)):
        for a, b in zip(one, other):
            for box, score, cls in zip(a.boxes, a.scores, a.classes):
                if score < sure:
                    continue
                same = np.flatnonzero(b.classes == cls)
                assert len(same), f"class {cls} detection (score {score:.3f}) missing in the other run"
                err = np.abs(b.boxes[same] - box).max(1)
                j = int(err.argmin())
                assert err[j] <= box_px, f"box {box} moved by {err[j]:.2f} px"
                assert abs(b.scores[same[j]] - score) <= score_tol, f"score {score:.4f} vs {b.scores[same[j]]:.4f}"
                checked += 1
    assert checked, "no confident detection to compare"


def test_detection_comparison_can_fail():
    """The comparison used for CUDA FP16 vs CPU passes on equal runs and fails on moved boxes or scores."""
    images = [read_image(p) for p in sorted((SHAPES / "images" / "val").glob("*.jpg"))[:2]]
    cpu = Detector(TorchBackend(TRAINED, imgsz=(320, 320))).detect(images)
    assert_same_detections(cpu, cpu)
    moved = [Detections(d.boxes + 2.0, d.scores, d.classes) for d in cpu]
    with pytest.raises(AssertionError, match="moved"):
        assert_same_detections(cpu, moved)
    lower = [Detections(d.boxes, d.scores - 0.05, d.classes) for d in cpu]
    with pytest.raises(AssertionError, match="score"):
        assert_same_detections(cpu, lower)


# -- drawing -------------------------------------------------------------------------------------------

def test_class_colors_are_fixed_and_distinct():
    colors = [class_color(k) for k in range(20)]
    assert len(set(colors)) == 20 and class_color(3) == class_color(23) == colors[3]
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colors)


def test_draw_detections_draws_box_and_label_only():
    image = np.full((200, 300, 3), 40, np.uint8)
    dets = Detections(np.array([[50.0, 60.0, 150.0, 160.0]], np.float32), np.array([0.87], np.float32),
                      np.array([2], np.int32))
    out = draw_detections(image, dets, NAMES)
    assert (image == 40).all(), "the input image must not be modified"
    color = np.array(class_color(2), np.uint8)
    assert (out[110, 50] == color).all() and (out[160, 100] == color).all()  # left and bottom edges
    assert (out[100:150, 60:140] == 40).all(), "inside of the box untouched"
    assert (out[190:, :] == 40).all() and (out[:, 200:] == 40).all(), "far from the box untouched"
    ys, xs = np.nonzero((out[:60] == color).all(-1))  # label background: just above the box, from its left edge
    assert ys.min() >= 35 and xs.min() == 50 and 30 < xs.max() - xs.min() < 100
    label = out[ys.min():60, xs.min():xs.max() + 1]
    text = ~(label == color).all(-1) & ~(label == 40).all(-1)
    assert text.sum() > 30, "the label text is drawn in a contrasting colour"
    np.testing.assert_array_equal(draw_detections(image, Detections.empty(), NAMES), image)
