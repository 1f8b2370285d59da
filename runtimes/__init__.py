"""runtimes/: run any artifact (checkpoint, ONNX, TensorRT engine) behind one interface.

The project's bottom layer lives here too, importing nothing of the exporter, torch, onnx or TensorRT: the IO
contract and its Literal types (contract.py), UserError (errors.py), ONNX metadata <-> ModelInfo
(metadata.py), atomic writes and sha256 (files.py), the preprocessing (preprocess.py) and the NMS references
(nms_reference.py). Above it: the Backend face and its lifecycle (backend.py), Detector (base.py), the
backends, and what the three CLIs share (cli_common.py). A runtime never imports the pipeline or a stage; the
PyTorch backend loads checkpoints through the model layer (exporter/loading.py). tests/test_architecture.py.
"""
