"""Why yolo7-bench's PyTorch mAP differs from the official test.py figure: rectangular batches.

Official test.py (img 320, batch 32) sorts images by aspect ratio and pads each batch to its own shape
(ceil(shape * 320 / 32 + 0.5) * 32); yolo7-bench letterboxes every image to the artifact's square input.
This script runs our fused model the official way and scores it with both COCO evaluators.
Run from the repository root: python docs/report_example/official_protocol_check.py
Measured: 0.4345 / 0.6293 (mAP50-95 / mAP50), the official predictions scored by pycocotools give
0.435 / 0.629; yolo7-bench's square 320x320 letterbox gives 0.4370 / 0.6353.
"""
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from exporter.pipeline import load_fused
from exporter.evaluation.dataset import load_dataset
from exporter.evaluation.evaluate import score_coco
from runtimes.nms_reference import non_max_suppression
torch.set_num_threads(1)
ds = load_dataset(ROOT / 'tests/data/shapes/annotations/instances_val.json')
_, model = load_fused(ROOT / 'tests/data/yolov7-tiny-shapes.pt'); model.eval()
S, B, STRIDE, PAD = 320, 32, 32, 0.5
recs = ds.images
# official LoadImagesAndLabels sorts by aspect ratio h/w and assigns batch shapes
ar = np.array([r.height / r.width for r in recs]); order = ar.argsort()
recs = [recs[i] for i in order]; ar = ar[order]
preds = []
for bi in range(0, len(recs), B):
    ari = ar[bi:bi + B]; mini, maxi = ari.min(), ari.max()
    shape = [1, 1]
    if maxi < 1: shape = [maxi, 1]
    elif mini > 1: shape = [1, 1 / mini]
    H, W = (np.ceil(np.array(shape) * S / STRIDE + PAD).astype(int) * STRIDE).tolist()
    ims, metas = [], []
    for r in recs[bi:bi + B]:
        img = cv2.imread(str(r.path)); h0, w0 = img.shape[:2]
        rr = S / max(h0, w0)
        if rr != 1:
            img = cv2.resize(img, (int(w0 * rr), int(h0 * rr)), interpolation=cv2.INTER_AREA if rr < 1 else cv2.INTER_LINEAR)
        h, w = img.shape[:2]
        dw, dh = (W - w) / 2, (H - h) / 2
        top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1)); left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
        ims.append(img[..., ::-1].transpose(2, 0, 1)); metas.append((r, h0, w0, h / h0, w / w0, dw, dh))
    x = torch.from_numpy(np.ascontiguousarray(np.stack(ims))).float() / 255
    with torch.no_grad():
        out = model(x).numpy()
    for d, (r, h0, w0, gh, gw, dw, dh) in zip(non_max_suppression(out, conf=0.001, iou=0.65, multi_label=True, max_det=300), metas):
        b = d[:, :4].copy(); b[:, [0, 2]] -= dw; b[:, [1, 3]] -= dh; b[:, :4] /= gh
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w0); b[:, [1, 3]] = b[:, [1, 3]].clip(0, h0)
        for (x1, y1, x2, y2), s, c in zip(b.tolist(), d[:, 4].tolist(), d[:, 5].astype(int).tolist()):
            preds.append({"image_id": r.id, "category_id": ds.category_ids[c], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
for ev in ("faster-coco-eval", "pycocotools"):
    st, _ = score_coco(ds.gt, preds, evaluator=ev)
    print(ev, "rect-batch emulation: mAP50-95 %.4f mAP50 %.4f" % (st[0], st[1]))
