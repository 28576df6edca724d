"""The quantize pass: two-stream calibration and a solve for every target, on ``onnx_ir``.

Pre-conditions: a decoder LLM graph (``LLMSignature``) with at least one target.
Post-conditions: every target's weight initializer holds the dequantized solved weight (same
dtype and layout as before: a fake-quantized float model), and the target node's
``meta[QUANTIZED]`` holds its ``QuantizedWeight`` (codes, scales, zero points) and
``meta[TARGET]`` its ``Target``, for the exporters. ``QuantizePass.results`` lists every
target with its solve time; ``skipped`` lists the layers left in float, with the reason;
``warnings`` the messages of the project's warnings raised on the way (also issued as usual).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from ..calibration.runner import (CalibrationOptions, CalibrationRun, TwoStreamCalibrator,
                                  torch_device)
from ..calibration.stats import token_rows
from ..config import Recipe
from ..errors import CalibrationWarning, QronosError, RecipeWarning
from ..ir.act_quant import insert_act_quant
from ..ir.signature import LLMSignature, detect_signature
from ..ir.stages import plan_stages
from ..ir.patterns import matches
from ..ir.targets import (ALREADY_QUANTIZED, PATTERN_REASONS, Skipped, Target, TargetGroup,
                          find_targets, untie_lm_head)
from ..quant import Grid, QuantizedWeight, SolverWarning, rtn_codes, solve

#: The warnings a run records in ``QuantizePass.warnings`` (and the report).
RECORDED_WARNINGS = (CalibrationWarning, RecipeWarning, SolverWarning)

#: ``Node.meta`` keys of a solved target: its ``QuantizedWeight`` and its ``Target``.
QUANTIZED = "qronos.quantized"
TARGET = "qronos.target"

#: Called after each group is solved: ``observer(group, H, G, results)``.
Observer = Callable[[TargetGroup, torch.Tensor, torch.Tensor, list["TargetResult"]], None]


@dataclass
class TargetResult:
    """One solved target.

    The errors are relative output errors on the calibration set, ``||W X - Q X~||^2 /
    ||W X||^2`` (``X`` from the float network, ``X~`` from the quantized one):
    ``error`` for the solved codes, measured by ONNX Runtime on the layer's own outputs in both
    streams, and ``error_rtn`` for round-to-nearest codes on the same grid ("before solving"),
    from the statistics: ``(||W X||^2/n - 2 tr(W G Q^T) + tr(Q H Q^T)) / (||W X||^2/n)``.
    With ``reference="stage"`` the float layer of the measuring run reads the quantized
    stream's input (that is what the float stage is applied to), so both errors are the
    matched ``||(W - Q) X~||^2 / ||W X~||^2``, the cross term taken from ``H``.
    """

    target: Target
    weight: QuantizedWeight
    seconds: float
    cross_rtn: float = 0.0          # tr(W G Q_rtn^T) (tr(W H Q_rtn^T) in stage mode)
    quad_rtn: float = 0.0           # tr(Q_rtn H Q_rtn^T)
    output_ref: float | None = None     # ||W X||^2 / n, measured
    output_err: float | None = None     # ||W X - Q X~||^2 / n, measured

    @property
    def error(self) -> float | None:
        return None if not self.output_ref else self.output_err / self.output_ref

    @property
    def error_rtn(self) -> float | None:
        """``None`` for a Gemm with a bias: the measured reference then includes the bias."""
        if not self.output_ref or self.target.bias is not None:
            return None
        return (self.output_ref - 2 * self.cross_rtn + self.quad_rtn) / self.output_ref


def _warn_if_too_few_tokens(groups: Sequence[TargetGroup], samples: Sequence[dict],
                            signature: LLMSignature, algorithm: str) -> None:
    """Warn when the calibration tokens (padding excluded) are fewer than a group's input
    features: its ``H`` is then singular and GPTQ-type solvers rest on their damping alone
    (measured on SmolLM2 W3: GPTQ worse than RTN with 1024 tokens for down_proj's 1536 inputs).
    """
    if algorithm == "rtn":
        return
    # Counted as the statistics count them: the tokens of input_ids whose mask is non-zero.
    mask = signature.attention_mask
    tokens = sum(token_rows(s[signature.input_ids][..., None], s.get(mask)).shape[0]
                 for s in samples)
    short = [g for g in groups if g.in_features > tokens]
    if not short:
        return
    widest = max(short, key=lambda g: g.in_features)
    msg = (f"the calibration set has {tokens} tokens, fewer than the input features of "
           f"{len(short)} of {len(groups)} layer groups (up to {widest.in_features}, at "
           f"{widest.targets[0].name}): their H = X~ X~^T / n is singular and {algorithm} rests "
           f"on its damping alone, which can end worse than round-to-nearest. Calibrate on at "
           f"least {widest.in_features} tokens (a few times more is better).")
    warnings.warn(msg, CalibrationWarning, stacklevel=3)


def _warn_unmatched_patterns(recipe: Recipe, targets: Sequence[Target],
                             skipped: Sequence[Skipped]) -> None:
    """Warn about include / exclude patterns that match no layer, and override patterns that
    match no quantized layer whose grid they can set (the lm_head's is fixed by the lm_head
    policy): a typo there silently changes nothing."""
    layers = [(t.name, t.node) for t in targets] + [(s.name, s.node) for s in skipped]
    quantized = [(t.name, t.node) for t in targets if not t.lm_head]
    heads = [(t.name, t.node) for t in targets if t.lm_head]
    checks = ([("include", p, layers) for p in recipe.include]
              + [("exclude", p, layers) for p in recipe.exclude]
              + [("override", p, quantized) for p, _ in recipe.overrides])
    for option, pattern, names in checks:
        if not any(matches([pattern], *n) for n in names):
            example = f" (names look like {names[0][0]!r})" if names else ""
            head = ("; the lm_head's grid is set by the lm_head policy (int8 per channel)"
                    if option == "override" and any(matches([pattern], *n) for n in heads) else "")
            warnings.warn(f"{option} pattern {pattern!r} matches no "
                          f"{'quantized ' if option == 'override' else ''}layer{example}{head}; "
                          "`qronos-onnx inspect MODEL` lists them", RecipeWarning, stacklevel=3)


def _warn_wide_groups(recipe: Recipe, targets: Sequence[Target]) -> None:
    """Warn when a grid's groups are wider than some layers' rows: those layers get one scale
    per output channel (the same grid, without padding rows to the group)."""
    wide: dict[int, list[Target]] = {}
    for t in targets:
        size = None if t.lm_head else recipe.requested_grid(t).group_size
        if size is not None and size > t.in_features:
            wide.setdefault(size, []).append(t)
    for size, layers in wide.items():
        widest = max(layers, key=lambda t: t.in_features)
        warnings.warn(f"group size {size} is larger than the input features of {len(layers)} "
                      f"layer(s) (up to {widest.in_features}, at {widest.name}): they get one "
                      "scale per output channel", RecipeWarning, stacklevel=3)


@contextlib.contextmanager
def _recording(messages: list[str]) -> Iterator[None]:
    """Append the messages of ``RECORDED_WARNINGS`` raised in the block to ``messages``, and
    issue every warning caught (through the caller's filters) when the block ends."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for w in caught:
            if issubclass(w.category, RECORDED_WARNINGS):
                messages.append(str(w.message))
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _row_dots(a: torch.Tensor, b: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Per-row dot products of two ``[C, d]`` tensors, summed in float64, on the CPU: ``[C]``.

    A block of ``rows`` rows at a time, so the float64 copies stay small for any ``C``.
    """
    return torch.cat([torch.einsum("cd,cd->c", a[i:i + rows].double(), b[i:i + rows].double())
                      for i in range(0, a.shape[0], rows)]).cpu()


def weight_matrix(tensor: ir.TensorProtocol, target: Target) -> torch.Tensor:
    """``W`` ``[out, in]`` from the stored initializer (``W^T`` for MatMul), in its dtype.

    Half-precision weights stay half precision: the grid then rounds its scales to that dtype
    before solving (exported scales are stored in it); the solvers work in float32 anyway.
    """
    if tensor.dtype == ir.DataType.BFLOAT16:        # numpy has no bfloat16: go by the bits
        bits = np.array(tensor.numpy()).view(np.uint16)
        matrix = torch.from_numpy(bits).view(torch.bfloat16)
    else:
        matrix = torch.from_numpy(np.array(tensor.numpy()))     # a copy: the source is mapped
    return matrix if target.transposed else matrix.T


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
        self.warnings: list[str] = []
        self.run_info: CalibrationRun | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        detect_signature(model)
        if self.recipe.lm_head == "int8":
            untie_lm_head(model, self.recipe.include, self.recipe.exclude)
        groups, self.skipped = self._find(model)
        if not groups:
            packed = sum(n.op_type == "MatMulNBits" for n in model.graph)
            dequantized = sum(s.reason == ALREADY_QUANTIZED for s in self.skipped)
            if packed or dequantized:
                found = ", ".join(f"{n} {what}" for n, what in (
                    (packed, "MatMulNBits"), (dequantized, "MatMul on DequantizeLinear weights"))
                    if n)
                raise QronosError(f"the model is already quantized ({found}) and has no float "
                                  "layer left to quantize: start from the float model")
            left_out = [s for s in self.skipped if s.reason in PATTERN_REASONS]
            if left_out:
                raise QronosError(f"the include/exclude patterns leave out all {len(left_out)} "
                                  "quantizable layers; `qronos-onnx inspect MODEL` lists their "
                                  "names")
            raise QronosError("no quantizable MatMul/Gemm with a constant 2-D weight was found "
                              f"({len(self.skipped)} skipped)")
        with _recording(self.warnings):                  # (an error above says all there is)
            targets = [t for g in groups for t in g.targets]
            _warn_unmatched_patterns(self.recipe, targets, self.skipped)
            _warn_wide_groups(self.recipe, targets)
        if self.recipe.act_quant is not None:
            for group in groups:
                dtype = model.graph.initializers[group.targets[0].weight].const_value.dtype
                insert_act_quant(model, group, self.recipe.act_quant_for(group.targets[0]), dtype)
            groups, _ = self._find(model)
        if self.recipe.solver.algorithm == "rtn" and self.recipe.act_quant is None:
            self.run_info = CalibrationRun()         # RTN needs no data: no calibration at all
            for group in groups:
                self._solve(model, group, None, None)
        else:
            with _recording(self.warnings):
                _warn_if_too_few_tokens(groups, self.samples, detect_signature(model),
                                        self.recipe.solver.algorithm)
            stages = plan_stages(model, groups)
            calibrator = TwoStreamCalibrator(model, stages, self.samples, self.calibration)
            self.run_info = calibrator.run(lambda g, H, G: self._solve(model, g, H, G))
        for result in self.results:
            ref, err = self.run_info.output_error.get(result.target.node, (None, None))
            result.output_ref, result.output_err = ref, err
            self._write(model, result)
        return ir.passes.PassResult(model, modified=True)

    def _find(self, model: ir.Model):
        return find_targets(model, include_lm_head=self.recipe.lm_head != "skip",
                            include=self.recipe.include, exclude=self.recipe.exclude)

    def _solve(self, model: ir.Model, group: TargetGroup, H: torch.Tensor | None,
               G: torch.Tensor | None) -> dict[str, np.ndarray]:
        """Solve the group's targets, each set sharing a grid as one stacked weight (rows are
        independent), and return their dequantized weights in the stored layout. ``H is None``:
        round to nearest, no statistics."""
        by_grid: dict[Grid, list[Target]] = {}
        for target in group.targets:
            by_grid.setdefault(self.recipe.grid_for(target), []).append(target)
        solved, new = {}, []
        for grid, targets in by_grid.items():
            weights, results = self._solve_stack(model, targets, grid, H, G)
            solved.update(weights)
            new.extend(results)
        order = {t.node: i for i, t in enumerate(group.targets)}
        new.sort(key=lambda r: order[r.target.node])
        self.results.extend(new)
        if self.observer is not None and H is not None:
            self.observer(group, H, G, new)
        return solved

    def _solve_stack(self, model, targets, grid, H, G):
        """One stacked solve: ``({weight: stored-layout dequantized weight}, results)``."""
        tensors = [model.graph.initializers[t.weight].const_value for t in targets]
        W = torch.cat([weight_matrix(x, t) for x, t in zip(tensors, targets)])
        device = torch_device(self.calibration.device)
        W = W.to(device)
        opts = self.recipe.solver
        t0 = time.perf_counter()
        if H is None:                                     # RTN without calibration
            q = solve("rtn", W, grid=grid, name=targets[0].name)
            cross_rtn = quad_rtn = torch.zeros(W.shape[0])
        else:
            H, G = H.to(device), G.to(device)
            with _recording(self.warnings):
                q = solve(opts.algorithm, W, H, G, grid=grid, act_order=opts.act_order,
                          damping=opts.damping, solver_block=opts.solver_block,
                          variant=opts.variant, name=targets[0].name)
            # The RTN error of the report, per row: tr(W G Q^T) and tr(Q H Q^T). Products in
            # float32 (half the time of float64; ~1e-6 relative), row sums in float64. In stage
            # mode the measured reference is W X~ (see TargetResult), so the cross term is H's.
            rtn = QuantizedWeight(rtn_codes(W, grid, q.scales, q.zero_points), q.scales,
                                  q.zero_points, grid, q.info).dequantize()
            cross = H if self.calibration.reference == "stage" else G
            cross_rtn = _row_dots(W.float() @ cross.float(), rtn)
            quad_rtn = _row_dots(rtn @ H.float(), rtn)
        seconds = time.perf_counter() - t0
        q = QuantizedWeight(q.codes.cpu(), q.scales.cpu(),
                            None if q.zero_points is None else q.zero_points.cpu(), q.grid, q.info)
        solved, start, new = {}, 0, []
        for target, tensor in zip(targets, tensors):
            rows = slice(start, start + target.out_features)
            part = q.rows(rows.start, rows.stop)
            start = rows.stop
            new.append(TargetResult(target, part, seconds * target.out_features / W.shape[0],
                                    float(cross_rtn[rows].sum()), float(quad_rtn[rows].sum())))
            solved[target.weight] = stored_layout(part.dequantize(), target, tensor.dtype.numpy())
        return solved, new

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
