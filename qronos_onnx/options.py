"""Every option of ``optimize``, ``eval`` and ``export``, declared once (``schema.py``).

``Options`` are the options of ``optimize``; ``EvalOptions`` of ``eval`` (and the Python API's
``evaluate``); ``ExportOptions`` of ``export``. From these declarations come the command
line's parsers (``cli.py``), the Python API's keyword arguments and their checks
(``api.py``), the Olive pass's parameters (``olive/qronos_pass.py``), recipe files (YAML
mappings of option names to values: ``recipes.py``; the presets ``--w4``, ... are recipe
files) and ``docs/options.md``.

This module imports neither torch nor ONNX, so that ``qronos-onnx --help`` stays instant; the
quantization scheme the passes read (``scheme.Scheme``) is built from valid ``Options``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from . import registry
from .errors import QronosError
from .ir.patterns import check_patterns
from .schema import Range, Schema, Switch, option

#: The built-in calibration and evaluation text (see ``calibration/data.py``).
WIKI_VITAL = "wiki-vital"
#: Evaluation defaults (``qronos-onnx eval``), the README's protocol.
DEFAULT_EVAL_WINDOWS = 40
DEFAULT_SEQLEN = 512
#: The report beside an output; ``{stem}`` is the output's name without ``.onnx``.
DEFAULT_REPORT = "{stem}.report.json"

PRESETS = ("w4", "w3mix", "w3", "w2", "w4a4", "w8a8")
DEFAULT_PRESET = "w4"

GroupSize = int | Literal["channel"]
Device = Literal["auto", "cpu", "cuda"]
Exporter = Literal["auto", "genai", "torch"]
ExportDtype = Literal["fp32", "fp16"]

#: The grids a size budget chooses from by default: the widths ONNX Runtime's MatMulNBits
#: runs (2, 4, 8 bits), from 2.5 to 8.5 stored bits per weight with float32 scales. One width
#: at two block sizes lets a layer whose input is not a multiple of 128 (MatMulNBits pads K
#: to whole blocks: 576 inputs take 640 codes per row in blocks of 128) take the smaller one.
MIX_GRIDS = (
    "bits:2,group:64,asym",
    "bits:2,group:32,asym",
    "bits:4,group:128,asym",
    "bits:4,group:64,asym",
    "bits:4,group:32,sym",
    "bits:8,group:64,sym",
)
#: Weight and activation widths.
BITS = Range(2, 8)
#: Seeds are 64-bit.
SEEDS = Range(0, (1 << 64) - 1)
#: MagR's strength, relative to ``lambda_max(H) = 1``: the reference uses 1e-3 per channel
#: and 1e-4 per group; from about 1 on it zeroes whole rows, and below 1e-8 its proximal step
#: overflows float32.
MAGR = Range(1e-8, 1e-2)
#: Activation clip ratio: below 0.1 a per-token grid saturates nearly every feature.
ACT_CLIP = Range(0.1, 1)


def _device_option(what: str) -> Any:
    return option("auto", f"{what} (auto: CUDA when present)")


def _tokenizer_option() -> Any:
    return option(
        None,
        "tokenizer.json or a tokenizer directory (default: beside the model)",
        metavar="PATH",
        path=True,
    )


def _exporter_option(**kw: Any) -> Any:
    return option(
        "auto",
        "how a Hugging Face checkpoint is exported: ONNX Runtime GenAI's model builder, "
        "torch.onnx, or auto (the builder when installed and able, else torch.onnx)",
        **kw,
    )


def _progress_option(**kw: Any) -> Any:
    return option(
        True,
        "progress bars (shown only when stderr is a terminal)",
        takes_value=False,
        switches=(Switch(("-q", "--quiet"), False, "no progress bars"),),
        **kw,
    )


@dataclass(frozen=True)
class Options(Schema):
    """Every option of ``optimize``; see the module docstring. Values are checked on
    construction: a wrong type is a ``TypeError``, a bad value a ``QronosError``, both naming
    the option."""

    # -- the weight grid --------------------------------------------------------------------
    bits: int = option(4, "weight bits", valid=BITS)
    group_size: GroupSize = option(
        32,
        "input features per scale, or 'channel' for one scale per output channel (a group "
        "wider than a layer's input is per channel there)",
        metavar="N|channel",
        valid=Range(1, math.inf),
        switches=(
            Switch(
                ("--per-channel",),
                "channel",
                "one scale per output channel (the same as --group-size channel)",
            ),
        ),
    )
    symmetric: bool = option(
        True,
        "symmetric grid (no zero point) or asymmetric (an integer zero point)",
        takes_value=False,
        switches=(
            Switch(("--sym",), True, "symmetric weight grid, no zero point (default)"),
            Switch(("--asym",), False, "asymmetric weight grid with an integer zero point"),
        ),
    )
    scale_search: Literal["minmax", "mse"] = option(
        "mse",
        "weight scales: the range of each group (minmax), or the shrink of it with the "
        "least squared rounding error (mse)",
    )
    # -- activations ------------------------------------------------------------------------
    act_bits: int | None = option(
        None,
        "quantize the input of every quantized layer to N bits; none: weights only",
        metavar="N|none",
        valid=BITS,
    )
    act_granularity: Literal["token", "tensor"] = option(
        "token",
        "activation scales: per token (dynamic, symmetric) or per tensor (static, calibrated)",
    )
    act_symmetric: bool = option(
        True,
        "symmetric activation codes, or uint8 with a zero point (per tensor, 8 bits)",
        takes_value=False,
        switches=(
            Switch(("--act-sym",), True, "signed activation codes, no zero point (default)"),
            Switch(("--act-asym",), False, "uint8 activations with a zero point (static, 8 bits)"),
        ),
    )
    act_clip: float = option(
        1.0,
        "activation scales cover this fraction of the range (each token's max |x|, or the "
        "calibrated range); values beyond saturate",
        metavar="R",
        valid=ACT_CLIP,
    )
    # -- incoherence processing (docs/rotations.md) -----------------------------------------
    rotate: str = option(
        "none",
        "rotate the float network before calibration (the kind of rotation): random "
        "Hadamards on the residual stream, per attention head and before down_proj; checked "
        "against the float model's logits",
        choices=lambda: ("none", *registry.ROTATIONS),
    )
    rotate_sites: tuple[str, ...] = option(
        registry.ROTATION_SITES,
        "where rotations go: R1 the residual stream (fused), R2 per attention head (fused), "
        "R4 online before every MLP down projection",
        metavar="SITE",
        choices=lambda: registry.ROTATION_SITES,
    )
    rotate_seed: int = option(0, "seed of the rotations' random signs", valid=SEEDS)
    magr: float | None = option(
        None,
        "MagR before each solve: shrink each row's (or group's) largest weights keeping the "
        "layer's output, with this strength alpha (1e-3 per channel, 1e-4 per group in the "
        "paper); none: off",
        metavar="ALPHA|none",
        valid=MAGR,
    )
    # -- the solver -------------------------------------------------------------------------
    algo: str = option(
        "qronos",
        "the solver: " + "; ".join(f"{s.name}: {s.summary}" for s in registry.SOLVERS.values()),
        choices=lambda: tuple(registry.SOLVERS),
    )
    damping: float | None = option(
        None,
        "relative damping; none: the solver's default ("
        + ", ".join(
            f"{s.name} {s.damping:g} x {s.damping_reference}"
            for s in registry.SOLVERS.values()
            if s.damping is not None
        )
        + ")",
        metavar="X|none",
        valid=registry.DAMPING,
    )
    act_order: bool = option(
        True,
        "visit columns by decreasing diag(H)",
        takes_value=False,
        switches=(Switch(("--no-act-order",), False, "solve columns in stored order"),),
    )
    reference: Literal["network", "stage"] = option(
        "network",
        "where X comes from: the float network, or the float stage applied to the "
        "quantized stream's inputs",
    )
    # -- what to quantize, and how it is written --------------------------------------------
    lm_head: Literal["skip", "int4", "int8"] = option(
        "int4",
        "the logits layer: int4 in blocks of 32 (solved like every layer; the embedding "
        "table becomes a GatherBlockQuantized sharing its codes when tied), int8 per channel, "
        "or skip: lm_head and embedding stay float",
    )
    include: tuple[str, ...] = option(
        (),
        "quantize only matching layers (globs, or re:REGEX, on module paths and node names)",
        metavar="PATTERN",
    )
    exclude: tuple[str, ...] = option((), "leave matching layers in float", metavar="PATTERN")
    overrides: tuple[str, ...] = option(
        (),
        "per-layer grids, e.g. '*down_proj=bits:8,group:32' or '*.k_proj=group:channel,"
        "sym' (keys: bits:N, group:N|channel, sym, asym)",
        metavar="PATTERN=SPEC",
        flag="--override",
    )
    # -- a size budget instead of one grid (qronos_onnx/budget.py) ---------------------------
    bits_per_weight: float | None = option(
        None,
        "a size budget: stored bits per weight of the quantized layers (codes, scales, zero "
        "points), each layer group's grid chosen from --mix-grids by the error it measures "
        "(one more calibration run); none: every layer on the one grid",
        metavar="B|none",
        valid=Range(1, 32),
    )
    mix_grids: tuple[str, ...] = option(
        MIX_GRIDS,
        "the grids a size budget chooses from (as --override's: bits:N,group:N|channel,"
        "sym|asym; the scale search is --scale-search)",
        metavar="SPEC",
    )
    mix_weighting: Literal["relative", "absolute"] = option(
        "absolute",
        "what a size budget minimises: the sum of the layers' output errors (absolute), or of "
        "each one relative to its output (relative)",
    )
    sensitivity: str | None = option(
        None,
        "the report of an earlier --bits-per-weight run of the same model and options: reuse "
        "its measured errors instead of measuring (another budget in one calibration run)",
        metavar="REPORT.json",
        path=True,
    )
    format: str = option(
        "matmulnbits",
        "output format: " + ", ".join(registry.FORMATS) + " (docs/options.md says what each "
        "writes)",
        choices=lambda: tuple(registry.FORMATS),
    )
    accuracy_level: int | None = option(
        4,
        "MatMulNBits accuracy_level: 4, int8 blocks of the activations in ONNX Runtime's "
        "CPU kernel (2x faster), where it has them (4/8 bits, blocks 16-256), seen by the "
        "solver; 0 or none: float activations (exact)",
        metavar="0..4|none",
        valid=Range(0, 4),
    )
    genai_config: bool = option(
        False,
        "write a genai_config.json (and the tokenizer files) beside the output, so that "
        "ONNX Runtime GenAI runs it; automatic when the input has one",
        takes_value=False,
        switches=(
            Switch(
                ("--genai-config",),
                True,
                "write a genai_config.json for ONNX Runtime GenAI (automatic when the input "
                "model has one)",
            ),
        ),
    )
    # -- a Hugging Face checkpoint as the input ----------------------------------------------
    exporter: Exporter = _exporter_option(olive=False)
    export_dtype: ExportDtype = option(
        "fp32", "the float type of a checkpoint's export", olive=False
    )
    keep_float: bool = option(
        False,
        "keep a checkpoint's float export in OUTPUT_DIR/float",
        takes_value=False,
        olive=False,
        switches=(
            Switch(("--keep-float",), True, "keep a checkpoint's float export in OUTPUT_DIR/float"),
        ),
    )
    # -- calibration data -------------------------------------------------------------------
    calib_data: str = option(
        WIKI_VITAL, f"a text file, or '{WIKI_VITAL}'", metavar="PATH", path=True
    )
    calib_windows: int = option(32, "calibration windows", valid=Range(1, math.inf))
    seqlen: int = option(DEFAULT_SEQLEN, "tokens per calibration window", valid=Range(2, math.inf))
    tokenizer: str | None = _tokenizer_option()
    # -- the run ----------------------------------------------------------------------------
    device: Device = _device_option("ONNX Runtime provider and torch device")
    max_memory: float | None = option(
        None,
        "host memory (GB) for the activations kept between calibration stages; beyond it they "
        "go to a file in the output's staging folder (the numbers do not change); none: half "
        "of the memory available when the run starts",
        metavar="GB|none",
        valid=Range(0, math.inf, open_low=True),
    )
    report: str | None = option(
        DEFAULT_REPORT,
        "report file name beside the output ({stem}: the output's name without "
        ".onnx); none: no report",
        metavar="NAME|none",
        olive=False,
    )
    force: bool = option(
        False,
        "overwrite existing outputs",
        takes_value=False,
        olive=False,
        recipe=False,
        switches=(
            Switch(
                ("--force",),
                True,
                "overwrite an existing output (the input model is never overwritten)",
            ),
        ),
    )
    progress: bool = _progress_option(olive=False)

    def check(self) -> None:
        if not self.act_symmetric and (self.act_granularity == "token" or self.act_bits != 8):
            raise QronosError("asymmetric activations need act_granularity='tensor' and act_bits=8")
        if len(set(self.rotate_sites)) < len(self.rotate_sites):
            raise QronosError(f"rotate_sites names a site twice: {' '.join(self.rotate_sites)}")
        check_patterns(self.include, "include")
        check_patterns(self.exclude, "exclude")
        for spec in self.overrides:
            parse_override(spec)
        for spec in self.mix_grids:
            parse_grid_fields(spec, f"mix grid {spec!r}")
        if self.bits_per_weight is not None and not self.mix_grids:
            raise QronosError("a size budget (bits_per_weight) needs at least one mix grid")
        if self.sensitivity is not None and self.bits_per_weight is None:
            raise QronosError(
                "sensitivity reuses the measurements of a size budget: give bits_per_weight too"
            )

    @property
    def solver(self) -> registry.Solver:
        return registry.SOLVERS[self.algo]

    @property
    def needs_data(self) -> bool:
        """Whether calibration data is read: a solver that takes data, any activation
        quantizer (its scales, and the quantized stream, come from the data), MagR (it keeps
        the output on the data), rotations (checked on the data) and a size budget (its
        grids are chosen on the data)."""
        return (
            self.solver.takes_data
            or self.act_bits is not None
            or self.magr is not None
            or self.rotate != "none"
            or self.bits_per_weight is not None
        )


#: A per-layer grid of ``overrides``: the keys given (``bits``, ``group_size`` with ``None``
#: for per channel, ``symmetric``); the rest come from the main grid.
GridFields = dict[str, Any]


def parse_override(spec: str) -> tuple[str, GridFields]:
    """``PATTERN=bits:8,group:32,sym`` -> ``(pattern, {bits: 8, group_size: 32,
    symmetric: True})``.

    Keys: ``bits:N`` (2..8), ``group:N`` (N >= 1) or ``group:channel``, ``sym`` or ``asym``,
    each at most once.

    Raises:
        QronosError: the spec cannot be read (the message says why).
    """
    pattern, sep, rest = spec.rpartition("=")
    if not sep or not pattern:
        raise QronosError(f"override {spec!r}: expected PATTERN=bits:N,group:N|channel,sym|asym")
    check_patterns([pattern], "override")
    return pattern, parse_grid_fields(rest, f"override {spec!r}")


def parse_grid_fields(spec: str, what: str) -> GridFields:
    """``bits:8,group:32,sym`` -> ``{bits: 8, group_size: 32, symmetric: True}`` (the grid
    spec of ``--override`` and ``--mix-grids``; ``what`` names it in errors)."""
    items = [item for item in spec.split(",") if item]
    keys = [item.partition(":")[0] for item in items]
    if not items:
        raise QronosError(f"{what} sets nothing: give bits:N, group:N|channel, sym or asym")
    if len(set(keys)) < len(keys) or {"sym", "asym"} <= set(keys):
        raise QronosError(f"{what} sets a key twice or both sym and asym")
    fields: GridFields = {}
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
                f"{what}: cannot read {item!r} (keys: bits:N, group:N|channel, sym, asym)"
            ) from err
    if "bits" in fields and fields["bits"] not in BITS:
        raise QronosError(f"{what}: bits must be {BITS.describe(integer=True)}")
    group = fields.get("group_size")
    if group is not None and group < 1:
        raise QronosError(f"{what}: group must be a positive integer or channel")
    return fields


@dataclass(frozen=True)
class EvalOptions(Schema):
    """The options of ``eval`` (and ``api.evaluate``): perplexity on the first ``windows``
    windows of ``data``'s test side, and agreement with a ``reference`` model."""

    reference: str | None = option(
        None,
        "a float model: also report KL(reference || model) and top-1 agreement",
        metavar="FLOAT.onnx",
        path=True,
    )
    data: str = option(
        WIKI_VITAL,
        f"a text file, or '{WIKI_VITAL}' (its test side)",
        metavar="PATH",
        path=True,
    )
    windows: int = option(
        DEFAULT_EVAL_WINDOWS, "windows scored, from the start of the text", valid=Range(1, math.inf)
    )
    seqlen: int = option(DEFAULT_SEQLEN, "tokens per window", valid=Range(2, math.inf))
    tokenizer: str | None = _tokenizer_option()
    device: Device = _device_option("ONNX Runtime provider")
    progress: bool = _progress_option()


@dataclass(frozen=True)
class ExportOptions(Schema):
    """The options of ``export``: a local Hugging Face checkpoint as a float ONNX model."""

    dtype: ExportDtype = option("fp32", "the float type of the export")
    exporter: Exporter = _exporter_option()
