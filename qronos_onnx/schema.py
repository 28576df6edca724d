"""How an option is declared: type, default, help, flags, choices and valid range, in one
place (a dataclass field with ``Option`` metadata). ``options.py`` declares the options of
``optimize``, ``eval`` and ``export`` with it; the command line's parsers, the Python API's
keyword arguments and their checks, the Olive pass's parameters and ``docs/options.md`` are
generated from those declarations.

Every value is checked here, once, when an options object is made: its type (a ``TypeError``
naming the option) and its value (a ``QronosError``: a choice, a range, or a combination the
class's ``check`` refuses). Imports neither torch nor ONNX.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .errors import QronosError


@dataclass(frozen=True)
class Switch:
    """A flag that sets its field to a constant (``--sym``, ``--per-channel``, ``-q``)."""

    flags: tuple[str, ...]
    value: Any
    help: str


@dataclass(frozen=True)
class Range:
    """The valid numbers of an option: ``low <= x <= high`` (``<`` where ``open``)."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.open_low else x >= self.low
        below = x < self.high if self.open_high else x <= self.high
        return not math.isnan(x) and above and below

    def describe(self, integer: bool = False) -> str:
        """``"an integer in [2, 8]"``, ``"a number in [0.1, 1]"``, ``"a positive integer"``."""
        what = "an integer" if integer else "a number"
        if math.isinf(self.high):
            return f"a positive {what.split()[-1]}" if self.low == 1 else f"{what} >= {self.low}"
        low, high = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"{what} in {low}{_number(self.low)}, {_number(self.high)}{high}"


def _number(x: float) -> str:
    if isinstance(x, int) and x > 1 << 32:
        return f"2^{x.bit_length()} - 1" if x & (x + 1) == 0 else f"{x}"
    return f"{x:g}" if isinstance(x, float) else str(x)


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
        valid: the numbers it takes (``None``: any of its type).
        choices: the names it takes, when they come from a registry (a function: read when
            checked); ``Literal`` annotations give fixed choices.
        olive: a parameter of the Olive pass.
        recipe: may be set by a recipe file (``force`` may not: overwriting is asked for on
            the command line or in the call, never by a file).
    """

    help: str
    takes_value: bool = True
    metavar: str | None = None
    switches: tuple[Switch, ...] = ()
    flag: str | None = None
    path: bool = False
    valid: Range | None = None
    choices: Callable[[], Iterable[str]] | None = None
    olive: bool = True
    recipe: bool = True


def option(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 (the natural name)
    """A dataclass field declaring an option."""
    return field(default=default, metadata={"option": Option(help, **kw)})


def meta(f: dataclasses.Field) -> Option:
    return f.metadata["option"]


class Schema:
    """Base of the options classes: frozen dataclasses whose fields are declared with
    ``option``. Construction normalises and checks every value (see the module docstring)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, _normalise(type(self), f, getattr(self, f.name)))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_value(type(self), f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Checks across fields (``QronosError``); the single-field checks are done."""

    def replace(self, **overrides: Any) -> Any:
        """A copy with ``overrides`` (field names) applied."""
        unknown = sorted(set(overrides) - set(names(type(self))))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; options: {', '.join(names(type(self)))}"
            )
        return dataclasses.replace(self, **overrides)  # type: ignore[type-var]

    def non_defaults(self) -> dict[str, Any]:
        """The values that differ from the defaults, as YAML writes them (lists, not
        tuples)."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if getattr(self, f.name) != f.default
        }


def fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The options of ``cls``, in declaration order."""
    return dataclasses.fields(cls)


def names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of ``cls``'s fields."""
    cached = _HINTS.get(cls)
    if cached is None:
        cached = _HINTS[cls] = typing.get_type_hints(cls)
    return cached


_HINTS: dict[type, dict[str, Any]] = {}


def alternatives(tp: Any) -> tuple:
    """The members of a union annotation (``X | Y`` or ``Union[X, Y]``), else ``(tp,)``."""
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def choices(cls: type, name: str, only: bool = False) -> tuple[str, ...] | None:
    """The names a field takes (``None`` for fields without named values); with ``only``,
    ``None`` also when the field takes other values besides (``group_size``: a number or
    'channel')."""
    f = next(f for f in fields(cls) if f.name == name)
    kinds = alternatives(hints(cls)[name])
    if meta(f).choices is not None:
        return tuple(meta(f).choices())  # type: ignore[misc]
    for alt in kinds:
        if typing.get_origin(alt) is Literal and not (only and len(kinds) > 1):
            return typing.get_args(alt)
    return None


def is_list(cls: type, name: str) -> bool:
    return typing.get_origin(hints(cls)[name]) is tuple


def _normalise(cls: type, f: dataclasses.Field, value: Any) -> Any:
    """The stored form of a value: patterns as tuples (one string is one pattern, not its
    characters), paths as strings. Then type-checked against the field's annotation."""
    tp = hints(cls)[f.name]
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = (value,)
        elif isinstance(value, Iterable) and not isinstance(value, (Mapping, bytes)):
            value = tuple(value)
    if meta(f).path and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not _conforms(value, tp):
        raise TypeError(f"{f.name} must be {_describe(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of type ``tp`` (the annotation kinds the options use; Literals are
    checked for their type here, for their values in ``_check_value``)."""
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


def _check_value(cls: type, f: dataclasses.Field, value: Any) -> None:
    """A field's own rules: its choices, its range, no empty paths."""
    opt = meta(f)
    allowed = choices(cls, f.name) or ()
    items = value if isinstance(value, tuple) else (value,)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    bad = next((i for i in items if isinstance(i, str) and allowed and i not in allowed), None)
    if bad is None and opt.valid is not None and number and value not in opt.valid:
        bad = value
    if bad is not None:
        raise QronosError(f"{f.name} must be {describe_valid(cls, f.name)}, got {bad!r}")
    if opt.path and value == "":
        raise QronosError(f"{f.name} is an empty path")


def describe_valid(cls: type, name: str) -> str:
    """The valid values of a field in words (for errors, the help and the documentation):
    ``"an integer in [2, 8]"``, ``"one of token, tensor"``, ``"a positive integer or
    'channel'"``."""
    f = next(f for f in fields(cls) if f.name == name)
    allowed = choices(cls, name) or ()
    valid = meta(f).valid
    if valid is None:
        return f"one of {', '.join(allowed)}" if allowed else "any value of its type"
    words = valid.describe(integer=float not in alternatives(hints(cls)[name]))
    return " or ".join([words, *(repr(a) for a in allowed)])


def _plain(value: Any) -> Any:
    """A value as YAML writes it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value
