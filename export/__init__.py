"""Export of the DriVLM student: JAX -> ONNX (jax2onnx) -> TensorRT, with parity checks."""
