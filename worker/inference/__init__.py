"""Inference: the ONNX Runtime session (CPU or CUDA, IO binding) and the raw-ORT benchmark loop."""
