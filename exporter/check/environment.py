"""What the numbers were measured on: versions and the machine, for report.json (and why TensorRT is skipped)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

from ..artifacts import versions


def report_versions() -> dict[str, str]:
    """The manifest's versions plus the evaluation stack (imported here so they are listed)."""
    import cv2
    import faster_coco_eval
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    out = versions()
    out["faster-coco-eval"] = faster_coco_eval.__version__
    out["opencv"] = cv2.__version__
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(threads: int | None = None) -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = cpu_name()
    summary = f"{cpu}, {cores} CPU core(s) visible, torch threads {threads or torch.get_num_threads()}"
    summary += f", GPU {gpu}" if gpu else ", no GPU"
    short = gpu or f"{cpu.split('@')[0].strip()} x{cores}"
    return {"cpu": cpu, "cpu_cores": cores, "torch_threads": threads or torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform(), "summary": summary, "short": short}


def trt_unavailable_reason(library: str = "tensorrt") -> str | None:
    """None when TensorRT engines can run here, else why not (the report's skip reason).

    One probe for the whole project (runtimes.trt_env): it creates a builder, because the bindings import
    fine under the API stub or without native libraries.
    """
    from runtimes.trt_env import unavailable_reason

    return unavailable_reason(library)


def ort_device(device: str) -> str:
    """ONNX Runtime on CUDA only with onnxruntime-gpu; otherwise its CPU provider (stated in the report)."""
    if device == "cpu":
        return "cpu"
    import onnxruntime as ort

    return device if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
