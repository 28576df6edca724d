"""Calibrate and solve: two-stream calibration and a solve for every target, on ``onnx_ir``.

``CalibrateSolvePass`` runs the stages of the graph through ONNX Runtime in the float and the
quantized stream (``calibration/runner.py``), accumulates each target group's ``H`` and ``G``
and solves its targets (``quant.solve``), group after group, so that every later group sees the
solved weights upstream.

Requires: a decoder LLM graph (``LLMSignature``) with at least one target.
Ensures: every target's weight initializer holds the dequantized solved weight (same dtype and
layout as before: a fake-quantized float model), and the target node's ``meta[QUANTIZED]``
holds its ``QuantizedWeight`` (codes, scales, zero points) and ``meta[TARGET]`` its
``Target``, for the formats (``qronos_onnx/formats``). The pass returns a ``SolveResult``:
every target with its solve time and errors, the layers left in float with the reason, and
what the calibration run did. The pass keeps no state of its own: it can run again.
"""

from __future__ import annotations

import itertools
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from qronos_onnx.calibration.runner import (
    CalibrationOptions,
    CalibrationRun,
    TwoStreamCalibrator,
    torch_device,
)
from qronos_onnx.calibration.stats import token_rows
from qronos_onnx.errors import CalibrationWarning
from qronos_onnx.files.scratch import ScratchArrays
from qronos_onnx.ir.signature import LLMSignature, detect_signature
from qronos_onnx.ir.stages import plan_stages
from qronos_onnx.ir.targets import Skipped, Target, TargetGroup, require_targets
from qronos_onnx.ir.values import constant, tensor_shape
from qronos_onnx.quant import Grid, QuantizedWeight, SolveInfo, rtn_codes, solve
from qronos_onnx.quant.problem import SecondMoments
from qronos_onnx.scheme import Scheme
from qronos_onnx.weights import stored_layout, weight_matrix

#: ``Node.meta`` keys of a solved target: its ``QuantizedWeight`` and its ``Target``.
QUANTIZED = "qronos.quantized"
TARGET = "qronos.target"

#: Called after each group is solved: ``observer(group, H, G, results)``.
Observer = Callable[[TargetGroup, torch.Tensor, torch.Tensor, list["TargetResult"]], None]


def quantized_nodes(model: ir.Model) -> list[tuple[ir.Node, Target, QuantizedWeight]]:
    """Nodes the solve pass solved, with their target and codes."""
    return [(n, n.meta[TARGET], n.meta[QUANTIZED]) for n in model.graph if QUANTIZED in n.meta]


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
    cross_rtn: float = 0.0  # tr(W G Q_rtn^T) (tr(W H Q_rtn^T) in stage mode)
    quad_rtn: float = 0.0  # tr(Q_rtn H Q_rtn^T)
    output_ref: float | None = None  # ||W X||^2 / n, measured
    output_err: float | None = None  # ||W X - Q X~||^2 / n, measured

    @property
    def error(self) -> float | None:
        if not self.output_ref:
            return None
        assert self.output_err is not None  # measured together with output_ref
        return self.output_err / self.output_ref

    @property
    def error_rtn(self) -> float | None:
        """``None`` for a Gemm with a bias: the measured reference then includes the bias."""
        if not self.output_ref or self.target.bias is not None:
            return None
        return (self.output_ref - 2 * self.cross_rtn + self.quad_rtn) / self.output_ref


def _warn_if_too_few_tokens(
    groups: Sequence[TargetGroup], samples: Sequence[dict], signature: LLMSignature, algorithm: str
) -> None:
    """Warn when the calibration tokens (padding excluded) are fewer than a group's input
    features: its ``H`` is then singular and GPTQ-type solvers rest on their damping alone
    (measured on SmolLM2 W3: GPTQ worse than RTN with 1024 tokens for down_proj's 1536 inputs).
    """
    if algorithm == "rtn":
        return
    # Counted as the statistics count them: the tokens of input_ids whose mask is non-zero.
    mask = signature.attention_mask
    tokens = sum(
        token_rows(s[signature.input_ids][..., None], s.get(mask)).shape[0] for s in samples
    )
    short = [g for g in groups if g.in_features > tokens]
    if not short:
        return
    widest = max(short, key=lambda g: g.in_features)
    msg = (
        f"the calibration set has {tokens} tokens, fewer than the input features of "
        f"{len(short)} of {len(groups)} layer groups (up to {widest.in_features}, at "
        f"{widest.targets[0].name}): their H = X~ X~^T / n is singular and {algorithm} rests "
        f"on its damping alone, which can end worse than round-to-nearest. Calibrate on at "
        f"least {widest.in_features} tokens (a few times more is better)."
    )
    warnings.warn(msg, CalibrationWarning, stacklevel=3)


