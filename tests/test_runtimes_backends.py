"""runtimes/: the trained shapes model through PyTorch and ONNX Runtime (raw and --nms onnx) gives the same
boxes, the boxes fit the labels, fixed-batch artifacts are split and padded, and bad ONNX files are refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from exporter.errors import UserError
from exporter.options import ExportOptions, NmsOptions
from exporter.pipeline import run
from runtimes.base import DetectConfig, Detections, Detector
from runtimes.contract import ModelInfo
from runtimes.onnx_backend import OnnxBackend
from runtimes.preprocess import preprocess, read_image
from runtimes.torch_backend import TorchBackend
from tests.conftest import SHAPES, TRAINED

IMGSZ = (320, 320)
VAL = sorted((SHAPES / "images" / "val").glob("*.jpg"))
CONF, IOU, MAX_DET = 0.25, 0.45, 300


def _export(out: Path, **kwargs) -> Path:
    nms = kwargs.pop("nms", NmsOptions())
    return run(ExportOptions(checkpoint=TRAINED, out_dir=out, imgsz=IMGSZ, nms=nms, **kwargs)).onnx_path


_VARIANTS = {
    "raw_dynamic": dict(dynamic_batch=True),
    "raw_batch4": dict(batch=4),
    "tail_best": dict(dynamic_batch=True, nms=NmsOptions(mode="onnx", conf=CONF, iou=IOU, topk=MAX_DET, best_class=True)),
    "tail_multi": dict(dynamic_batch=True, nms=NmsOptions(mode="onnx", conf=CONF, iou=IOU, topk=MAX_DET)),
}


class _Artifacts(dict):
    """The shapes model exported on first use, one way per key (each export ~4 s on 2 cores)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, key: str) -> Path:
        self[key] = _export(self.root / key, **_VARIANTS[key])
        return self[key]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> _Artifacts:
    return _Artifacts(tmp_path_factory.mktemp("runtimes_artifacts"))


@pytest.fixture(scope="module")
def torch_backend() -> TorchBackend:
    return TorchBackend(TRAINED, imgsz=IMGSZ)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """12 validation images of 7 different sizes (most not square)."""
    imgs = [read_image(p) for p in VAL[:12]]
    assert len({im.shape for im in imgs}) >= 5
    return imgs


