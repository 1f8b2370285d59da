"""yolo7-export: a deployment compiler for official YOLOv7 checkpoints.

Stages, each its own module and each testable alone (data flows one way):
load (checkpoint, model) -> fuse -> export (onnx_export, nms_tail) -> precision -> build (trt_build)
-> check (check/).
"""
__version__ = "0.1.0"
