"""Stage 4: precision written into the ONNX itself (TensorRT 11 is strongly typed: no builder precision flags).

* ``fp16.convert_fp16``: FP16 compute with FP32 inputs, outputs and box decode (modelopt AutoCast).
* ``int8.quantize_int8``: explicit symmetric Q/DQ on the convolutions, calibrated on CPU with ONNX Runtime
  from the user's images through the shared letterbox preprocessing, with an optional accuracy budget
  (``recovery``) that moves the most sensitive layers back to float.

Submodules import their heavy dependencies (modelopt, onnxruntime.quantization) lazily, inside functions.
"""
