"""FP16 ONNX: FP16 weights and compute, FP32 inputs/outputs, and the box decode kept in FP32.

Tool choice: NVIDIA modelopt's ONNX AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``).
* It installs cleanly here without its ``[onnx]`` extra (that extra pins an older onnx, onnxruntime-gpu and
  cupy): ``pip install nvidia-modelopt onnxscript lief`` leaves torch 2.13 CPU, onnx and onnxruntime as they
  are; ``modelopt.onnx`` needs just those two small packages to import.
* It is NVIDIA's converter for TensorRT's strongly typed mode: it inserts the Casts at the FP32/FP16
  boundaries, keeps initializers that overflow FP16 in FP32, and blocks nodes by exact name, which is what
  keeping "the decode and everything feeding NMS" in FP32 needs (onnxconverter-common can block nodes too,
  but is unmaintained and adds a Cast pair per blocked node).
* Its data-driven rule (keep nodes whose activations exceed ``data_max`` in FP32) needs a reference run on
  random inputs, which would make the artifact depend on random numbers; we switch it off
  (``data_max=inf``) and block the decode explicitly. The decode holds the large numbers (pixel
  coordinates up to the image size, anchor products); the convolutions' activations stay small.
The head convs themselves run in FP16; a Cast to FP32 sits between each head conv and the decode.
"""
from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..errors import UserError
from .graph import check_node_names, decode_nodes

log = logging.getLogger("yolo7_export")


def convert_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """FP32 raw graph -> mixed FP16 graph with FP32 ``images``/``output`` and an FP32 decode."""
    out = fp16_outside_decode(proto)
    n_fp16 = sum(1 for n in out.graph.node if n.op_type == "Conv")
    log.info("fp16: %d convs in FP16, %d decode nodes kept in FP32", n_fp16, len(decode_nodes(proto)))
    return out


def fp16_outside_decode(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Everything but the decode (and the graph's inputs/outputs) in FP16; also the remainder of a Q/DQ graph."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise UserError(f"--fp16/--int8 need NVIDIA modelopt's ONNX AutoCast ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0]}); install it with: pip install nvidia-modelopt onnxscript lief"
                        ) from exc
    check_node_names(proto)
    patterns = [f"^{re.escape(name)}$" for name in decode_nodes(proto)]
    with tempfile.TemporaryDirectory(prefix="yolo7_fp16_") as tmp, _quiet_modelopt():
        path = Path(tmp) / "model.onnx"
        onnx.save_model(proto, str(path))
        out = convert_to_mixed_precision(str(path), low_precision_type="fp16", nodes_to_exclude=patterns,
                                         data_max=np.inf, keep_io_types=True)
    # no yolo7_export metadata on this intermediate graph: facts travel as ModelInfo, the pipeline's finalize() writes it once
    return out


@contextlib.contextmanager
def _quiet_modelopt():
    """modelopt logs every node at INFO to stdout; keep it quiet unless we are at DEBUG ourselves."""
    level = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("modelopt")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in saved:
            lg.setLevel(lvl)
