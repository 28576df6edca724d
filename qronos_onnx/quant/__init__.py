"""Quantization grids and solvers (RTN, GPTQ, GPFQ, Qronos). Pure PyTorch: no ONNX here.

from qronos_onnx.quant import Grid, solve
q = solve("qronos", weight, H, G, grid=Grid(bits=4, group_size=64), act_order=True)
w_hat = q.dequantize()
"""

from .grid import Grid
from .linalg import SolverWarning
from .qronos import Variant
from .solve import ALGORITHMS, DEFAULT_DAMPING, MAX_DAMPING, rtn_codes, solve
from .weight import QuantizedWeight, SolveInfo

__all__ = [
    "ALGORITHMS",
    "DEFAULT_DAMPING",
    "MAX_DAMPING",
    "Grid",
    "QuantizedWeight",
    "SolveInfo",
    "SolverWarning",
    "Variant",
    "rtn_codes",
    "solve",
]
