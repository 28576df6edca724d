"""The quantization scheme the passes read, built from valid ``Options``: the weight grid of
every layer (with per-pattern overrides), the solver, the activation quantizer, the lm_head
policy and which layers are quantized (``select_targets``: the one place targets are chosen)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import onnx_ir as ir

from .errors import RecipeWarning
from .ir.act_quant import ActQuant
from .ir.patterns import matches
from .ir.targets import Skipped, Target, TargetGroup, find_targets
from .options import Options, parse_grid_fields, parse_override
from .quant import Grid, Variant


@dataclass(frozen=True)
class SolverOptions:
    """How each layer is solved (see ``qronos_onnx.quant.solve``).

    Attributes:
        algorithm: a solver of ``registry.SOLVERS`` (``qronos`` by default).
        act_order: visit columns by decreasing ``diag(H)``.
        damping: relative damping; ``None`` for the solver's default.
        solver_block: lazy batch width of the column loop.
        variant: Qronos's first step: ``step`` (the paper) or ``ls``.
        magr: MagR's alpha before each solve (``quant.magr``); ``None``: off.
    """

    algorithm: str = "qronos"
    act_order: bool = True
    damping: float | None = None
    solver_block: int = 128
    variant: Variant = "step"
    magr: float | None = None


#: The lm_head grid of each ``lm_head`` policy: int4 in blocks of 32 (what ONNX Runtime
#: GenAI's builder writes, and its int8-activation kernel runs fast), int8 per channel.
LM_HEAD_GRIDS = {
    "int4": Grid(bits=4, group_size=32, symmetric=True),
    "int8": Grid(bits=8, group_size=None, symmetric=True),
}


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme.

    Attributes:
        grid: the weight grid of every target.
        solver: how layers are solved.
        lm_head: ``skip`` (the layer computing the logits stays float), ``int4`` or
            ``int8`` (its grid in ``LM_HEAD_GRIDS``, and at least int8 activations when
            ``act_quant`` is set; a tied lm_head gets its own weight first, and the format
            may store the embedding from it).
        include: when given, only targets matching one of these are quantized.
        exclude: targets left in float. Patterns are globs, or regexes written ``re:PATTERN``,
            matched against readable and node names.
        overrides: ``(pattern, grid)`` pairs: targets matching a pattern use its grid.
        act_quant: activation quantizer in front of every quantized layer (W4A4, W8A8).
        candidates: the grids a size budget chooses from (``budget.py``); empty: none.
        assigned: ``(target node, grid)`` pairs chosen for a budget: they come before
            every other rule, the lm_head's included.
    """

    grid: Grid = field(default_factory=lambda: Grid(bits=4, group_size=128))
    solver: SolverOptions = field(default_factory=SolverOptions)
    lm_head: Literal["skip", "int4", "int8"] = "skip"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Grid], ...] = ()
    act_quant: ActQuant | None = None
    candidates: tuple[Grid, ...] = ()
    assigned: tuple[tuple[str, Grid], ...] = ()

    @classmethod
    def of(cls, options: Options) -> Scheme:
        """The scheme of valid options (``Options`` checked every value)."""
        grid = Grid(
            bits=options.bits,
            symmetric=options.symmetric,
            group_size=None if options.group_size == "channel" else options.group_size,
            scale_search=options.scale_search,
        )
        act = (
            None
            if options.act_bits is None
            else ActQuant(
                bits=options.act_bits,
                granularity=options.act_granularity,
                symmetric=options.act_symmetric,
                clip=options.act_clip,
            )
        )
        overrides = []
        for spec in options.overrides:
            pattern, fields = parse_override(spec)
            overrides.append((pattern, dataclasses.replace(grid, **fields)))
        candidates = (
            ()
            if options.bits_per_weight is None
            else tuple(
                dataclasses.replace(grid, **parse_grid_fields(spec, "mix grid"))
                for spec in options.mix_grids
            )
        )
        return cls(
            grid=grid,
            candidates=candidates,
            solver=SolverOptions(
                algorithm=options.algo,
                act_order=options.act_order,
                damping=options.damping,
                magr=options.magr,
            ),
            lm_head=options.lm_head,
            include=options.include,
            exclude=options.exclude,
            overrides=tuple(overrides),
            act_quant=act,
        )

    @property
    def grids(self) -> list[Grid]:
        """Every grid a layer may get (the main grid, the overrides', the lm_head's)."""
        grids = [self.grid, *(g for _, g in self.overrides), *self.candidates]
        return grids + ([LM_HEAD_GRIDS[self.lm_head]] if self.lm_head != "skip" else [])

    @property
    def needs_statistics(self) -> bool:
        """Whether solving needs the calibration statistics (a solver that reads ``H``, MagR,
        an activation quantizer, whose quantized stream feeds them, and a size budget, whose
        candidates are measured on them)."""
        from .registry import SOLVERS

        return (
            SOLVERS[self.solver.algorithm].needs_h
            or self.solver.magr is not None
            or self.act_quant is not None
            or bool(self.candidates)
        )

    def select(self, model: ir.Model) -> tuple[list[TargetGroup], list[Skipped]]:
        """The layers this scheme quantizes, grouped by input, and the ones it leaves float
        with the reason (the one place targets are chosen)."""
        return find_targets(
            model,
            include_lm_head=self.lm_head != "skip",
            include=self.include,
            exclude=self.exclude,
        )

    def grid_for(self, target: Target) -> Grid:
        """The grid of one target: the lm_head policy's for the lm_head, else the first
        override whose pattern matches, else ``grid``; per channel where its groups are
        larger than the target's rows (``Grid.for_features``)."""
        assigned = dict(self.assigned).get(target.node)
        if assigned is not None:
            return assigned.for_features(target.in_features)
        grid = LM_HEAD_GRIDS[self.lm_head] if target.lm_head else self.requested_grid(target)
        return grid.for_features(target.in_features)

    def candidates_for(self, group: TargetGroup) -> list[Grid]:
        """The candidate grids of a group, as its targets would use them
        (``Grid.for_features``; repeats dropped). For the lm_head only those whose codes the
        embedding table can share (``formats/embedding.py``: 4- or 8-bit containers, groups
        that tile the row), else the lm_head policy's grid: an embedding left float would
        cost more than the lm_head saves."""
        d = group.in_features
        grids = [g.for_features(d) for g in self.candidates]
        if any(t.lm_head for t in group.targets):
            # (per channel never: MatMulNBits pads the row to a power-of-two block)
            shareable = [g for g in grids if g.bits >= 3 and d % (g.group_size or d + 1) == 0]
            grids = shareable or [LM_HEAD_GRIDS[self.lm_head].for_features(d)]
        return list(dict.fromkeys(grids))

    def requested_grid(self, target: Target) -> Grid:
        """The grid the scheme names for a (non-lm_head) target: the first override whose
        pattern matches, else ``grid``."""
        for pattern, grid in self.overrides:
            if matches([pattern], target.name, target.node):
                return grid
        return self.grid

    def act_quant_for(self, target: Target) -> ActQuant | None:
        """The activation quantizer in front of a target: ``act_quant``, but at least 8 bits
        for the lm_head (policy ``int8`` with activation quantization: W8A8 there)."""
        if self.act_quant is None or not target.lm_head:
            return self.act_quant
        return dataclasses.replace(self.act_quant, bits=max(8, self.act_quant.bits))

    def warn_mismatches(self, targets: Sequence[Target], skipped: Sequence[Skipped]) -> None:
        """Warn (``RecipeWarning``) about what in the scheme changes nothing or less than
        asked: include / exclude patterns that match no layer, override patterns that match
        no quantized layer whose grid they can set (the lm_head's is fixed by the lm_head
        policy), and groups wider than some layers' rows (those get one scale per output
        channel)."""
        layers = [(t.name, t.node) for t in targets] + [(s.name, s.node) for s in skipped]
        quantized = [(t.name, t.node) for t in targets if not t.lm_head]
        heads = [(t.name, t.node) for t in targets if t.lm_head]
        checks = (
            [("include", p, layers) for p in self.include]
            + [("exclude", p, layers) for p in self.exclude]
            + [("override", p, quantized) for p, _ in self.overrides]
        )
        for option, pattern, names in checks:
            if not any(matches([pattern], *n) for n in names):
                example = f" (names look like {names[0][0]!r})" if names else ""
                head = (
                    "; the lm_head's grid is set by the lm_head policy (--lm-head)"
                    if option == "override" and any(matches([pattern], *n) for n in heads)
                    else ""
                )
                warnings.warn(
                    f"{option} pattern {pattern!r} matches no "
                    f"{'quantized ' if option == 'override' else ''}layer{example}{head}; "
                    "`qronos-onnx inspect MODEL` lists them",
                    RecipeWarning,
                    stacklevel=2,
                )
        wide: dict[int, list[Target]] = {}
        for t in targets:
            size = None if t.lm_head else self.requested_grid(t).group_size
            if size is not None and size > t.in_features:
                wide.setdefault(size, []).append(t)
        for size, narrow in wide.items():
            widest = max(narrow, key=lambda t: t.in_features)
            warnings.warn(
                f"group size {size} is larger than the input features of {len(narrow)} "
                f"layer(s) (up to {widest.in_features}, at {widest.name}): they get one "
                "scale per output channel",
                RecipeWarning,
                stacklevel=2,
            )
