"""Real TensorRT engines on a real GPU (markers trt, gpu): skipped, with the reason, where either is missing.

Builds engines from the trained fixture checkpoint and compares them with ONNX Runtime on CPU. The wider
FP32/FP16/INT8 x batch matrix with timings is benchmarks/gpu_suite.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.errors import UserError
from exporter.options import ExportOptions, NmsOptions, TrtOptions
from runtimes import trt_env

pytestmark = [pytest.mark.trt, pytest.mark.gpu, pytest.mark.slow]

DATA = Path(__file__).resolve().parent / "data"
REASON = trt_env.unavailable_reason()
if REASON is None:
    try:
        import torch

        if not torch.cuda.is_available():
            REASON = "PyTorch has no CUDA (the TensorRT runtime keeps buffers in torch CUDA tensors)"
    except ImportError:
        REASON = "torch missing"
if REASON is not None:
    pytest.skip(f"needs TensorRT and a CUDA GPU: {REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def images():
    from runtimes.preprocess import list_images, preprocess, read_image

    paths = list_images(DATA / "shapes" / "images" / "val")[:4]
    return preprocess([read_image(p) for p in paths], (320, 320))[0]


@pytest.fixture(scope="module")
def fp32_engine(tmp_path_factory):
    from exporter.pipeline import run

    out = tmp_path_factory.mktemp("trt")
    opts = ExportOptions(checkpoint=DATA / "yolov7-tiny-shapes.pt", out_dir=out, imgsz=(320, 320), batch=2,
                         dynamic_batch=True, nms=NmsOptions(mode="none"),
                         trt=TrtOptions(enabled=True, max_batch=8, timing_cache=out / "timing.cache"))
    return run(opts)


def test_engine_matches_onnxruntime(fp32_engine, images):
    from exporter.evaluation.parity import compare_raw
    from runtimes.onnx_backend import OnnxBackend
    from runtimes.trt_backend import TrtBackend

    ref = OnnxBackend(fp32_engine.onnx_path).infer(images)["output"]
    got = TrtBackend(fp32_engine.engine_path).infer(images)["output"]
    stats = compare_raw(ref, got.astype(np.float32))
    assert stats["cosine"] > 0.9999 and stats["nonfinite"] == 0, stats  # TF32 convolutions allowed
    manifest = json.loads(fp32_engine.manifest_path.read_text())
    assert manifest["trtexec"].startswith("trtexec --onnx=") and (fp32_engine.onnx_path.parent / "timing.cache").stat().st_size


def test_cuda_graph_gives_the_same_outputs(fp32_engine, images):
    from runtimes.trt_backend import TrtBackend

    plain = TrtBackend(fp32_engine.engine_path).infer(images)["output"]
    graph = TrtBackend(fp32_engine.engine_path, cuda_graph=True)
    np.testing.assert_allclose(graph.infer(images)["output"], plain, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(graph.infer(images[:1])["output"], plain[:1], rtol=1e-3, atol=1e-2)  # own graph


def test_end_to_end_engine_with_efficient_nms(tmp_path, images):
    from exporter.pipeline import run
    from runtimes.base import Detector
    from runtimes.trt_backend import TrtBackend

    result = run(ExportOptions(checkpoint=DATA / "yolov7-tiny-shapes.pt", out_dir=tmp_path, imgsz=(320, 320),
                               nms=NmsOptions(mode="efficient"), trt=TrtOptions(enabled=True)))
    backend = TrtBackend(result.engine_path)
    outputs = Detector(backend).run(images[:1])
    assert set(outputs) == {"num_dets", "det_boxes", "det_scores", "det_classes"}
    n = int(outputs["num_dets"][0, 0])
    assert n > 0 and (outputs["det_scores"][0, :n] >= 0.25).all()


def test_sidecar_from_another_tensorrt_is_refused(fp32_engine, tmp_path):
    from runtimes.trt_backend import TrtBackend

    engine = tmp_path / "copy.engine"
    engine.write_bytes(fp32_engine.engine_path.read_bytes())
    side = json.loads(trt_env.sidecar_path(fp32_engine.engine_path).read_text())
    side["tensorrt"]["version"] = "9.0.0"
    trt_env.sidecar_path(engine).write_text(json.dumps(side))
    with pytest.raises(UserError, match="built for TensorRT 9.0.0"):
        TrtBackend(engine)
