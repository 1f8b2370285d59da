"""Instance masks on the runtime side: host-side decode, back to the original image, RLE, drawing.

Masks leave an end-to-end graph at prototype resolution (``det_masks`` [B,K,H/4,W/4], soft, already cropped
to the box; exporter/nms_masks.py). For a raw seg graph (``output`` + ``protos``) the same decode runs here in
numpy (``seg_nms`` + ``crop_masks``), with the official u7 seg NMS rules (score obj*cls, coefficients x obj).

To the original image: bilinear upsample to the network input (``align_corners=False``, what the official
``process_mask(upsample=True)`` does), cut the letterbox padding away, resize to the image's own size, then
threshold at 0.5. Thresholding once, at the end, keeps edges sub-pixel accurate on any image size (the
official predict.py thresholds at input size first; the two differ by at most the edge pixels).
"""
from __future__ import annotations

import cv2
import numpy as np

from .nms_reference import MAX_NMS, MAX_WH, _greedy, xywh2xyxy
from .preprocess import Letterbox


def seg_nms(raw: np.ndarray, nc: int, conf: float = 0.25, iou: float = 0.45, max_det: int = 300,
            multi_label: bool = False, agnostic: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """The u7 seg ``non_max_suppression`` on raw [B,N,5+nc+nm] -> per image (rows [n,6], coefs' [n,nm]).

    Rows are x1,y1,x2,y2,score,cls (score = obj*cls for every nc, single-class included: the u7 seg tree has
    no single-class rule); coefs' = raw coefficients x obj (the official ``x[:, 5:] *= obj``).
    """
    raw = np.asarray(raw, np.float32)
    thr = np.float32(conf)
    out = []
    for x in raw:
        x = x[x[:, 4] > thr]
        scores = x[:, 5:5 + nc] * x[:, 4:5]
        coefs = x[:, 5 + nc:] * x[:, 4:5]
        box = xywh2xyxy(x[:, :4])
        if multi_label and nc > 1:
            i, j = np.nonzero(scores > thr)
            det_score = scores[i, j]
        else:
            j = scores.argmax(1) if len(x) else np.zeros(0, np.int64)
            i = np.arange(len(x))
            det_score = scores[i, j]
            sel = det_score > thr
            i, j, det_score = i[sel], j[sel], det_score[sel]
        order = np.argsort(-det_score, kind="stable")[:MAX_NMS]
        i, j, det_score = i[order], j[order], det_score[order]
        offset = j[:, None].astype(np.float32) * np.float32(0 if agnostic else MAX_WH)
        keep = _greedy(box[i] + offset, iou, max_keep=max_det)
        i, j = i[keep], j[keep]
        rows = np.concatenate([box[i], det_score[keep, None], j[:, None].astype(np.float32)], 1).astype(np.float32)
        out.append((rows, coefs[i].astype(np.float32)))
    return out


def crop_masks(protos: np.ndarray, coefs: np.ndarray, boxes: np.ndarray, imgsz: tuple[int, int]) -> np.ndarray:
    """sigmoid(coefs @ protos) [n,Hp,Wp], zero outside each box scaled to prototype pixels (official crop)."""
    nm, hp, wp = protos.shape
    h, w = imgsz
    logits = coefs.astype(np.float32) @ protos.reshape(nm, -1).astype(np.float32)
    soft = (1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))).reshape(-1, hp, wp)  # no exp overflow
    b = boxes.astype(np.float32) * np.array([wp / w, hp / h, wp / w, hp / h], np.float32)
    cols, rows = np.arange(wp, dtype=np.float32), np.arange(hp, dtype=np.float32)
    in_x = (cols[None, None, :] >= b[:, 0, None, None]) & (cols[None, None, :] < b[:, 2, None, None])
    in_y = (rows[None, :, None] >= b[:, 1, None, None]) & (rows[None, :, None] < b[:, 3, None, None])
    return np.where(in_x & in_y, soft, np.float32(0)).astype(np.float32)


