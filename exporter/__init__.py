"""yolo7-export: a deployment compiler for official YOLOv7 checkpoints.

Stages, each its own module and each testable alone (data flows one way):
load (checkpoint, model) -> fuse (fuse, loading) -> export (onnx_export, nms_tail) -> precision -> build
(trt_build) -> check (check/, on the evaluation library evaluation/). Imports point down the layers listed in
tests/test_architecture.py (runtimes/ below the stages, evaluation/ below precision and check/).
"""
__version__ = "0.1.0"
