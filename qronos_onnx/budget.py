"""A size budget instead of a bit width: each layer group's grid is chosen from a menu of
candidates by its measured error, so that the stored size of the quantized layers stays
within the budget (``--bits-per-weight``).

The pipeline does it in two calibration runs (``pipeline.choose_grids``):

1. **Measure.** One two-stream run solves every group at every candidate grid and records,
   per target, the output error each leaves on the quantized stream, ``||W X - Q X~||^2 / n
   = ||W X||^2/n - 2 tr(W G Q^T) + tr(Q H Q^T)`` (Qronos's own objective, from ``H`` and
   ``G``; ``||W X||^2/n`` measured by ONNX Runtime), and the same for round-to-nearest codes.
   The quantized stream advances with the scheme's own grid (``--bits``, ``--group-size``).
2. **Allocate.** A multiple-choice knapsack (``allocate``): the choice of one candidate per
   group that minimises the summed sensitivity (``WEIGHTINGS``) with the summed stored bytes
   (the format's ``stored_bytes``, exact) at most the budget.

The run that follows solves every group at its chosen grid, in order: each group sees the
earlier ones at their chosen grids. A group is the targets that read one input (q/k/v,
gate/up): they share one choice, so that fused and packed projections stay fusable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import QronosError
from .ir.targets import Target, TargetGroup
from .quant import Grid

if TYPE_CHECKING:
    from .passes.calibrate import CandidateTerms


@dataclass
class Candidate:
    """One grid of one group, measured.

    Attributes:
        grid: the grid (as the group's targets use it: ``Grid.for_features``).
        bytes: stored bytes of the group's targets on it (codes, scales, zero points).
        errors: per target, ``||W X - Q X~||^2 / n`` of the solved codes.
        errors_rtn: the same for round-to-nearest codes on the grid.
    """

    grid: Grid
    bytes: int
    errors: list[float]
    errors_rtn: list[float]


@dataclass
class Unit:
    """A group of targets sharing one choice.

    Attributes:
        targets: the targets' readable names.
        nodes: their node names.
        parameters: their weights' entries.
        output_ref: per target, ``||W X||^2 / n`` (the float layer's output energy).
        candidates: the measured grids, cheapest first.
        choice: the index of the chosen candidate (``allocate``).
        why: the trade at the choice (``allocate``): its sensitivity and size against the
            next cheaper and the next larger candidate.
    """

    targets: list[str]
    nodes: list[str]
    parameters: int
    output_ref: list[float]
    candidates: list[Candidate]
    choice: int | None = None
    why: str = ""

    @property
    def chosen(self) -> Candidate:
        assert self.choice is not None, "not allocated"
        return self.candidates[self.choice]


#: How a candidate's measured errors become the sensitivity the allocation sums:
#: ``absolute`` (the default), the errors themselves (layers with larger outputs count more);
#: ``relative``, each target's error relative to its output energy (every layer's output
#: counts alike). On SmolLM2: 15.73 against 15.93 at 4.63 bits per weight, 43.6 against 50.9
#: at 3.47 (benchmarks/RESULTS.md, issue 25).
WEIGHTINGS: dict[str, Callable[[Unit, Candidate], float]] = {
    "relative": lambda u, c: sum(
        e / r if r > 0 else 0.0 for e, r in zip(c.errors, u.output_ref, strict=True)
    ),
    "absolute": lambda u, c: float(sum(c.errors)),
}

#: The knapsack's byte axis has this many steps (costs are rounded up to a step, so the
#: budget always holds; the optimum is within one step per group of the exact one).
KNAPSACK_STEPS = 20_000


@dataclass
class Allocation:
    """The grids chosen for a budget.

    Attributes:
        bits_per_weight: the budget, in stored bits per quantized weight.
        budget_bytes: the budget in bytes.
        used_bytes: the stored bytes of the choice (at most ``budget_bytes``).
        weighting: the sensitivity summed (``WEIGHTINGS``).
        min_bits: the narrowest code width allowed (``narrowest_width``).
        units: every group with its candidates and its choice.
    """

    bits_per_weight: float
    budget_bytes: int
    used_bytes: int
    weighting: str
    min_bits: int
    units: list[Unit] = field(default_factory=list)

    @property
    def assigned(self) -> tuple[tuple[str, Grid], ...]:
        """``(target node, grid)`` for every target (``Scheme.assigned``)."""
        return tuple((n, u.chosen.grid) for u in self.units for n in u.nodes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def allocate(units: Sequence[Unit], bits_per_weight: float, weighting: str) -> Allocation:
    """Choose one candidate per unit (``Unit.choice``, set in place): the least summed
    ``WEIGHTINGS[weighting]`` whose stored bytes fit ``bits_per_weight`` times the units'
    parameters (a multiple-choice knapsack, solved by dynamic programming over bytes), among
    the candidates of at least ``min_bits`` (``narrowest_width``).

    Raises:
        QronosError: the budget is below the cheapest choice (the message gives it).
    """
    score = WEIGHTINGS[weighting]
    budget = require_feasible(units, bits_per_weight)
    floor = narrowest_width(units, budget)
    allowed = [[i for i, c in enumerate(u.candidates) if c.grid.bits >= floor] for u in units]
    step = max(1, math.ceil(budget / KNAPSACK_STEPS))
    cap = budget // step
    best = np.full(cap + 1, np.inf)  # best[b]: least score with rounded bytes exactly b
    best[0] = 0.0
    picks = []
    for unit, indices in zip(units, allowed, strict=True):
        new = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1, dtype=np.int16)
        for i in indices:
            c = unit.candidates[i]
            w = math.ceil(c.bytes / step)
            if w > cap:
                continue
            value = best[: cap + 1 - w] + score(unit, c)
            better = value < new[w:]
            new[w:][better] = value[better]
            pick[w:][better] = i
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():  # the budget is within the rounding of the cheapest
        for unit, indices in zip(units, allowed, strict=True):
            unit.choice = min(indices, key=lambda i: unit.candidates[i].bytes)
    else:
        b = int(np.argmin(best))
        for unit, pick in zip(reversed(units), reversed(picks), strict=True):
            unit.choice = int(pick[b])
            b -= math.ceil(unit.chosen.bytes / step)
    for unit in units:
        unit.why = _why(unit, score)
    used = sum(u.chosen.bytes for u in units)
    return Allocation(bits_per_weight, budget, used, weighting, floor, list(units))


def narrowest_width(units: Sequence[Unit], budget: int) -> int:
    """The widest code width ``w`` such that every unit has a candidate of at least ``w``
    bits and their cheapest such ones fit ``budget``: no unit is given fewer bits than the
    budget needs. Measured on SmolLM2-135M, summed output errors undervalue what int2 costs
    against what int8 gains: a budget that every layer fits at int4 got two int2 groups to
    pay for seven int8 ones, and was worse than the same size without them
    (benchmarks/RESULTS.md, issue 25)."""
    for width in sorted({c.grid.bits for u in units for c in u.candidates}, reverse=True):
        wide = [[c.bytes for c in u.candidates if c.grid.bits >= width] for u in units]
        if all(wide) and sum(min(sizes) for sizes in wide) <= budget:
            return width
    return min(c.grid.bits for u in units for c in u.candidates)


def _why(unit: Unit, score: Callable[[Unit, Candidate], float]) -> str:
    """``"s8 g64: 0.0123 at 0.26 MB; a4 g64 would add 0.0456 and save 0.12 MB"``."""

    def name(c: Candidate) -> str:
        g = c.grid
        group = f"g{g.group_size}" if g.group_size else "ch"
        return f"{'s' if g.symmetric else 'a'}{g.bits} {group}"

    chosen = unit.chosen
    text = f"{name(chosen)}: {score(unit, chosen):.4g} at {chosen.bytes / 1e6:.3f} MB"
    others = sorted(unit.candidates, key=lambda c: c.bytes)
    smaller = [c for c in others if c.bytes < chosen.bytes]
    larger = [c for c in others if c.bytes > chosen.bytes]
    if smaller:
        c = smaller[-1]
        text += (
            f"; {name(c)} would add {score(unit, c) - score(unit, chosen):.4g} and save "
            f"{(chosen.bytes - c.bytes) / 1e6:.3f} MB"
        )
    if larger:
        c = larger[0]
        text += (
            f"; {name(c)} would take {score(unit, chosen) - score(unit, c):.4g} off for "
            f"{(c.bytes - chosen.bytes) / 1e6:.3f} MB more"
        )
    return text


def require_feasible(units: Sequence[Unit], bits_per_weight: float) -> int:
    """The budget in bytes (``bits_per_weight`` over the units' parameters); a
    ``QronosError`` when the units' cheapest choice is over it."""
    parameters = sum(u.parameters for u in units)
    budget = int(bits_per_weight * parameters / 8)
    least = sum(min(c.bytes for c in u.candidates) for u in units)
    if least > budget:
        raise QronosError(
            f"a budget of {bits_per_weight:g} bits per weight ({budget / 1e6:.2f} MB) is below "
            f"the smallest choice of the candidate grids: {8 * least / parameters:.3f} bits per "
            f"weight ({least / 1e6:.2f} MB); raise --bits-per-weight or add a smaller grid to "
            "--mix-grids"
        )
    return budget


def units_from_report(report: dict[str, Any]) -> list[Unit]:
    """The measured units of an earlier run's report (``Report.budget``), for
    ``--sensitivity``; a ``QronosError`` when it holds none."""
    budget = report.get("budget")
    if not budget or "units" not in budget:
        raise QronosError(
            "the sensitivity report holds no measured grids: give the report of a run made "
            "with --bits-per-weight"
        )
    return [
        Unit(
            u["targets"],
            u["nodes"],
            u["parameters"],
            u["output_ref"],
            [
                Candidate(Grid(**c["grid"]), c["bytes"], c["errors"], c["errors_rtn"])
                for c in u["candidates"]
            ],
        )
        for u in budget["units"]
    ]


def check_units(units: Sequence[Unit], expected: Sequence[Unit]) -> None:
    """Refuse reused measurements (``--sensitivity``) that do not fit this run: other layer
    groups, or other candidate grids or sizes (``QronosError``)."""
    key = [(u.nodes, [(c.grid, c.bytes) for c in u.candidates]) for u in units]
    want = [(u.nodes, [(c.grid, c.bytes) for c in u.candidates]) for u in expected]
    if key != want:
        raise QronosError(
            "the sensitivity report measured other layer groups or candidate grids than this "
            "run has (another model, rotation, lm_head policy, format or --mix-grids): run "
            "without --sensitivity to measure them"
        )


def plan_units(
    groups: Sequence[TargetGroup],
    candidates_for: Callable[[TargetGroup], list[Grid]],
    layer_bytes: Callable[[Grid, Target], int],
) -> list[Unit]:
    """One unmeasured unit per group: its candidates (cheapest first) with their stored
    bytes (``layer_bytes(grid, target)`` summed over the group)."""
    units = []
    for group in groups:
        candidates = [
            Candidate(grid, sum(layer_bytes(grid, t) for t in group.targets), [], [])
            for grid in candidates_for(group)
        ]
        candidates.sort(key=lambda c: c.bytes)
        units.append(
            Unit(
                [t.name for t in group.targets],
                [t.node for t in group.targets],
                sum(t.in_features * t.out_features for t in group.targets),
                [],
                candidates,
            )
        )
    return units


def measure_units(
    units: Sequence[Unit],
    measured: Sequence[CandidateTerms],
    output_error: Mapping[str, tuple[float, float]],
) -> None:
    """Fill ``units`` (from ``plan_units``) with the measured errors: each target's
    ``||W X||^2 / n`` from ``output_error`` (``CalibrationRun.output_error``, node ->
    ``(reference, error)``) and each candidate's errors from its ``CandidateTerms``."""
    terms = {(m.group.targets[0].node, m.grid): m for m in measured}
    for unit in units:
        unit.output_ref = [output_error[n][0] for n in unit.nodes]
        for c in unit.candidates:
            m = terms[(unit.nodes[0], c.grid)]
            c.errors = _errors(unit.output_ref, m.cross, m.quad)
            c.errors_rtn = _errors(unit.output_ref, m.cross_rtn, m.quad_rtn)


def _errors(ref: Sequence[float], cross: Sequence[float], quad: Sequence[float]) -> list[float]:
    """``||W X||^2/n - 2 tr(W G Q^T) + tr(Q H Q^T)`` per target (at least 0: rounding)."""
    return [max(0.0, r - 2 * x + q) for r, x, q in zip(ref, cross, quad, strict=True)]
