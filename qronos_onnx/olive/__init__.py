"""qronos-onnx as an Olive pass: ``QronosQuantization`` (see ``passes/`` and the README)."""

from .qronos_pass import QronosQuantization

__all__ = ["QronosQuantization"]
