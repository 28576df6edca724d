"""qronos-onnx: post-training quantization of ONNX language models with Qronos.

    import qronos_onnx
    report = qronos_onnx.optimize("model.onnx", "model-w4.onnx", preset="w4")
    result = qronos_onnx.evaluate("model-w4.onnx", reference="model.onnx")
"""

from .api import PRESETS, evaluate, optimize
from .config import Recipe, SolverOptions
from .errors import CalibrationWarning, QronosError
from .eval import EvalResult
from .ir.act_quant import ActQuant
from .quant import Grid
from .quant.problem import SolverWarning

__version__ = "0.1.0"

__all__ = ["ActQuant", "CalibrationWarning", "EvalResult", "Grid", "PRESETS", "QronosError",
           "Recipe", "SolverOptions", "SolverWarning", "evaluate", "optimize"]
