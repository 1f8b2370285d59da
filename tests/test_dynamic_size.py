"""--dynamic: batch, height and width chosen at run time (issue 8, item 4).

The head's grids come from the feature-map shapes inside the graph (Shape -> Range), so one ONNX serves every
stride-multiple size. Checked: ONNX Runtime output of the dynamic export equals the static export at several
sizes (raw output and with the portable NMS tail), a P6 model at two sizes against PyTorch, the size range
options, and the rectangular letterbox the runtimes use for such artifacts.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from exporter.errors import UserError
from exporter.onnx_export import resolve_dynamic_sizes
from exporter.options import ExportOptions, NmsOptions
from exporter.pipeline import run
from runtimes.preprocess import stride_fit

from conftest import OFFICIAL, TRAINED

SIZES = [(320, 320), (256, 384), (192, 128), (384, 256)]


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _batch(hw, n=2, seed=0):
    return np.random.default_rng(seed).random((n, 3, *hw), dtype=np.float32)


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("dyn")
    return run(ExportOptions(checkpoint=TRAINED, out_dir=out, imgsz=(320, 320), dynamic=True)).onnx_path


@pytest.mark.parametrize("hw", SIZES)
def test_dynamic_equals_static_export_in_onnxruntime(dynamic_onnx, hw, tmp_path):
    static = run(ExportOptions(checkpoint=TRAINED, out_dir=tmp_path, imgsz=hw, batch=2)).onnx_path
    x = _batch(hw)
    got = _session(dynamic_onnx).run(None, {"images": x})[0]
    ref = _session(static).run(None, {"images": x})[0]
    assert got.shape == ref.shape == (2, 3 * sum((hw[0] // s) * (hw[1] // s) for s in (8, 16, 32)), 10)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)  # pixels; same ops, grids computed vs folded


def test_dynamic_graph_takes_its_grids_from_the_feature_maps(dynamic_onnx):
    import onnx

    proto = onnx.load(str(dynamic_onnx))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Range") >= 6  # x and y cell ranges of each of the three levels
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) and d for d in (dims[0], dims[2], dims[3]))


def test_dynamic_with_portable_nms_tail_equals_static(tmp_path):
    """The NMS tail works on a dynamic-size graph too: same detections as the static export, per size."""
    dyn = run(ExportOptions(checkpoint=TRAINED, out_dir=tmp_path / "d", imgsz=(320, 320), dynamic=True,
                            nms=NmsOptions(mode="portable", conf=0.05))).onnx_path
    from runtimes.preprocess import preprocess, read_image

    from conftest import SHAPES

    images = [read_image(p) for p in sorted((SHAPES / "images" / "val").iterdir())[:2]]
    for hw in [(320, 320), (256, 384)]:
        static = run(ExportOptions(checkpoint=TRAINED, out_dir=tmp_path / f"s{hw[0]}", imgsz=hw, batch=2,
                                   nms=NmsOptions(mode="portable", conf=0.05))).onnx_path
        x, _ = preprocess(images, hw)
        got = dict(zip([o.name for o in _session(dyn).get_outputs()], _session(dyn).run(None, {"images": x})))
        ref = dict(zip([o.name for o in _session(static).get_outputs()], _session(static).run(None, {"images": x})))
        assert got["num_dets"].tolist() == ref["num_dets"].tolist() and ref["num_dets"].sum() > 0
        np.testing.assert_array_equal(got["det_classes"], ref["det_classes"])
        np.testing.assert_allclose(got["det_boxes"], ref["det_boxes"], atol=1e-2)
        np.testing.assert_allclose(got["det_scores"], ref["det_scores"], atol=1e-4)


def test_p6_dynamic_matches_pytorch_at_two_sizes(tmp_path):
    import torch

    from exporter.loading import load_fused

    ckpt = OFFICIAL / "dev_yolov7-w6_w00625_nc1.pt"
    onnx_path = run(ExportOptions(checkpoint=ckpt, out_dir=tmp_path, imgsz=(256, 256), dynamic=True)).onnx_path
    _, model = load_fused(ckpt)
    sess = _session(onnx_path)
    for hw in [(256, 256), (128, 320)]:
        x = _batch(hw, n=1, seed=1)
        with torch.no_grad():
            ref = model.eval()(torch.from_numpy(x))
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
        np.testing.assert_allclose(sess.run(None, {"images": x})[0], ref, rtol=1e-4, atol=2e-3)  # float32 at ~500 px


def test_size_range_defaults_and_checks():
    assert resolve_dynamic_sizes((640, 640), None, None, 32) == ((320, 320), (640, 640))
    assert resolve_dynamic_sizes((640, 640), None, None, 64) == ((320, 320), (640, 640))
    assert resolve_dynamic_sizes((352, 640), None, None, 64) == ((192, 320), (352, 640))  # half rounded up
    assert resolve_dynamic_sizes((640, 640), (256, 256), (1024, 1024), 32) == ((256, 256), (1024, 1024))
    with pytest.raises(UserError, match="not a multiple of the model's max stride 64"):
        resolve_dynamic_sizes((640, 640), (96, 96), None, 64)
    with pytest.raises(UserError, match="--min-img 512x512 <= --img 320x320"):
        resolve_dynamic_sizes((320, 320), (512, 512), None, 32)


def test_stride_fit_letterboxes_to_the_smallest_stride_multiple():
    assert stride_fit([(480, 640)], (640, 640), 32) == (480, 640)  # one 4:3 image: a quarter less input
    assert stride_fit([(720, 1280)], (640, 640), 32) == (384, 640)  # 360 rounded up to the stride
    assert stride_fit([(720, 1280)], (640, 640), 64, (320, 320)) == (384, 640)
    assert stride_fit([(100, 1000)], (640, 640), 32, (320, 320)) == (320, 640)  # never below the profile min
    assert stride_fit([(480, 640), (640, 480)], (640, 640), 32) == (640, 640)  # mixed batch: what holds both


def test_detector_letterboxes_dynamic_artifacts_to_a_stride_multiple(dynamic_onnx):
    from runtimes.base import Detector, open_backend

    image = np.full((480, 640, 3), 114, np.uint8)
    with Detector(open_backend(dynamic_onnx)) as det:
        assert det.info.dynamic_hw and det.info.min_imgsz == (160, 160)
        assert det.input_size([image]) == (256, 320)
        assert len(det.detect([image])) == 1  # runs at 256x320
