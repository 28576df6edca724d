"""The recipe the passes read, built from an ``OptimizeConfig`` (``options.py``): the weight
grid of every layer (with per-pattern overrides), the solver, the activation quantizer and the
lm_head policy; and the check that a format can hold the grids."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import QronosError, RecipeWarning
from .ir.act_quant import ActQuant
from .ir.packing import block_size_for, container_bits
from .ir.patterns import check_patterns, matches
from .ir.targets import Skipped, Target
from .options import OptimizeConfig
from .quant import ALGORITHMS, MAX_DAMPING, Grid, Variant


@dataclass(frozen=True)
class SolverOptions:
    """How each layer is solved (see ``qronos_onnx.quant.solve``).

    Attributes:
        algorithm: ``qronos`` (default), ``gptq``, ``gpfq`` or ``rtn``.
        act_order: visit columns by decreasing ``diag(H)``.
        damping: relative damping; ``None`` for the algorithm's default.
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

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}"
            )
        if self.solver_block < 1:
            raise ValueError(f"solver_block must be >= 1, got {self.solver_block}")
        if self.damping is not None and not 0 <= self.damping <= MAX_DAMPING:
            raise ValueError(
                f"damping must be a number in [0, {MAX_DAMPING:g}], got {self.damping}"
            )
        if self.magr is not None and not 0 < self.magr < math.inf:
            raise ValueError(f"magr must be a finite number > 0, got {self.magr}")


