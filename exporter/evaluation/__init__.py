"""evaluation/: the measuring library that precision (INT8 recovery, calibration from a labelled set) and the
check harness both use: labelled sets (dataset), COCO mAP under the official protocol (evaluate), parity
of two runs (parity), latency and peak memory (latency); for segmentation and pose models mask mAP and
mask parity (masks), keypoint AP and keypoint parity (keypoints).

Layer: above runtimes/ (it runs Detectors), below the stages and the harness; it imports neither.
"""