#: A stack of more float32 weight bytes than this is solved in blocks of rows, so that the
#: solver's weight-sized buffers (about seven of them) hold one block: a 131,072 x 4,096
#: lm_head in one piece peaked at 16.4 GB (benchmarks/RESULTS.md).
ROW_BLOCK_BYTES = 256 << 20


def row_blocks(rows: int, columns: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``rows`` in blocks of at most ``ROW_BLOCK_BYTES`` of
    float32 ``[rows, columns]`` (one block when it fits)."""
    step = max(1, ROW_BLOCK_BYTES // (4 * columns))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _row_dots(a: torch.Tensor, b: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Per-row dot products of two ``[C, d]`` tensors, summed in float64, on the CPU: ``[C]``.

    A block of ``rows`` rows at a time, so the float64 copies stay small for any ``C``.
    """
    return torch.cat(
        [
            torch.einsum("cd,cd->c", a[i : i + rows].double(), b[i : i + rows].double())
            for i in range(0, a.shape[0], rows)
        ]
    ).cpu()


@dataclass
class CandidateTerms:
    """One candidate grid of one group, measured (``CalibrateSolvePass(measure=True)``).

    Per target: ``cross`` ``tr(W G Q^T)`` and ``quad`` ``tr(Q H Q^T)`` of the codes solved on
    ``grid``, and the same of round-to-nearest codes; with the measured ``||W X||^2 / n`` they
    make ``||W X - Q X~||^2 / n`` (``TargetResult``'s conventions, stage mode included).
    """

    group: TargetGroup
    grid: Grid
    cross: list[float]
    quad: list[float]
    cross_rtn: list[float]
    quad_rtn: list[float]


@dataclass
class SolveResult(ir.passes.PassResult):
    """What ``CalibrateSolvePass`` did.

    Attributes:
        results: every solved target (``TargetResult``), in solve order.
        skipped: the layers left in float, with the reason.
        run_info: what the calibration run did (``CalibrationRun``).
        measured: with ``measure``, every group at every candidate grid.
    """

    results: list[TargetResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    run_info: CalibrationRun = field(default_factory=CalibrationRun)
    measured: list[CandidateTerms] = field(default_factory=list)


class CalibrateSolvePass(ir.passes.InPlacePass):
    """Calibrate and solve every target of an LLM graph (see the module docstring).

    Args:
        scheme: grids, solver and target selection.
        samples: full-graph feed dicts, one per calibration batch.
        calibration: engine options (reference stream, device, progress).
        observer: optional callback after each group (tests use it to check statistics).
        measure: also solve every group at each of the scheme's candidate grids and return
            their errors' terms (``SolveResult.measured``, for a size budget: ``budget.py``);
            the quantized stream still advances with the scheme's grids.
    """

    def __init__(
        self,
        scheme: Scheme,
        samples: Sequence[dict],
        calibration: CalibrationOptions | None = None,
        observer: Observer | None = None,
        measure: bool = False,
    ):
        super().__init__()
        self.scheme = scheme
        self.samples = samples
        self.calibration = calibration or CalibrationOptions()
        self.observer = observer
        self.measure = measure

    def requires(self, model: ir.Model) -> None:
        detect_signature(model)
        require_targets(model, *self.scheme.select(model))

    def call(self, model: ir.Model) -> SolveResult:
        folder = self.calibration.spill_dir
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="qronos_", dir=folder) as tmp:
            # every solved layer's codes, memory-mapped until the output is written (the maps
            # outlive the folder)
            return self._call(model, ScratchArrays(Path(tmp) / "codes"))

    def _call(self, model: ir.Model, codes: ScratchArrays) -> SolveResult:
        groups, skipped = self.scheme.select(model)
        results: list[TargetResult] = []
        measured: list[CandidateTerms] = []

        def solve_group(group: TargetGroup, moments: SecondMoments | None):
            if self.measure and moments is not None:
                measured.extend(self._measure(model, group, moments))
            return self._solve(model, group, moments, results, codes)

        if not self.scheme.needs_statistics:
            run_info = CalibrationRun()  # RTN needs no data: no calibration at all
            for group in groups:
                solve_group(group, None)
        else:
            signature = detect_signature(model)
            _warn_if_too_few_tokens(groups, self.samples, signature, self.scheme.solver.algorithm)
            tokens = sum(int(np.size(s[signature.input_ids])) for s in self.samples)
            widest = max(g.in_features for g in groups)
            stages = plan_stages(model, groups, self.calibration.recomputes_wide(tokens, widest))
            calibrator = TwoStreamCalibrator(model, stages, self.samples, self.calibration)
            run_info = calibrator.run(solve_group)
        for result in results:
            ref, err = run_info.output_error.get(result.target.node, (None, None))
            result.output_ref, result.output_err = ref, err
            self._write(model, result)
        return SolveResult(model, True, results, skipped, run_info, measured)

    def ensures(self, model: ir.Model) -> None:
        unsolved = [
            t.name
            for g in self.scheme.select(model)[0]
            for t in g.targets
            if QUANTIZED not in model.graph.node(t.node).meta
        ]
        if unsolved:
            raise ir.passes.PostconditionError(f"targets left unsolved: {', '.join(unsolved)}")

    def _solve(
        self,
        model: ir.Model,
        group: TargetGroup,
        moments: SecondMoments | None,
        results: list[TargetResult],
        codes: ScratchArrays,
    ) -> dict[str, np.ndarray]:
        """Solve the group's targets, each set sharing a grid as one stacked weight (rows are
        independent), and return their dequantized weights in the stored layout. ``moments``
        (owned; freed by the last stack's solve) ``None``: round to nearest, no statistics."""
        by_grid: dict[Grid, list[Target]] = {}
        for target in group.targets:
            by_grid.setdefault(self.scheme.grid_for(target), []).append(target)
        seen = None
        if self.observer is not None and moments is not None:
            assert moments.H is not None and moments.G is not None
            seen = moments.H.clone(), moments.G.clone()
        solved, new = {}, []
        stacks = list(by_grid.items())
        for i, (grid, targets) in enumerate(stacks):
            shared = moments
            if moments is not None and i < len(stacks) - 1:  # later stacks need them too
                shared = SecondMoments(moments.H, moments.G)
            weights, stacked = self._solve_stack(model, targets, grid, shared, codes)
            solved.update(weights)
            new.extend(stacked)
        order = {t.node: i for i, t in enumerate(group.targets)}
        new.sort(key=lambda r: order[r.target.node])
        results.extend(new)
        if self.observer is not None and seen is not None:
            self.observer(group, *seen, new)
        return solved

    def _measure(
        self, model: ir.Model, group: TargetGroup, moments: SecondMoments
    ) -> list[CandidateTerms]:
        """Solve the group's stacked weight at every candidate grid (``moments`` left as they
        are) and return each one's error terms per target; the codes are dropped."""
        targets = group.targets
        W = self._stacked_weight(model, targets)
        device = W.device
        H, G = moments.H.to(device), moments.G.to(device)  # type: ignore[union-attr]
        moments.H, moments.G = H, G
        ref = (H if self.calibration.reference == "stage" else G).float()
        bounds = np.cumsum([0] + [t.out_features for t in targets])

        def per_target(rows: torch.Tensor) -> list[float]:
            return [float(rows[a:b].sum()) for a, b in itertools.pairwise(bounds)]

        out = []
        for grid in self.scheme.candidates_for(group):
            q, cross_rtn, quad_rtn = self._solve_rows(W, grid, SecondMoments(H, G), targets[0].name)
            Q = q.dequantize().to(device)
            cross = _row_dots(W.float() @ ref, Q)
            quad = _row_dots(Q @ H.float(), Q)
            out.append(
                CandidateTerms(
                    group,
                    grid,
                    per_target(cross),
                    per_target(quad),
                    per_target(cross_rtn),
                    per_target(quad_rtn),
                )
            )
        return out

    def _stacked_weight(self, model: ir.Model, targets: Sequence[Target]) -> torch.Tensor:
        """The targets' weights ``[sum of out_features, in_features]`` on the solve device."""
        W = torch.cat(
            [
                weight_matrix(constant(model.graph.initializers[t.weight]), t.transposed, t.name)
                for t in targets
            ]
        )
        return W.to(torch_device(self.calibration.device))

    def _solve_stack(self, model, targets, grid, moments, codes):
        """One stacked solve: ``({weight: stored-layout dequantized weight}, results)``; the
        codes are kept in ``codes`` (memory-mapped)."""
        tensors = [model.graph.initializers[t.weight].const_value for t in targets]
        W = self._stacked_weight(model, targets)
        device = W.device
        t0 = time.perf_counter()
        if moments is None:  # RTN without calibration
            q = solve("rtn", W, grid=grid, name=targets[0].name)
            cross_rtn = quad_rtn = torch.zeros(W.shape[0])
        else:
            moments.H = moments.H.to(device)
            moments.G = moments.G.to(device)
            q, cross_rtn, quad_rtn = self._solve_rows(W, grid, moments, targets[0].name)
        seconds = time.perf_counter() - t0
        q = QuantizedWeight(
            torch.from_numpy(codes.keep(q.codes.cpu().numpy())),
            q.scales.cpu(),
            None if q.zero_points is None else q.zero_points.cpu(),
            q.grid,
            q.info,
        )
        solved, start, new = {}, 0, []
        for target, tensor in zip(targets, tensors, strict=False):
            rows = slice(start, start + target.out_features)
            part = q.rows(rows.start, rows.stop)
            start = rows.stop
            new.append(
                TargetResult(
                    target,
                    part,
                    seconds * target.out_features / W.shape[0],
                    float(cross_rtn[rows].sum()),
                    float(quad_rtn[rows].sum()),
                )
            )
            solved[target.weight] = stored_layout(
                part.dequantize(), target.transposed, tensor.dtype.numpy()
            )
        return solved, new

    def _solve_rows(self, W, grid, moments, name):
        """Solve ``W`` ``[C, d]`` from ``moments`` (owned), a block of ``row_block(C, d)`` rows
        at a time (rows are independent; the solver's weight-sized buffers then hold one
        block), with the report's RTN terms per row: ``(q, cross_rtn [C], quad_rtn [C])``."""
        opts = self.scheme.solver
        parts, cross, quad = [], [], []
        blocks = row_blocks(*W.shape)
        for i, (a, b) in enumerate(blocks):
            Wb = W[a:b]

            def rtn_terms(weight, scales, zero_points, Wb=Wb):
                # The RTN error of the report, per row: tr(W G Q^T) and tr(Q H Q^T), taken
                # before the solver frees H and G. Products in float32 (half the time of
                # float64; ~1e-6 relative), row sums in float64. In stage mode the measured
                # reference is W X~ (see TargetResult), so the cross term is H's.
                rtn = QuantizedWeight(
                    rtn_codes(Wb, grid, scales, zero_points),
                    scales,
                    zero_points,
                    grid,
                    SolveInfo("rtn"),
                ).dequantize()
                ref = moments.H if self.calibration.reference == "stage" else moments.G
                cross.append(_row_dots(Wb.float() @ ref.float(), rtn))
                quad.append(_row_dots(rtn @ moments.H.float(), rtn))

            last = i == len(blocks) - 1  # the last block may free the statistics
            parts.append(
                solve(
                    opts.algorithm,
                    Wb,
                    grid=grid,
                    act_order=opts.act_order,
                    damping=opts.damping,
                    solver_block=opts.solver_block,
                    variant=opts.variant,
                    magr=opts.magr,
                    name=name,
                    moments=moments if last else SecondMoments(moments.H, moments.G),
                    on_grid=rtn_terms,
                )
            )
        return QuantizedWeight.stack(parts), torch.cat(cross), torch.cat(quad)

    @staticmethod
    def _write(model: ir.Model, result: TargetResult) -> None:
        """Replace the target's weight by its dequantized value (computed when saved)."""
        target, weight = result.target, result.weight
        value = model.graph.initializers[target.weight]
        old = constant(value)
        dtype = old.dtype

        def dequantized() -> ir.Tensor:
            return ir.Tensor(
                stored_layout(weight.dequantize(), target.transposed, dtype.numpy()),
                name=value.name,
            )

        value.const_value = ir.LazyTensor(
            dequantized, dtype=dtype, shape=tensor_shape(old), name=value.name
        )
        node = model.graph.node(target.node)
        node.meta[QUANTIZED] = weight
        node.meta[TARGET] = target
