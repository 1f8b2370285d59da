"""Stage 3c (segmentation): instance masks inside the graph, after the NMS tail (graph surgery).

Input: a seg graph that already ends in an NMS tail built with ``append_nms(..., keep_raw=True)``, so it
still has the raw ``output`` [B,N,5+nc+nm] and ``protos`` [B,nm,Hp,Wp] beside the tail's outputs and
``det_indices`` [B,K] (row of each kept detection in N, -1 past num_dets). Added outputs:

* ``det_coefs`` float32 [B,K,nm]: the kept rows' mask coefficients times their objectness, exactly the
  official ``non_max_suppression`` columns 6: (``x[:, 5:] *= obj`` scales the coefficients too); zero past
  num_dets. With ``protos`` (kept as an output) a host can decode masks itself.
* ``det_masks`` float32 [B,K,Hp,Wp]: ``sigmoid(coef' @ protos)`` cropped to the box at prototype resolution
  (the official ``process_mask`` before its upsampling): pixel (i, j) is kept iff ``x1' <= j < x2'`` and
  ``y1' <= i < y2'`` with the box scaled by Wp/W, Hp/H (integer indices, no +0.5). Zero past num_dets (the
  tail's boxes are zero there, so the crop is empty). Soft values: threshold at 0.5 after upsampling.

The raw ``output`` is dropped from the outputs (N x (5+nc+nm) floats nobody needs once masks exist).
Everything here runs in FP32 (casts are added where an FP16 graph hands over FP16 tensors): the crop
compares pixel coordinates, and sigmoid(coef @ protos) near 0.5 is what decides a mask edge.
Batch: every gather is offset per image (flat index b*N + row), so a batch equals its images one by one.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from runtimes.contract import MASK_OUTPUTS, NMS_INDICES, NMS_OUTPUTS, PROTO_OUTPUT, RAW_OUTPUT

from .errors import UserError
from .nms_graph import Builder, export_like

PREFIX = "masks/"
DET_MASKS, DET_COEFS = MASK_OUTPUTS


class _Ops(Builder):
    """The NMS tails' node factory under its own prefix; outputs default to float32, ``name`` names one."""

    prefix = PREFIX

    def op(self, op: str, inputs: list, attrs: dict | None = None, dtype=np.float32, name: str | None = None,
           out_names: list[str] | None = None):
        return super().op(op, inputs, attrs, dtype=dtype, out_names=[name] if name else out_names)

    def slice(self, x, start: int, end: int, axis: int, dtype=np.float32):
        return super().slice(x, start, end, axis, dtype=dtype)

    def f32(self, x):
        return x if x.dtype == np.float32 else self.op("Cast", [x], {"to": onnx.TensorProto.FLOAT})

    def unsqueeze(self, x, axes: list[int], dtype=np.float32):
        """Several axes at once (the base class's takes one)."""
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(axes, np.int64)], dtype=dtype)
        return self.op("Unsqueeze", [x], {"axes": axes}, dtype=dtype)