def assert_same_detections(a: Detections, b: Detections, box_tol: float = 0.05, score_tol: float = 1e-4) -> None:
    """Same count; each detection of a has one in b with the same class, box within box_tol, score within tol.

    Matched one to one by box distance, so the order of (near-)equal scores does not matter.
    """
    assert len(a) == len(b), f"{len(a)} vs {len(b)} detections"
    free = np.ones(len(b), bool)
    for box, score, cls in zip(a.boxes, a.scores, a.classes):
        dist = np.abs(b.boxes - box).max(1)
        dist[~free | (b.classes != cls)] = np.inf
        j = int(np.argmin(dist)) if len(dist) else -1
        assert j >= 0 and dist[j] <= box_tol, f"no match for class {cls} box {box} (closest {dist.min():.4f} px)"
        assert abs(float(b.scores[j]) - float(score)) <= score_tol
        free[j] = False


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def yolo_labels(image_path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth classes and xyxy boxes in the image's pixels from its YOLO label file."""
    text = (SHAPES / "labels" / "val" / f"{image_path.stem}.txt").read_text().split()
    rows = np.array(text, dtype=np.float64).reshape(-1, 5)
    h, w = shape[:2]
    c, x, y, bw, bh = rows.T
    return c.astype(int), np.stack([(x - bw / 2) * w, (y - bh / 2) * h, (x + bw / 2) * w, (y + bh / 2) * h], 1)


# -- parity: PyTorch == ONNX Runtime -------------------------------------------------------------------

def test_raw_outputs_match_between_pytorch_and_onnxruntime(artifacts, torch_backend, images):
    batch, _ = preprocess(images, IMGSZ)
    ref = torch_backend.infer(batch)["output"]
    got = OnnxBackend(artifacts["raw_dynamic"]).infer(batch)["output"]
    assert ref.shape == got.shape == (12, 6300, 10)
    np.testing.assert_allclose(got[..., :4], ref[..., :4], rtol=0, atol=2e-3)  # pixels
    np.testing.assert_allclose(got[..., 4:], ref[..., 4:], rtol=0, atol=1e-4)  # probabilities


@pytest.mark.parametrize("artifact, multi_label", [("raw_dynamic", False), ("tail_best", False), ("tail_multi", True)])
def test_detections_identical_pytorch_vs_onnxruntime(artifacts, torch_backend, images, artifact, multi_label):
    config = DetectConfig(conf=CONF, iou=IOU, max_det=MAX_DET, multi_label=multi_label)
    ref = Detector(torch_backend, config).detect(images)
    onnx_detector = Detector(OnnxBackend(artifacts[artifact]), config)
    got = onnx_detector.detect(images)
    assert onnx_detector.info.nms == ("none" if artifact == "raw_dynamic" else "onnx")
    assert sum(len(d) for d in ref) >= 60, "the trained model should find shapes in these images"
    for r, g, im in zip(ref, got, images):
        assert_same_detections(r, g)
        h, w = im.shape[:2]
        assert (g.boxes >= 0).all() and (g.boxes[:, [0, 2]] <= w).all() and (g.boxes[:, [1, 3]] <= h).all()
    if multi_label:  # the multi-label run must actually exercise boxes kept under two classes somewhere
        assert sum(len(d) for d in ref) > sum(len(d) for d in Detector(torch_backend, DetectConfig()).detect(images))


def test_dynamic_batch_equals_one_by_one(artifacts, images):
    detector = Detector(OnnxBackend(artifacts["tail_best"]))
    together = detector.detect(images[:5])
    for im, d in zip(images[:5], together):
        assert_same_detections(detector.detect([im])[0], d, box_tol=1e-3, score_tol=1e-5)


def test_fixed_batch_artifact_is_split_and_padded(artifacts, images):
    backend = OnnxBackend(artifacts["raw_batch4"])
    assert backend.fixed_batch == 4 and backend.info.batch == 4
    calls = []
    infer = backend.infer
    backend.infer = lambda batch: calls.append(len(batch)) or infer(batch)
    got = Detector(backend).detect(images[:7])  # 4 + 3 (padded to 4, padding dropped)
    assert calls == [4, 4] and len(got) == 7
    ref = Detector(OnnxBackend(artifacts["raw_dynamic"])).detect(images[:7])
    for r, g in zip(ref, got):
        assert_same_detections(r, g, box_tol=1e-3, score_tol=1e-5)
    batch, _ = preprocess(images[:3], IMGSZ)
    with pytest.raises(UserError, match="fixed batch of 4, got 3"):
        infer(batch)


# -- the boxes are right: against the YOLO labels, in original-image pixels ------------------------------

def test_detections_match_labels_in_original_pixels(artifacts):
    """Recall and box fit on 40 images of 10 sizes. Measured: recall 0.56 at IoU 0.5 (class-aware; the small
    model misses many tiny shapes), precision of score >= 0.5 detections 0.835, median IoU of matches 0.862."""
    detector = Detector(OnnxBackend(artifacts["raw_dynamic"]), DetectConfig(conf=CONF, iou=IOU))
    paths = VAL[:40]
    imgs = [read_image(p) for p in paths]
    assert sum(im.shape[0] != im.shape[1] for im in imgs) >= 20
    n_gt = tp = n_conf = tp_conf = 0
    matched_iou = []
    for path, im, det in zip(paths, imgs, detector.detect(imgs)):
        gt_cls, gt_box = yolo_labels(path, im.shape)
        n_gt += len(gt_cls)
        if not len(det) or not len(gt_cls):
            continue
        iou = _box_iou(gt_box, det.boxes)
        iou[gt_cls[:, None] != det.classes[None, :]] = 0
        tp += int((iou.max(1) >= 0.5).sum())
        matched_iou += list(iou.max(1)[iou.max(1) >= 0.5])
        confident = det.scores >= 0.5
        n_conf += int(confident.sum())
        tp_conf += int((iou.max(0)[confident] >= 0.5).sum())
    recall, precision = tp / n_gt, tp_conf / n_conf
    assert recall > 0.5, f"recall {recall:.3f}"
    assert precision > 0.8, f"precision of score>=0.5 detections {precision:.3f}"
    # A letterbox mapping error (pad or scale) of a few pixels would pull the median IoU down hard.
    assert np.median(matched_iou) > 0.8, f"median IoU {np.median(matched_iou):.3f}"


# -- ONNX Runtime backend: what it reads and refuses --------------------------------------------------

def test_onnx_backend_reads_info_from_metadata(artifacts):
    backend = OnnxBackend(artifacts["tail_best"])
    assert backend.info.names == ["circle", "square", "triangle", "star", "cross"]
    assert backend.info.imgsz == IMGSZ and backend.info.batch is None and backend.info.nms == "onnx"
    assert backend.info.nms_params["best_class"] is True
    out = backend.infer(np.zeros((2, 3, *IMGSZ), np.float32))
    assert set(out) == {"num_dets", "det_boxes", "det_scores", "det_classes", "det_indices"}  # onnx tail: + indices
    assert out["num_dets"].shape == (2, 1) and out["det_boxes"].shape == (2, MAX_DET, 4)
    assert out["det_indices"].shape == (2, MAX_DET) and (out["det_indices"][:, int(out["num_dets"].max()):] == -1).all()


def test_onnx_backend_refuses_wrong_input_size(artifacts):
    backend = OnnxBackend(artifacts["raw_dynamic"])
    with pytest.raises(UserError, match="input is 640x640 but .* exported for 320x320"):
        backend.infer(np.zeros((1, 3, 640, 640), np.float32))
    with pytest.raises(UserError, match=r"expected a batch \[B,3,H,W\]"):
        backend.infer(np.zeros((3, 320, 320), np.float32))


def _tiny_onnx(path: Path, metadata: dict | None, output: str = "output", hw: tuple[int, int] = IMGSZ) -> Path:
    node = helper.make_node("Identity", ["images"], [output])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *hw])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, 3, *hw])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def test_foreign_onnx_is_refused(tmp_path):
    with pytest.raises(UserError, match="not made by yolo7-export"):
        OnnxBackend(_tiny_onnx(tmp_path / "foreign.onnx", None))
    ours = ModelInfo(names=["a"], stride=[8.0], imgsz=IMGSZ).to_metadata()
    with pytest.raises(UserError, match=r"lacks outputs \['output'\]"):
        OnnxBackend(_tiny_onnx(tmp_path / "renamed.onnx", ours, output="logits"))
    with pytest.raises(UserError, match="graph input is 640x640 but its metadata says 320x320"):
        OnnxBackend(_tiny_onnx(tmp_path / "edited.onnx", ours, hw=(640, 640)))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf" * 8)
    with pytest.raises(UserError, match="not a valid ONNX file"):
        OnnxBackend(tmp_path / "junk.onnx")


def test_efficient_nms_graph_gets_a_pointer_to_tensorrt(tmp_path):
    """ORT has no kernel for the TensorRT plugin: the error says what to do instead."""
    vi = helper.make_tensor_value_info
    node = helper.make_node("EfficientNMS_TRT", ["b", "s"], ["n", "db", "ds", "dc"], score_threshold=0.25,
                            iou_threshold=0.45, max_output_boxes=10, background_class=-1, score_activation=0,
                            box_coding=0, plugin_version="1")
    graph = helper.make_graph([node], "g", [vi("b", TensorProto.FLOAT, [1, 100, 4]), vi("s", TensorProto.FLOAT, [1, 100, 5])],
                              [vi("n", TensorProto.INT32, [1, 1]), vi("db", TensorProto.FLOAT, [1, 10, 4]),
                               vi("ds", TensorProto.FLOAT, [1, 10]), vi("dc", TensorProto.INT32, [1, 10])])
    path = tmp_path / "efficient.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UserError, match="EfficientNMS_TRT.*--nms onnx"):
        OnnxBackend(path)


def test_onnx_cuda_without_onnxruntime_gpu_is_a_clear_error(artifacts):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        OnnxBackend(artifacts["raw_dynamic"], device="cuda")
