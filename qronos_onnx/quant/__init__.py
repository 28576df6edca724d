"""Quantization grids and solvers (RTN, GPTQ, GPFQ, Qronos). Pure PyTorch: no ONNX here.

from qronos_onnx.quant import Grid, solve
q = solve("qronos", weight, H, G, grid=Grid(bits=4, group_size=64), act_order=True)
w_hat = q.dequantize()

Which solvers exist, what each needs and its default damping: the torch-free table
``qronos_onnx.registry.SOLVERS``.
"""

from .grid import Grid
from .linalg import SolverWarning
from .problem import Variant
from .solve import rtn_codes, solve
from .weight import QuantizedWeight, SolveInfo

__all__ = [
    "Grid",
    "QuantizedWeight",
    "SolveInfo",
    "SolverWarning",
    "Variant",
    "rtn_codes",
    "solve",
]
