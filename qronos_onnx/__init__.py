"""qronos-onnx: post-training quantization of ONNX language models with Qronos.

import qronos_onnx
report = qronos_onnx.optimize("model.onnx", "model-w4.onnx")            # --w4
result = qronos_onnx.evaluate("model-w4.onnx", reference="model.onnx")
"""

import importlib

#: Public names and the modules that define them, imported on first use (PEP 562), so that
#: ``import qronos_onnx`` and ``qronos-onnx --help`` do not load torch and ONNX Runtime.
_EXPORTS = {
    "ActQuant": ".ir.act_quant",
    "CalibrationWarning": ".errors",
    "EvalOptions": ".options",
    "EvalResult": ".eval",
    "ExportOptions": ".options",
    "Format": ".formats.base",
    "Grid": ".quant",
    "Options": ".options",
    "PRESETS": ".options",
    "QronosError": ".errors",
    "RecipeWarning": ".errors",
    "Report": ".report",
    "Scheme": ".scheme",
    "Solver": ".registry",
    "SolverOptions": ".scheme",
    "SolverWarning": ".quant",
    "evaluate": ".api",
    "optimize": ".api",
    "register_format": ".registry",
    "register_rotation": ".registry",
    "register_solver": ".registry",
}

__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the names are those of _EXPORTS, listed once)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
