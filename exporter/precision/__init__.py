"""Stage 4: precision written into the ONNX itself (TensorRT 11 is strongly typed: no builder precision flags).

* ``fp16.convert_fp16``: FP16 compute with FP32 inputs, outputs and box decode (modelopt AutoCast).
* ``int8.quantize_int8``: explicit symmetric Q/DQ where TensorRT wants them (``placement``: modelopt's INT8
  quantizer, shared Concat/pool scales), calibrated on CPU with ONNX Runtime from the user's images through
  the shared letterbox preprocessing, the rest in FP16 with an FP32 decode, with an optional accuracy budget
  (``recovery``) that moves the most sensitive convs back to FP16; ``audit`` counts layout defects.

Submodules import their heavy dependencies (modelopt, onnxruntime.quantization) lazily, inside functions.
"""
