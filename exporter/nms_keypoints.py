"""Stage 3c (pose): keypoints through the NMS tail, by graph surgery after ``append_nms``.

Input: a pose graph ending in an NMS tail built with ``append_nms(..., keep_raw=True)``: it still has the
raw ``output`` [B,N,5+nc+3*nkpt] beside the tail's outputs and ``det_indices`` [B,K] (each kept
detection's row in N, -1 past num_dets). Added output:

* ``det_kpts`` float32 [B,K,nkpt,3]: (x, y in input pixels, visibility) of each kept detection, exactly the
  raw output's keypoint columns of the kept row (what the official ``non_max_suppression_kpt`` copies into
  its rows 6:); zero past num_dets.

The gather is a ``GatherElements`` along N with the image axis untouched, so every image of a batch reads
its own rows: a batch equals its images one by one (tested with a mixed batch). Rows past num_dets read
row 0 (index clamped) and are zeroed. Everything is FP32 (an FP16/INT8 graph's raw output is FP32 already;
a cast is added if not). The raw ``output`` is dropped from the outputs afterwards.

EfficientNMS_TRT cannot be used: it does not report which anchors it kept (``pose_nms_options`` refuses
it, naming ``--nms portable``).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from runtimes.contract import KPT_OUTPUT, NMS_INDICES, NMS_OUTPUTS, RAW_OUTPUT

from .errors import UserError
from .nms_graph import Builder, export_like

PREFIX = "kpts/"


class _Ops(Builder):
    """The NMS tails' node factory under its own prefix; outputs default to float32, ``name`` names one."""

    prefix = PREFIX

    def op(self, op: str, inputs: list, attrs: dict | None = None, dtype=np.float32, name: str | None = None,
           out_names: list[str] | None = None):
        return super().op(op, inputs, attrs, dtype=dtype, out_names=[name] if name else out_names)


def append_keypoints(proto: onnx.ModelProto, nc: int, nkpt: int) -> onnx.ModelProto:
    """NMS-tailed pose graph (with raw ``output`` and ``det_indices``) -> + ``det_kpts`` [B,K,nkpt,3]."""
    graph = gs.import_onnx(proto)
    outs = {t.name: t for t in graph.outputs}
    missing = [n for n in (*NMS_OUTPUTS, NMS_INDICES, RAW_OUTPUT) if n not in outs]
    if missing:
        raise UserError(f"cannot add keypoints: the graph lacks {missing} (needs an NMS tail with det_indices, "
                        f"built with keep_raw=True, on a pose graph); outputs: {sorted(outs)}")
    raw = outs[RAW_OUTPUT]
    width = 5 + int(nc) + 3 * int(nkpt)
    if raw.shape and isinstance(raw.shape[-1], int) and raw.shape[-1] != width:
        raise UserError(f"cannot add keypoints: '{RAW_OUTPUT}' has {raw.shape[-1]} values per row, expected "
                        f"5 + {nc} classes + 3 x {nkpt} keypoints = {width}")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    o = _Ops(graph, opset)
    f32, i64 = np.float32, np.int64
    if raw.dtype != np.float32:
        raw = o.op("Cast", [raw], {"to": onnx.TensorProto.FLOAT})
    c = o.const
    kraw = o.op("Slice", [raw, c([5 + nc], i64), c([width], i64), c([2], i64)])  # [B,N,3*nkpt]
    rows = o.op("Cast", [outs[NMS_INDICES]], {"to": onnx.TensorProto.INT64}, dtype=i64)  # [B,K]
    valid = o.op("Greater", [rows, c(-1, i64)], dtype=np.bool_)  # [B,K]
    safe = o.op("Max", [rows, c(0, i64)], dtype=i64)
    index = o.op("Add", [o.unsqueeze(safe, 2, i64), c(np.zeros((1, 1, 3 * nkpt), np.int64), i64)], dtype=i64)
    picked = o.op("GatherElements", [kraw, index], {"axis": 1})  # [B,K,3*nkpt], image axis untouched
    kept = o.op("Where", [o.unsqueeze(valid, 2, np.bool_), picked, c(0.0, f32)])
    det_kpts = o.op("Reshape", [kept, c([0, 0, nkpt, 3], i64)], name=KPT_OUTPUT)
    boxes = outs[NMS_OUTPUTS[1]]
    lead = list(boxes.shape[:2]) if boxes.shape and len(boxes.shape) == 3 else ["batch", "K"]
    det_kpts.dtype, det_kpts.shape = f32, [*lead, nkpt, 3]
    graph.outputs = [outs[n] for n in (*NMS_OUTPUTS, NMS_INDICES)] + [det_kpts]
    return export_like(graph, proto)


def pose_nms_options(nms, requested_mode: str):
    """NMS settings for a pose model: a tail that reports det_indices, score = obj * cls (the official
    ``non_max_suppression_kpt`` has no single-class shortcut, unlike the detection NMS).

    ``--nms auto`` with an engine picks ``portable`` (plugin-free, builds in every TensorRT) instead of
    EfficientNMS_TRT, which cannot say which anchors it kept; an explicit ``--nms efficient`` is refused.
    """
    mode = nms.mode
    if mode == "efficient":
        if requested_mode != "auto":
            raise UserError("--nms efficient cannot output keypoints (EfficientNMS_TRT does not report which "
                            "anchors it kept); use --nms portable for pose models")
        mode = "portable"
    return replace(nms, mode=mode, obj_only_single_class=False)
