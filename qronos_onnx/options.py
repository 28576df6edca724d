"""Every option of ``optimize``, declared once: ``OptimizeConfig``.

Each field of ``OptimizeConfig`` carries its type, default, help, choices and command-line
flags (``Option`` metadata). From it come the command line's ``optimize`` parser
(``cli.py``), the keyword arguments and documentation of the Python API (``api.optimize``),
the parameters of the Olive pass (``olive/qronos_pass.py``) and recipe files: YAML mappings of
field names (the long flags without their dashes) to values, listing what differs from the
defaults, like ``--config recipe.yaml``. The presets (``--w4``, ...) are recipe files shipped in
``qronos_onnx/recipes/``.

This module imports neither torch nor ONNX, so that ``qronos-onnx --help`` stays instant; the
recipe the passes read (``config.Recipe``) is built from a validated ``OptimizeConfig``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

from .errors import QronosError

#: The built-in calibration and evaluation text (see ``calibration/data.py``).
WIKI_VITAL = "wiki-vital"
#: Evaluation defaults (``qronos-onnx eval``), the README's protocol.
DEFAULT_EVAL_WINDOWS = 40
DEFAULT_SEQLEN = 512
#: The report beside an output; ``{stem}`` is the output's name without ``.onnx``.
DEFAULT_REPORT = "{stem}.report.json"

PRESETS = ("w4", "w3", "w2", "w4a4", "w8a8")
DEFAULT_PRESET = "w4"


@dataclass(frozen=True)
class Switch:
    """A flag that sets its field to a constant (``--sym``, ``--per-channel``, ``-q``)."""

    flags: tuple[str, ...]
    value: Any
    help: str


@dataclass(frozen=True)
class Option:
    """What the front ends need to know of a field besides its type and default.

    Attributes:
        help: one line.
        takes_value: the field has a flag taking a value (``--bits 4``); otherwise only its
            switches set it.
        metavar: the value's placeholder in ``--help``.
        switches: flags that set a constant.
        flag: the value flag, when it is not ``--`` + the name with dashes.
        path: a path (``os.PathLike`` accepted and stored as ``str``).
        olive: a parameter of the Olive pass (run-only options such as ``force`` are not).
    """

    help: str
    takes_value: bool = True
    metavar: str | None = None
    switches: tuple[Switch, ...] = ()
    flag: str | None = None
    path: bool = False
    olive: bool = True


def _option(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 (the natural name)
    return field(default=default, metadata={"option": Option(help, **kw)})


Algorithm = Literal["qronos", "gptq", "gpfq", "rtn"]
Format = Literal["matmulnbits", "qdq"]
GroupSize = int | Literal["channel"]


@dataclass(frozen=True)
class OptimizeConfig:
    """Every option of ``optimize``; see the module docstring. Values are validated on
    construction: a wrong type is a ``TypeError``, a bad value a ``QronosError``, both naming
    the field."""

    # -- the weight grid --------------------------------------------------------------------
    bits: int = _option(4, "weight bits, 2..8")
    group_size: GroupSize = _option(
        128,
        "input features per scale, or 'channel' for one scale per output channel (a group "
        "wider than a layer's input is per channel there)",
        metavar="N|channel",
        switches=(
            Switch(
                ("--per-channel",),
                "channel",
                "one scale per output channel (the same as --group-size channel)",
            ),
        ),
    )
    symmetric: bool = _option(
        False,
        "symmetric grid (no zero point) or asymmetric (an integer zero point)",
        takes_value=False,
        switches=(
            Switch(("--sym",), True, "symmetric weight grid, no zero point"),
            Switch(
                ("--asym",),
                False,
                "asymmetric weight grid with an integer zero point (the default)",
            ),
        ),
    )
    scale_search: Literal["minmax", "mse"] = _option(
        "minmax",
        "weight scales: the range of each group (minmax), or the shrink of it with the "
        "least squared rounding error (mse)",
    )
    # -- activations ------------------------------------------------------------------------
    act_bits: int | None = _option(
        None,
        "quantize the input of every quantized layer to N bits (2..8); none: weights only",
        metavar="N|none",
    )
    act_granularity: Literal["token", "tensor"] = _option(
        "token",
        "activation scales: per token (dynamic, symmetric) or per tensor (static, calibrated)",
    )
    act_symmetric: bool = _option(
        True,
        "symmetric activation codes, or uint8 with a zero point (per tensor, 8 bits)",
        takes_value=False,
        switches=(
            Switch(("--act-sym",), True, "signed activation codes, no zero point (the default)"),
            Switch(
                ("--act-asym",),
                False,
                "uint8 activations with a zero point (static per-tensor, 8 bits)",
            ),
        ),
    )
    act_clip: float = _option(
        1.0,
        "activation scales cover this fraction of the range (each token's max |x|, or the "
        "calibrated range; 0 < R <= 1, values beyond saturate)",
        metavar="R",
    )
    # -- incoherence processing (docs/rotations.md) -----------------------------------------
    rotate: Literal["none", "hadamard"] = _option(
        "none",
        "rotate the float network before calibration: random Hadamards on the residual "
        "stream (fused), per attention head (fused) and before down_proj (online nodes); "
        "checked against the float model's logits",
    )
    rotate_seed: int = _option(0, "seed of the rotations' random signs")
    magr: float | None = _option(
        None,
        "MagR before each solve: shrink each row's (or group's) largest weights keeping the "
        "layer's output, with this strength alpha (1e-3 per channel, 1e-4 per group in the "
        "paper); none: off",
        metavar="ALPHA|none",
    )
    # -- the solver -------------------------------------------------------------------------
    algo: Algorithm = _option("qronos", "the solver")
    damping: float | None = _option(
        None,
        "relative damping (gptq: X * mean diag H, default 0.01; qronos: X * "
        "lambda_max(H), default 1e-3)",
        metavar="X|none",
    )
    act_order: bool = _option(
        True,
        "visit columns by decreasing diag(H)",
        takes_value=False,
        switches=(Switch(("--no-act-order",), False, "solve columns in stored order"),),
    )
    reference: Literal["network", "stage"] = _option(
        "network",
        "where X comes from: the float network, or the float stage applied to the "
        "quantized stream's inputs",
    )
    # -- what to quantize, and how it is written --------------------------------------------
    lm_head: Literal["skip", "int8"] = _option(
        "skip",
        "leave the logits layer in float, or make it int8 per channel (and its input "
        "int8 when activations are quantized)",
    )
    include: tuple[str, ...] = _option(
        (),
        "quantize only matching layers (globs, or re:REGEX, on module paths and node names)",
        metavar="PATTERN",
    )
    exclude: tuple[str, ...] = _option((), "leave matching layers in float", metavar="PATTERN")
    overrides: tuple[str, ...] = _option(
        (),
        "per-layer grids, e.g. '*down_proj=bits:8,group:32' or '*.k_proj=group:channel,"
        "sym' (keys: bits:N, group:N|channel, sym, asym)",
        metavar="PATTERN=SPEC",
        flag="--override",
    )
    format: Format = _option(
        "matmulnbits", "matmulnbits (ONNX Runtime's kernel) or qdq (opset-21 DequantizeLinear)"
    )
    accuracy_level: int | None = _option(
        None,
        "MatMulNBits accuracy_level 0..4 (4: int8 activations inside ONNX Runtime's CPU "
        "kernel); none: unset (exact)",
        metavar="0..4|none",
    )
    genai_config: bool = _option(
        False,
        "write a genai_config.json (and the tokenizer files) beside the output, so that "
        "ONNX Runtime GenAI runs it; automatic when the input has one",
        takes_value=False,
        switches=(
            Switch(
                ("--genai-config",),
                True,
                "write a genai_config.json for ONNX "
                "Runtime GenAI (automatic when the input model has one)",
            ),
        ),
    )
    # -- a Hugging Face checkpoint as the input ----------------------------------------------
    exporter: Literal["auto", "genai", "torch"] = _option(
        "auto",
        "how a Hugging Face checkpoint given as the model is exported: ONNX Runtime "
        "GenAI's model builder, torch.onnx, or auto (the builder when installed and able)",
        olive=False,
    )
    export_dtype: Literal["fp32", "fp16"] = _option(
        "fp32", "the float type of a checkpoint's export", olive=False
    )
    keep_float: bool = _option(
        False,
        "keep a checkpoint's float export in OUTPUT_DIR/float",
        takes_value=False,
        olive=False,
        switches=(
            Switch(("--keep-float",), True, "keep a checkpoint's float export in OUTPUT_DIR/float"),
        ),
    )
    # -- calibration data -------------------------------------------------------------------
    calib_data: str = _option(
        WIKI_VITAL, f"a text file, or '{WIKI_VITAL}'", metavar="PATH", path=True
    )
    calib_windows: int = _option(32, "calibration windows")
    seqlen: int = _option(DEFAULT_SEQLEN, "tokens per calibration window")
    tokenizer: str | None = _option(
        None,
        "tokenizer.json or a tokenizer directory (default: beside the model)",
        metavar="PATH",
        path=True,
    )
    # -- the run ----------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = _option(
        "auto", "ONNX Runtime provider and torch device (auto: CUDA when present)"
    )
    report: str | None = _option(
        DEFAULT_REPORT,
        "report file name beside the output ({stem}: the output's name without "
        ".onnx); none: no report",
        metavar="NAME|none",
        olive=False,
    )
    force: bool = _option(
        False,
        "overwrite existing outputs",
        takes_value=False,
        olive=False,
        switches=(
            Switch(
                ("--force",),
                True,
                "overwrite an existing output (the input model is never overwritten)",
            ),
        ),
    )
    progress: bool = _option(
        True,
        "progress bars (shown only when stderr is a terminal)",
        takes_value=False,
        olive=False,
        switches=(Switch(("-q", "--quiet"), False, "no progress bars"),),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _normalise(f, getattr(self, f.name)))
        _check_values(self)

    # -- building ---------------------------------------------------------------------------

    def replace(self, **overrides: Any) -> OptimizeConfig:
        """A copy with ``overrides`` (field names) applied."""
        unknown = sorted(set(overrides) - {f.name for f in fields()})
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; options: "
                f"{', '.join(f.name for f in fields())}"
            )
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_recipe(cls, recipe: str | os.PathLike) -> OptimizeConfig:
        """The configuration of a preset name (``w4``, ...) or a YAML recipe file.

        Raises:
            QronosError: the recipe cannot be read, or a value in it is of the wrong type or
                out of range (the message names the recipe and the option).
        """
        values = load_recipe(recipe)
        try:
            return cls().replace(**values)
        except (TypeError, QronosError) as err:
            raise QronosError(f"recipe {recipe}: {err}") from err

    def recipe(self) -> dict[str, Any]:
        """The non-default values, as a recipe file would list them."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in fields()
            if getattr(self, f.name) != f.default
        }

    def dump(self, path: str | os.PathLike) -> None:
        """Write the recipe (non-default values) as YAML."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.recipe(), sort_keys=False), encoding="utf-8")

    @property
    def needs_data(self) -> bool:
        """Whether calibration data is read: every solver but RTN, any activation
        quantizer (its scales, and the quantized stream, come from the data), MagR (it keeps
        the output on the data) and rotations (checked on the data)."""
        return (
            self.algo != "rtn"
            or self.act_bits is not None
            or self.magr is not None
            or self.rotate != "none"
        )


def fields() -> tuple[dataclasses.Field, ...]:
    """The fields of ``OptimizeConfig``, in declaration order."""
    return dataclasses.fields(OptimizeConfig)


def option(f: dataclasses.Field) -> Option:
    return f.metadata["option"]


def field_type(name: str) -> Any:
    """The resolved type annotation of a field."""
    return _HINTS[name]


def recipe_path(preset: str) -> Path:
    """The recipe file of a preset."""
    return Path(str(resources.files(__package__).joinpath("recipes").joinpath(f"{preset}.yaml")))


def load_recipe(recipe: str | os.PathLike) -> dict[str, Any]:
    """The values of a preset (``w4``, ...) or of a YAML recipe file: a mapping of field
    names to values.

    Raises:
        QronosError: no such preset or file, not YAML, not a mapping, or unknown keys.
    """
    import yaml

    path = recipe_path(str(recipe)) if str(recipe) in PRESETS else Path(recipe)
    if not path.is_file():
        raise QronosError(
            f"recipe {str(recipe)!r} is neither a preset ({', '.join(PRESETS)}) nor a recipe file"
        )
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise QronosError(f"cannot read the recipe {path}: {' '.join(str(err).split())}") from err
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise QronosError(
            f"recipe {path} must be a mapping of options to values, got {type(values).__name__}"
        )
    names = {f.name for f in fields()}
    unknown = sorted(str(k) for k in values if k not in names)
    if unknown:
        raise QronosError(
            f"recipe {path}: unknown option(s) {', '.join(unknown)}; options: "
            f"{', '.join(sorted(names))}"
        )
    return dict(values)


# -- validation --------------------------------------------------------------------------------

_HINTS = typing.get_type_hints(OptimizeConfig)


def _normalise(f: dataclasses.Field, value: Any) -> Any:
    """The stored form of a value: patterns as tuples (one string is one pattern, not its
    characters), paths as strings. Then type-checked against the field's annotation."""
    tp = _HINTS[f.name]
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = (value,)
        elif isinstance(value, Iterable) and not isinstance(value, (Mapping, bytes)):
            value = tuple(value)
    if option(f).path and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not _conforms(value, tp):
        raise TypeError(f"{f.name} must be {_describe(tp)}, got {value!r} ({type(value).__name__})")
    return value


