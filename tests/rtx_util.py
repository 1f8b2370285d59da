"""Build an ONNX graph with TensorRT-RTX's real parser + builder in tests (no GPU needed).

TensorRT-RTX compiles ahead of time for named compute capabilities, so the builder runs on a CPU-only
machine; only deserializing / running the engine needs CUDA. Tests that build engines are marked
``trt_build`` and skip with ``rtx_skip_reason()`` when the RTX extra is not installed.

Usage::

    pytestmark = [pytest.mark.trt_build,
                  pytest.mark.skipif(rtx_skip_reason() is not None, reason=str(rtx_skip_reason()))]
    result = rtx_build(model_proto, shapes={"images": ((1, 3, 320, 320), (2, 3, 320, 320), (4, 3, 320, 320))})
    assert result.engine  # bytes of the serialized engine

Every successful build is counted (``BUILT``); ``tests/conftest.py`` prints the count at the end of the run.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TEST_TARGETS = ("sm86",)  # one target keeps test builds fast; the production default is a documented set
BUILT: list[str] = []  # one entry per engine built in this test session (label)
_LOCK = threading.Lock()


@dataclass
class RtxBuildResult:
    engine: bytes
    seconds: float
    version: str
    targets: tuple[str, ...]
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: dict[str, tuple[int, ...]] = field(default_factory=dict)


class RtxBuildError(AssertionError):
    """The RTX parser or builder rejected the graph; the message carries TensorRT's own errors."""


def rtx_skip_reason() -> str | None:
    """None when TensorRT-RTX's builder can run here, else why not (for ``pytest.mark.skipif``)."""
    try:
        import tensorrt_rtx_libs  # noqa: F401  (loads the native library before the bindings)
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError as exc:
        return f"TensorRT-RTX is not installed (pip install -e \".[rtx]\"): {exc}"
    return None


def _model_bytes(model) -> bytes:
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, (str, Path)):
        return Path(model).read_bytes()
    return model.SerializeToString()


def rtx_build(model, *, shapes: dict | None = None, targets: tuple[str, ...] = TEST_TARGETS,
              label: str = "") -> RtxBuildResult:
    """Parse + build ``model`` (ModelProto, bytes or path) with TensorRT-RTX for ``targets``.

    ``shapes`` maps an input name to (min, opt, max) shapes for a dynamic input; inputs with a dynamic
    dimension and no entry get a profile of their static dims with every dynamic dim = 1 (min/opt) .. 2 (max),
    so a graph with dynamic axes always builds. Raises ``RtxBuildError`` with the parser/builder errors.
    Goes through the production builder (``exporter.trt_build.build_plan``).
    """
    from exporter.errors import UserError
    from exporter.trt_build import build_plan

    t0 = time.perf_counter()
    try:
        plan = build_plan(_model_bytes(model), lib="rtx", targets=targets, shapes=shapes, fill_profile=True)
    except UserError as exc:
        raise RtxBuildError(str(exc)) from exc
    with _LOCK:
        BUILT.append(label or f"engine{len(BUILT) + 1}")
    return RtxBuildResult(plan.data, time.perf_counter() - t0, plan.version, tuple(plan.targets),
                          {t["name"]: tuple(t["shape"]) for t in plan.io if t["mode"] == "input"},
                          {t["name"]: tuple(t["shape"]) for t in plan.io if t["mode"] == "output"})