def append_masks(proto: onnx.ModelProto, nc: int, nm: int, imgsz: tuple[int, int] | None = None) -> onnx.ModelProto:
    """NMS-tailed seg graph (with raw ``output``, ``protos``, ``det_indices``) -> + ``det_coefs``, ``det_masks``."""
    graph = gs.import_onnx(proto)
    outs = {t.name: t for t in graph.outputs}
    needed = [*NMS_OUTPUTS, NMS_INDICES, RAW_OUTPUT, PROTO_OUTPUT]
    missing = [n for n in needed if n not in outs]
    if missing:
        raise UserError(f"cannot add masks: the graph lacks {missing} (needs an NMS tail with det_indices, built "
                        f"with keep_raw=True, on a segmentation graph); outputs: {sorted(outs)}")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    o = _Ops(graph, opset)
    f32, i64 = np.float32, np.int64
    hp, wp = (int(imgsz[0]) // 4, int(imgsz[1]) // 4) if imgsz else ("Hp", "Wp")  # shape annotations only

    raw = o.f32(outs[RAW_OUTPUT])  # [B,N,5+nc+nm]
    protos = o.f32(outs[PROTO_OUTPUT])  # [B,nm,Hp,Wp]
    boxes = outs[NMS_OUTPUTS[1]]  # [B,K,4], zero past num_dets
    idx = outs[NMS_INDICES]  # [B,K] int32, -1 past num_dets

    # gather the kept rows: flat index b*N + row (rows past num_dets point at row 0 and are zeroed below)
    shape = o.op("Shape", [raw], dtype=i64)
    n_box = o.op("Gather", [shape, o.const(1, i64)], {"axis": 0}, dtype=i64)  # scalar N
    n_img = o.op("Gather", [shape, o.const([0], i64)], {"axis": 0}, dtype=i64)  # [1] B
    images = o.op("Range", [o.const(0, i64), o.op("Squeeze", [n_img] + ([o.const([0], i64)] if opset >= 13 else []),
                                                   {} if opset >= 13 else {"axes": [0]}, dtype=i64),
                            o.const(1, i64)], dtype=i64)
    col_images = o.op("Reshape", [images, o.const([-1, 1], i64)], dtype=i64)  # [B,1]
    rows = o.op("Cast", [idx], {"to": onnx.TensorProto.INT64}, dtype=i64)
    valid = o.op("GreaterOrEqual" if opset >= 12 else "Greater",
                 [rows, o.const(0 if opset >= 12 else -1, i64)], dtype=np.bool_)  # [B,K]
    safe_rows = o.op("Max", [rows, o.const(0, i64)], dtype=i64)
    flat_idx = o.op("Add", [o.op("Mul", [col_images, n_box], dtype=i64), safe_rows], dtype=i64)  # [B,K]
    width = o.op("Gather", [shape, o.const([2], i64)], {"axis": 0}, dtype=i64)  # [1]
    flat_raw = o.op("Reshape", [raw, o.op("Concat", [o.const([-1], i64), width], {"axis": 0}, dtype=i64)])
    picked = o.op("Gather", [flat_raw, flat_idx], {"axis": 0})  # [B,K,5+nc+nm]
    obj = o.slice(picked, 4, 5, 2)
    coef = o.slice(picked, 5 + nc, 5 + nc + nm, 2)
    valid3 = o.unsqueeze(valid, [2], dtype=np.bool_)
    det_coefs = o.op("Where", [valid3, o.op("Mul", [coef, obj]), o.const(0.0, f32)], name=DET_COEFS)  # [B,K,nm]

    # masks = sigmoid(coef' @ protos) at prototype resolution; Hp, Wp read from the protos tensor, so the
    # same tail serves --dynamic (H, W chosen at run time). Prototypes are exactly 1/4 of the input (Proto
    # upsamples the stride-8 level by 2), so the box scale is the constant 1/4 on both axes.
    pshape = o.op("Shape", [protos], dtype=i64)  # [4] = B, nm, Hp, Wp
    hw_p = o.op("Slice", [pshape, o.const([2], i64), o.const([4], i64), o.const([0], i64)], dtype=i64)  # [2]
    flat_protos = o.op("Reshape", [protos, o.const([0, nm, -1], i64)])  # [B,nm,Hp*Wp]
    logits = o.op("MatMul", [det_coefs, flat_protos])  # [B,K,Hp*Wp]
    soft = o.op("Sigmoid", [logits])
    bk = o.op("Slice", [o.op("Shape", [det_coefs], dtype=i64), o.const([0], i64), o.const([2], i64),
                        o.const([0], i64)], dtype=i64)  # [2] = B, K
    mshape = o.op("Concat", [bk, hw_p], {"axis": 0}, dtype=i64)
    soft = o.op("Reshape", [soft, mshape])  # [B,K,Hp,Wp]

    # crop to the box scaled to prototype pixels: keep (i, j) iff x1' <= j < x2' and y1' <= i < y2'
    pbox = o.op("Mul", [boxes, o.const(np.float32(0.25), f32)])  # [B,K,4]
    x1, y1, x2, y2 = (o.unsqueeze(o.slice(pbox, k, k + 1, 2), [3]) for k in range(4))  # [B,K,1,1]

    def index_line(k: int, shape: list[int]):
        n = o.op("Gather", [pshape, o.const(k, i64)], {"axis": 0}, dtype=i64)  # scalar Hp or Wp
        line = o.op("Cast", [o.op("Range", [o.const(0, i64), n, o.const(1, i64)], dtype=i64)],
                    {"to": onnx.TensorProto.FLOAT})
        return o.op("Reshape", [line, o.const(shape, i64)])

    cols, rows_ = index_line(3, [1, 1, 1, -1]), index_line(2, [1, 1, -1, 1])
    b = np.bool_
    in_x = o.op("And", [o.op("Not", [o.op("Less", [cols, x1], dtype=b)], dtype=b), o.op("Less", [cols, x2], dtype=b)],
                dtype=b)  # [B,K,1,Wp]
    in_y = o.op("And", [o.op("Not", [o.op("Less", [rows_, y1], dtype=b)], dtype=b), o.op("Less", [rows_, y2], dtype=b)],
                dtype=b)  # [B,K,Hp,1]
    inside = o.op("And", [in_x, in_y], dtype=b)  # [B,K,Hp,Wp]
    det_masks = o.op("Where", [inside, soft, o.const(0.0, f32)], name=DET_MASKS)

    det_coefs.dtype = det_masks.dtype = f32
    lead = list(boxes.shape[:2]) if boxes.shape and len(boxes.shape) == 3 else ["batch", "K"]
    det_masks.shape, det_coefs.shape = [*lead, hp, wp], [*lead, nm]
    keep = [outs[n] for n in (*NMS_OUTPUTS, NMS_INDICES)]
    graph.outputs = keep + [det_masks, det_coefs, outs[PROTO_OUTPUT]]
    return export_like(graph, proto)


def seg_nms_options(nms, requested_mode: str):
    """NMS settings for a seg model: a tail that reports det_indices, scores obj*cls (u7 seg NMS rule).

    ``--nms auto`` with an engine picks ``portable`` (plugin-free, builds in every TensorRT) instead of
    EfficientNMS_TRT, which cannot say which anchors it kept, so masks could not be gathered.
    """
    from dataclasses import replace

    mode = nms.mode
    if mode == "efficient":
        if requested_mode != "auto":
            raise UserError("--nms efficient cannot output masks (EfficientNMS_TRT does not report which anchors "
                            "it kept); use --nms portable for segmentation models")
        mode = "portable"
    # the u7 seg non_max_suppression has no single-class special case: score = obj * cls for nc == 1 too
    return replace(nms, mode=mode, obj_only_single_class=False)
