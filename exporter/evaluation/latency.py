"""Latency and throughput of one artifact at one batch size: warm-up, then N timed runs.

Two clocks: *model* = the backend call on an already letterboxed batch (host wall time, copies to and from
the device included), and *end-to-end* = BGR images in, detections in original pixels out (letterbox +
inference + NMS + rescale, what an application sees). For a TensorRT engine a third, *engine*: the project's
one definition of "TensorRT latency" (:func:`engine_latency`, used by the harness and benchmarks/gpu_suite.py). Medians and tail percentiles, not means: shared machines have outliers. Peak memory:
on CPU the growth of the process's peak RSS over warm-up and runs (Linux VmHWM, reset through
/proc/self/clear_refs), on CUDA ``torch.cuda.max_memory_allocated`` (allocations made through torch only).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtimes.base import Detector
from runtimes.preprocess import preprocess


@dataclass
class LatencyResult:
    batch: int
    runs: int
    warmup: int
    model_ms: dict = field(default_factory=dict)  # p50, p90, p99, mean, min (per batch)
    e2e_ms: dict = field(default_factory=dict)
    fps: float = 0.0  # images/s from the model-only median
    fps_e2e: float = 0.0
    engine_ms: dict = field(default_factory=dict)  # TensorRT only: engine_latency (device time of one enqueue)
    peak_mem_mb: float | None = None
    mem_kind: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def percentiles(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1000.0
    return {"p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "min": float(ms.min())}


def time_calls(fn, runs: int, sync=lambda: None, after_each=lambda: None) -> list[float]:
    """Seconds taken by each of ``runs`` calls of ``fn`` (``sync`` waits for queued device work)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        after_each()
    return times


def warm_and_time(fn, runs: int, warmup: int) -> dict:
    """``warmup`` untimed calls, then :func:`percentiles` of ``runs`` timed ones (the benchmarks' clock)."""
    for _ in range(warmup):
        fn()
    return percentiles(time_calls(fn, runs))


def measure_latency(detector: Detector, images_bgr: list[np.ndarray], batch: int, runs: int = 30, warmup: int = 5,
                    progress: bool = True, desc: str = "latency", cuda: bool = False) -> LatencyResult:
    """Time ``detector`` on ``batch`` images (cycled from ``images_bgr``)."""
    from tqdm import tqdm

    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    imgs = [images_bgr[i % len(images_bgr)] for i in range(batch)]
    x, _ = preprocess(imgs, detector.info.imgsz)
    sync = _cuda_sync if cuda else (lambda: None)
    mem = MemoryPeak(cuda)  # around the warm-up too: that is where this batch size's buffers get allocated
    with mem, tqdm(total=2 * runs, desc=desc, unit="run", disable=not progress, leave=False) as bar:
        for _ in range(warmup):
            detector.run(x)
            detector.detect(imgs)
        sync()
        model_t = time_calls(lambda: detector.run(x), runs, sync, bar.update)
        e2e_t = time_calls(lambda: detector.detect(imgs), runs, sync, bar.update)
        engine = engine_latency(detector.backend, len(x), runs, warmup) if cuda and hasattr(
            detector.backend, "enqueue") else {}
    model, e2e = percentiles(model_t), percentiles(e2e_t)
    return LatencyResult(batch=batch, runs=runs, warmup=warmup, model_ms=model, e2e_ms=e2e,
                         fps=batch * 1000.0 / model["p50"], fps_e2e=batch * 1000.0 / e2e["p50"],
                         peak_mem_mb=mem.peak_mb, mem_kind=mem.kind, engine_ms=engine)


def device_times(fn, stream, runs: int, warmup: int, event=None, synchronize=None) -> list[float]:
    """Seconds of device time of each of ``runs`` calls of ``fn`` (which only queues work on ``stream``),
    measured by CUDA events recorded on that stream around each call, after ``warmup`` untimed calls.
    (``event``/``synchronize`` default to torch.cuda's; tests pass stand-ins.)"""
    if event is None or synchronize is None:
        import torch

        event = event or (lambda: torch.cuda.Event(enable_timing=True))
        synchronize = synchronize or torch.cuda.synchronize
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(runs):
        start, end = event(), event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)  # CUDA events report milliseconds
    return times


def engine_latency(backend, batch: int, runs: int, warmup: int, **events) -> dict:
    """**The** TensorRT latency of this project: device time, by CUDA events on the backend's stream, of one
    ``TrtBackend.enqueue(batch)`` on already bound device buffers (a CUDA-graph replay when the backend
    captures graphs). Not timed: host<->device copies, letterbox, host-side NMS, synchronisation. It is what
    trtexec reports as GPU Compute Time; :func:`percentiles` of it, in ms."""
    return percentiles(device_times(lambda: backend.enqueue(batch), backend.stream, runs, warmup, **events))


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


class MemoryPeak:
    """Peak memory growth over a block: CUDA allocator peak, or the process's peak RSS (Linux)."""

    _STATUS = Path("/proc/self/status")
    _CLEAR = Path("/proc/self/clear_refs")

    def __init__(self, cuda: bool):
        self.cuda, self.peak_mb, self.kind = cuda, None, ""

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._read("VmRSS")
            try:  # "5" resets VmHWM (peak RSS) to the current RSS; needs Linux >= 4.0
                self._CLEAR.write_text("5")
                self._reset = True
            except OSError:
                self._reset = False
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            self.peak_mb = round((torch.cuda.max_memory_allocated() - self._base) / 2**20, 2)
            self.kind = "cuda max_memory_allocated delta"
        elif self._base is not None and self._reset:
            peak = self._read("VmHWM")
            if peak is not None:
                self.peak_mb = round(max(peak - self._base, 0) / 2**20, 2)
                self.kind = "cpu peak RSS delta"
        return False

    def _read(self, key: str) -> int | None:
        try:
            for line in self._STATUS.read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None