#: The lm_head grid under ``lm_head="int8"``.
LM_HEAD_INT8 = Grid(bits=8, group_size=None, symmetric=True)


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe.

    Attributes:
        grid: the weight grid of every target.
        solver: how layers are solved.
        lm_head: ``skip`` (the layer computing the logits stays float) or ``int8`` (int8 per
            output channel, and int8 activations when ``act_quant`` is set; a tied lm_head
            gets its own weight first).
        include: when given, only targets matching one of these are quantized.
        exclude: targets left in float. Patterns are globs, or regexes written ``re:PATTERN``,
            matched against readable and node names.
        overrides: ``(pattern, grid)`` pairs: targets matching a pattern use its grid.
        act_quant: activation quantizer in front of every quantized layer (W4A4, W8A8).
    """

    grid: Grid = field(default_factory=lambda: Grid(bits=4, group_size=128))
    solver: SolverOptions = field(default_factory=SolverOptions)
    lm_head: Literal["skip", "int8"] = "skip"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Grid], ...] = ()
    act_quant: ActQuant | None = None

    def __post_init__(self) -> None:
        if self.lm_head not in ("skip", "int8"):
            raise ValueError(f"lm_head must be 'skip' or 'int8', got {self.lm_head!r}")

    @property
    def needs_statistics(self) -> bool:
        """Whether solving needs the calibration statistics (every solver but RTN, MagR, and
        an activation quantizer, whose quantized stream feeds them)."""
        return (
            self.solver.algorithm != "rtn"
            or self.solver.magr is not None
            or self.act_quant is not None
        )

    def grid_for(self, target: Target) -> Grid:
        """The grid of one target: int8 per channel for the lm_head (policy ``int8``), else
        the first override whose pattern matches, else ``grid``; per channel where its groups
        are larger than the target's rows (``Grid.for_features``)."""
        if target.lm_head:
            return LM_HEAD_INT8
        return self.requested_grid(target).for_features(target.in_features)

    def requested_grid(self, target: Target) -> Grid:
        """The grid the recipe names for a (non-lm_head) target: the first override whose
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


def recipe_for(config: OptimizeConfig) -> Recipe:
    """The recipe of a configuration.

    Raises:
        QronosError: a value the grids, solver or patterns refuse (a bad override, a damping
            beyond the solver's bound, a regex that does not compile).
    """
    try:
        grid = Grid(
            bits=config.bits,
            symmetric=config.symmetric,
            group_size=None if config.group_size == "channel" else config.group_size,
            scale_search=config.scale_search,
        )
        act = (
            None
            if config.act_bits is None
            else ActQuant(
                bits=config.act_bits,
                granularity=config.act_granularity,
                symmetric=config.act_symmetric,
                clip=config.act_clip,
            )
        )
        recipe = Recipe(
            grid=grid,
            solver=SolverOptions(
                algorithm=config.algo,
                act_order=config.act_order,
                damping=config.damping,
                magr=config.magr,
            ),
            lm_head=config.lm_head,
            include=config.include,
            exclude=config.exclude,
            overrides=tuple(parse_override(o, grid) for o in config.overrides),
            act_quant=act,
        )
    except ValueError as err:
        raise QronosError(str(err)) from err
    check_patterns(recipe.include, "include")
    check_patterns(recipe.exclude, "exclude")
    return recipe


def parse_override(spec: str, default: Grid) -> tuple[str, Grid]:
    """``PATTERN=bits:8,group:32,sym`` -> ``(pattern, grid)``.

    Keys: ``bits:N``, ``group:N`` or ``group:channel``, ``sym`` or ``asym``, each at most once;
    unspecified ones come from ``default``.
    """
    pattern, sep, rest = spec.rpartition("=")
    if not sep or not pattern:
        raise QronosError(f"override {spec!r}: expected PATTERN=bits:N,group:N|channel,sym|asym")
    check_patterns([pattern], "override")
    items = [item for item in rest.split(",") if item]
    keys = [item.partition(":")[0] for item in items]
    if not items:
        raise QronosError(
            f"override {spec!r} sets nothing: give bits:N, group:N|channel, sym or asym after '='"
        )
    if len(set(keys)) < len(keys) or {"sym", "asym"} <= set(keys):
        raise QronosError(f"override {spec!r} sets a key twice or both sym and asym")
    fields = {
        "bits": default.bits,
        "group_size": default.group_size,
        "symmetric": default.symmetric,
        "scale_search": default.scale_search,
    }
    for item in items:
        key, _, value = item.partition(":")
        try:
            if key == "bits":
                fields["bits"] = int(value)
            elif key == "group":
                fields["group_size"] = None if value == "channel" else int(value)
            elif key in ("sym", "asym") and not value:
                fields["symmetric"] = key == "sym"
            else:
                raise ValueError(item)
        except ValueError as err:
            raise QronosError(
                f"override {spec!r}: cannot read {item!r} (keys: bits:N, "
                "group:N|channel, sym, asym)"
            ) from err
    try:
        return pattern, Grid(**fields)  # type: ignore[arg-type]
    except ValueError as err:
        raise QronosError(f"override {spec!r}: {err}") from err


def check_format(recipe: Recipe, fmt: str) -> list[str]:
    """Refuse grids the format cannot hold, before any work; return notes for the report."""
    notes = []
    grids = [recipe.grid, *(g for _, g in recipe.overrides)]
    if fmt == "matmulnbits":
        for grid in grids:
            if grid.group_size is not None:
                try:
                    block_size_for(grid.group_size, grid.group_size)
                except ValueError as err:
                    raise QronosError(f"{err}: use format qdq, or group_size 16/32/64/128") from err
            if container_bits(grid.bits) != grid.bits:
                notes.append(
                    f"{grid.bits}-bit codes are stored in MatMulNBits' "
                    f"{container_bits(grid.bits)}-bit container (ONNX Runtime's kernel "
                    "takes 2, 4 and 8 bits); the file is that much larger"
                )
    if fmt == "qdq":
        notes.extend(
            f"{g.bits}-bit codes are stored as {'int4' if g.bits < 4 else 'int8'}"
            for g in grids
            if g.bits not in (4, 8)
        )
    return notes


def warn_recipe_mismatches(
    recipe: Recipe, targets: Sequence[Target], skipped: Sequence[Skipped]
) -> None:
    """Warn (``RecipeWarning``) about what in a recipe changes nothing or less than asked:
    include / exclude patterns that match no layer, override patterns that match no quantized
    layer whose grid they can set (the lm_head's is fixed by the lm_head policy), and groups
    wider than some layers' rows (those get one scale per output channel)."""
    layers = [(t.name, t.node) for t in targets] + [(s.name, s.node) for s in skipped]
    quantized = [(t.name, t.node) for t in targets if not t.lm_head]
    heads = [(t.name, t.node) for t in targets if t.lm_head]
    checks = (
        [("include", p, layers) for p in recipe.include]
        + [("exclude", p, layers) for p in recipe.exclude]
        + [("override", p, quantized) for p, _ in recipe.overrides]
    )
    for option, pattern, names in checks:
        if not any(matches([pattern], *n) for n in names):
            example = f" (names look like {names[0][0]!r})" if names else ""
            head = (
                "; the lm_head's grid is set by the lm_head policy (int8 per channel)"
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
        size = None if t.lm_head else recipe.requested_grid(t).group_size
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
