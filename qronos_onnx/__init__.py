"""qronos-onnx: post-training quantization of ONNX language models with Qronos."""

__version__ = "0.1.0"
