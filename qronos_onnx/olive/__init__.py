"""qronos-onnx as an Olive pass: ``QronosQuantization`` (see ``passes/`` and the README).

The pass is imported on first use (PEP 562), so that ``qronos_onnx.olive.registry`` (our
registry entry, plain data) loads without Olive installed.
"""

__all__ = ["QronosQuantization"]


def __getattr__(name: str):
    if name == "QronosQuantization":
        from .qronos_pass import QronosQuantization

        return QronosQuantization
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
