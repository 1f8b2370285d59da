"""runtimes/: run any artifact (checkpoint, ONNX, TensorRT engine) behind one interface.

The shared pieces live here too, with no dependency on the exporter: the IO contract (contract.py), the
preprocessing (preprocess.py) and the NMS references (nms_reference.py).
"""
