"""The quantize pass: two-stream calibration and a solve for every target, on ``onnx_ir``.

Pre-conditions: a decoder LLM graph (``LLMSignature``) with at least one target.
Post-conditions: every target's weight initializer holds the dequantized solved weight (same
dtype and layout as before: a fake-quantized float model), and the target node's
``meta[QUANTIZED]`` holds its ``QuantizedWeight`` (codes, scales, zero points) and
``meta[TARGET]`` its ``Target``, for the exporters. ``QuantizePass.results`` lists every target with its solve time; ``skipped`` lists
the layers left in float, with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from ..calibration.runner import (CalibrationOptions, CalibrationRun, TwoStreamCalibrator,
                                  torch_device)
from ..config import Recipe
from ..errors import QronosError
from ..ir.act_quant import insert_act_quant
from ..ir.signature import detect_signature
from ..ir.stages import plan_stages
from ..ir.targets import Skipped, Target, TargetGroup, find_targets
from ..quant import QuantizedWeight, solve

log = logging.getLogger("qronos_onnx")

#: ``Node.meta`` keys of a solved target: its ``QuantizedWeight`` and its ``Target``.
QUANTIZED = "qronos.quantized"
TARGET = "qronos.target"

#: Called after each group is solved: ``observer(group, H, G, results)``.
Observer = Callable[[TargetGroup, torch.Tensor, torch.Tensor, list["TargetResult"]], None]


@dataclass
class TargetResult:
    """One solved target."""

    target: Target
    weight: QuantizedWeight
    seconds: float


def weight_matrix(tensor: ir.TensorProtocol, target: Target) -> torch.Tensor:
    """``W`` ``[out, in]`` float32 from the stored initializer (``W^T`` for MatMul)."""
    array = np.array(tensor.numpy(), dtype=np.float32)      # a copy: the source is memory-mapped
    return torch.from_numpy(array if target.transposed else array.T)


def stored_layout(w: torch.Tensor, target: Target, dtype: np.dtype) -> np.ndarray:
    """``W`` ``[out, in]`` back to the initializer's layout and dtype."""
    array = (w if target.transposed else w.T).contiguous().numpy()
    return array.astype(dtype, copy=False)


class QuantizePass(ir.passes.InPlacePass):
    """Calibrate and solve every target of an LLM graph (see the module docstring).

    Args:
        recipe: grids, solver and target selection.
        samples: full-graph feed dicts, one per calibration batch.
        calibration: engine options (reference stream, device, progress).
        observer: optional callback after each group (tests use it to check statistics).
    """

    def __init__(self, recipe: Recipe, samples: Sequence[dict],
                 calibration: CalibrationOptions | None = None, observer: Observer | None = None):
        super().__init__()
        self.recipe = recipe
        self.samples = samples
        self.calibration = calibration or CalibrationOptions()
        self.observer = observer
        self.results: list[TargetResult] = []
        self.skipped: list[Skipped] = []
        self.run_info: CalibrationRun | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        detect_signature(model)
        groups, self.skipped = self._find(model)
        if not groups:
            raise QronosError("no quantizable MatMul/Gemm with a constant 2-D weight was found "
                              f"({len(self.skipped)} skipped)")
        if self.recipe.act_quant is not None:
            for group in groups:
                dtype = model.graph.initializers[group.targets[0].weight].const_value.dtype
                insert_act_quant(model, group, self.recipe.act_quant, dtype)
            groups, _ = self._find(model)
        stages = plan_stages(model, groups)
        calibrator = TwoStreamCalibrator(model, stages, self.samples, self.calibration)
        self.run_info = calibrator.run(lambda g, H, G: self._solve(model, g, H, G))
        for result in self.results:
            self._write(model, result)
        return ir.passes.PassResult(model, modified=True)

    def _find(self, model: ir.Model):
        return find_targets(model, include_lm_head=self.recipe.include_lm_head,
                            exclude=self.recipe.exclude)

    def _solve(self, model: ir.Model, group: TargetGroup, H: torch.Tensor,
               G: torch.Tensor) -> dict[str, np.ndarray]:
        """Solve the group's targets as one stacked weight (rows are independent)."""
        tensors = [model.graph.initializers[t.weight].const_value for t in group.targets]
        W = torch.cat([weight_matrix(x, t) for x, t in zip(tensors, group.targets)])
        device = torch_device(self.calibration.device)
        opts = self.recipe.solver
        t0 = time.perf_counter()
        q = solve(opts.algorithm, W.to(device), H.to(device), G.to(device), grid=self.recipe.grid,
                  act_order=opts.act_order, damping=opts.damping,
                  solver_block=opts.solver_block, variant=opts.variant,
                  name=group.targets[0].name)
        q = QuantizedWeight(q.codes.cpu(), q.scales.cpu(),
                            None if q.zero_points is None else q.zero_points.cpu(), q.grid, q.info)
        seconds = time.perf_counter() - t0
        solved, start = {}, 0
        new = []
        for target, tensor in zip(group.targets, tensors):
            part = q.rows(start, start + target.out_features)
            start += target.out_features
            new.append(TargetResult(target, part, seconds * target.out_features / W.shape[0]))
            solved[target.weight] = stored_layout(part.dequantize(), target, tensor.dtype.numpy())
        self.results.extend(new)
        if self.observer is not None:
            self.observer(group, H, G, new)
        return solved

    @staticmethod
    def _write(model: ir.Model, result: TargetResult) -> None:
        """Replace the target's weight by its dequantized value (computed when saved)."""
        target, weight = result.target, result.weight
        value = model.graph.initializers[target.weight]
        old = value.const_value
        dtype = old.dtype

        def dequantized() -> ir.Tensor:
            return ir.Tensor(stored_layout(weight.dequantize(), target, dtype.numpy()), name=value.name)

        value.const_value = ir.LazyTensor(dequantized, dtype=dtype, shape=old.shape, name=value.name)
        node = model.graph.node(target.node)
        node.meta[QUANTIZED] = weight
        node.meta[TARGET] = target