def masks_to_image(proto_masks: np.ndarray, imgsz: tuple[int, int], lb: Letterbox | None = None) -> np.ndarray:
    """Soft prototype-resolution masks [n,Hp,Wp] -> boolean masks [n,h0,w0] in the original image.

    ``lb`` None: masks in network-input pixels [n,H,W].
    """
    h, w = int(imgsz[0]), int(imgsz[1])
    if lb is None:
        h0, w0 = h, w
    else:
        h0, w0 = int(lb.orig_shape[0]), int(lb.orig_shape[1])
    out = np.zeros((len(proto_masks), h0, w0), bool)
    for k, m in enumerate(proto_masks):
        up = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)  # half-pixel centres
        if lb is not None:
            dw, dh = lb.pad
            top, left = int(round(dh - 0.1)), int(round(dw - 0.1))
            nh, nw = int(round(h0 * lb.ratio)), int(round(w0 * lb.ratio))
            up = up[top:top + nh, left:left + nw]
            if up.shape != (h0, w0):
                up = cv2.resize(up, (w0, h0), interpolation=cv2.INTER_LINEAR)
        out[k] = up > 0.5
    return out


def rle_encode(mask: np.ndarray) -> dict:
    """COCO RLE of one boolean mask [h,w]: {"size": [h, w], "counts": str} (column-major, compressed)."""
    from faster_coco_eval.core import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def rle_decode(rle: dict) -> np.ndarray:
    from faster_coco_eval.core import mask as mask_utils

    r = dict(rle)
    if isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode("ascii")
    return mask_utils.decode(r).astype(bool)


def draw_masks(image_bgr: np.ndarray, masks: np.ndarray, colors: list[tuple[int, int, int]],
               alpha: float = 0.45) -> np.ndarray:
    """Blend each mask [n,h,w] into a copy of the image in its colour (BGR), lowest index on top."""
    out = image_bgr.astype(np.float32)
    for m, c in reversed(list(zip(masks, colors))):
        if m.any():
            out[m] = out[m] * (1 - alpha) + np.asarray(c, np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def decode_segment(outputs: dict[str, np.ndarray], info, config) -> list[tuple[np.ndarray, ...]]:
    """Contract outputs of a seg artifact -> per image (boxes, scores, classes, soft masks [n,Hp,Wp]).

    End-to-end graphs give ``det_masks``; raw graphs (``output`` + ``protos``) are decoded here with
    ``config``'s NMS settings (the official seg NMS is best-class: ``multi_label`` False by default).
    Plain arrays, not Detections: runtimes.base builds those (this module must not import it back).
    """
    from .contract import MASK_OUTPUTS, NMS_OUTPUTS, PROTO_OUTPUT, RAW_OUTPUT

    result = []
    if MASK_OUTPUTS[0] in outputs and all(k in outputs for k in NMS_OUTPUTS):
        num, boxes, scores, classes = (outputs[k] for k in NMS_OUTPUTS)
        masks = outputs[MASK_OUTPUTS[0]]
        for i in range(len(num)):
            n = int(num[i].reshape(-1)[0])
            result.append((boxes[i, :n].astype(np.float32), scores[i, :n].astype(np.float32),
                           classes[i, :n].astype(np.int32), masks[i, :n].astype(np.float32)))
        return result
    if RAW_OUTPUT in outputs and PROTO_OUTPUT in outputs:
        raw, protos = outputs[RAW_OUTPUT], outputs[PROTO_OUTPUT]
        dets = seg_nms(raw, info.nc, conf=config.conf, iou=config.iou, max_det=config.max_det,
                       multi_label=config.multi_label, agnostic=config.agnostic)
        for i, (rows, coefs) in enumerate(dets):
            masks = crop_masks(protos[i], coefs, rows[:, :4], tuple(info.imgsz))
            result.append((rows[:, :4], rows[:, 4], rows[:, 5].astype(np.int32), masks))
        return result
    raise ValueError(f"segmentation artifact without masks: expected det_masks (NMS tail) or output + protos, got "
                     f"{sorted(outputs)}")