def alternatives(tp: Any) -> tuple:
    """The members of a union annotation (``X | Y`` or ``Union[X, Y]``), else ``(tp,)``."""
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of type ``tp`` (the annotation kinds ``OptimizeConfig`` uses;
    Literals are checked for their type here, for their values in ``_check_values``)."""
    for alt in alternatives(tp):
        origin = typing.get_origin(alt)
        if alt is type(None) and value is None:
            return True
        if origin is Literal:
            if isinstance(value, str) and all(isinstance(a, str) for a in typing.get_args(alt)):
                return True
        elif origin is tuple:
            if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
                return True
        elif alt is bool:
            if isinstance(value, bool):
                return True
        elif alt is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif alt is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif alt is str and isinstance(value, str):
            return True
    return False


def _describe(tp: Any) -> str:
    words = []
    for alt in alternatives(tp):
        origin = typing.get_origin(alt)
        if alt is type(None):
            words.append("None")
        elif origin is Literal:
            words.append(" or ".join(repr(a) for a in typing.get_args(alt)))
        elif origin is tuple:
            words.append("a pattern string or a list of them")
        else:
            words.append(
                {bool: "True or False", int: "an int", float: "a number", str: "a str"}[alt]
            )
    return " or ".join(words)


def choices(name: str, only: bool = False) -> tuple[str, ...] | None:
    """The values a Literal field takes (``None`` for other fields); with ``only``, ``None``
    also when the field takes other values besides (``group_size``: a number or 'channel')."""
    kinds = alternatives(_HINTS[name])
    for alt in kinds:
        if typing.get_origin(alt) is Literal and not (only and len(kinds) > 1):
            return typing.get_args(alt)
    return None


def _check_values(config: OptimizeConfig) -> None:
    """Value checks (after the type checks): ranges, choices, combinations."""
    for f in fields():
        allowed = choices(f.name)
        value = getattr(config, f.name)
        if allowed and isinstance(value, str) and value not in allowed:
            if f.name == "group_size":
                raise QronosError(
                    f"group_size must be a positive integer or 'channel', got {value!r}"
                )
            raise QronosError(f"{f.name} must be one of {', '.join(allowed)}, got {value!r}")
    if not 2 <= config.bits <= 8:
        raise QronosError(f"bits must be 2..8, got {config.bits}")
    if isinstance(config.group_size, int) and config.group_size < 1:
        raise QronosError(
            f"group_size must be a positive integer or 'channel', got {config.group_size}"
        )
    if config.act_bits is not None:
        if not 2 <= config.act_bits <= 8:
            raise QronosError(f"act_bits must be 2..8 (or None), got {config.act_bits}")
        if not config.act_symmetric and (config.act_granularity == "token" or config.act_bits != 8):
            raise QronosError("asymmetric activations need act_granularity='tensor' and act_bits=8")
    if not 0 < config.act_clip <= 1:
        raise QronosError(f"act_clip must be in (0, 1], got {config.act_clip}")
    if config.damping is not None and not 0 <= config.damping < math.inf:
        # (its upper bound is the solver's: quant.MAX_DAMPING, checked with the recipe)
        raise QronosError(f"damping must be a finite number >= 0, got {config.damping}")
    if config.magr is not None and not 0 < config.magr < math.inf:
        raise QronosError(f"magr must be a finite number > 0 (or None), got {config.magr}")
    if config.accuracy_level is not None and config.accuracy_level not in range(5):
        raise QronosError(f"accuracy_level must be 0..4, got {config.accuracy_level}")
    if config.calib_windows < 1 or config.seqlen < 2:
        raise QronosError(
            "calibration needs at least one window (calib_windows >= 1) of two tokens (seqlen >= 2)"
        )
    for name in ("calib_data", "tokenizer"):
        if getattr(config, name) == "":
            raise QronosError(f"{name} is an empty path")


def _plain(value: Any) -> Any:
    """A value as YAML writes it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value
