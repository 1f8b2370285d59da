"""TensorRT-RTX engines RUN on an RTX-class GPU (markers trt, gpu): skipped, with the reason, elsewhere.

The builds themselves are checked on any machine by tests/test_rtx_build.py; here the engine built for this
GPU's compute capability is deserialized and run through runtimes.trt_backend and compared with ONNX Runtime.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.options import ExportOptions, NmsOptions, TrtOptions
from runtimes import trt_env

from rtx_util import rtx_skip_reason

pytestmark = [pytest.mark.trt, pytest.mark.gpu, pytest.mark.slow]

DATA = Path(__file__).resolve().parent / "data"


def _reason() -> str | None:
    if rtx_skip_reason() is not None:
        return rtx_skip_reason()
    device = trt_env.cuda_device()
    if device is None:
        return "no CUDA GPU here: TensorRT-RTX engines are built without one but run only on an RTX-class GPU"
    target = f"sm{device.compute_capability[0]}{device.compute_capability[1]}"
    if target not in trt_env.RTX_TARGETS:
        return f"{device.name} ({target}) is not a TensorRT-RTX target ({', '.join(trt_env.RTX_TARGETS)})"
    try:
        import torch
    except ImportError:
        return "torch missing"
    if not torch.cuda.is_available():
        return "PyTorch has no CUDA (the TensorRT runtime keeps buffers in torch CUDA tensors)"
    return None


REASON = _reason()
if REASON is not None:
    pytest.skip(f"running TensorRT-RTX engines: {REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def images():
    from runtimes.preprocess import list_images, preprocess, read_image

    paths = list_images(DATA / "shapes" / "images" / "val")[:4]
    return preprocess([read_image(p) for p in paths], (320, 320))[0]


def _build(tmp_path_factory, **kw):
    from exporter.pipeline import run

    out = tmp_path_factory.mktemp("rtx")
    opts = ExportOptions(checkpoint=DATA / "yolov7-tiny-shapes.pt", out_dir=out, imgsz=(320, 320), batch=2,
                         nms=NmsOptions(mode="none"), trt=TrtOptions(enabled=True, lib="rtx", max_batch=8), **kw)
    return run(opts)


def test_rtx_engine_matches_onnxruntime(tmp_path_factory, images):
    from runtimes.onnx_backend import OnnxBackend
    from runtimes.trt_backend import TrtBackend

    built = _build(tmp_path_factory, dynamic_batch=True)
    ref = OnnxBackend(built.onnx_path).infer(images)["output"]
    with TrtBackend(built.engine_path, cuda_graph=True) as backend:
        assert backend.describe()["library"] == "tensorrt-rtx"
        got = backend.infer(images)["output"]
        again = backend.infer(images)["output"]  # replayed graph (or normal launches if capture was refused)
    conf = ref[..., 4] > 0.1
    assert np.abs(got[conf][:, :4] - ref[conf][:, :4]).max() < 0.5
    np.testing.assert_allclose(again, got, atol=1e-4)


def test_rtx_dynamic_engine_runs_rectangular_batches(tmp_path_factory):
    from runtimes.base import Detector, open_backend
    from runtimes.preprocess import list_images, read_image

    built = _build(tmp_path_factory, dynamic=True)
    image = read_image(list_images(DATA / "shapes" / "images" / "val")[0])
    wide = np.concatenate([image, image], axis=1)  # 1:2 -> letterboxed to 160x320, not 320x320
    with Detector(open_backend(built.engine_path)) as det:
        assert det.input_size([wide])[0] < 320
        with Detector(open_backend(built.onnx_path)) as ref:
            got, exp = det.detect([wide])[0], ref.detect([wide])[0]
    assert len(got) == len(exp)
