"""Type checks of the Python API's arguments, before any work: a wrong type is a ``TypeError``
that names the argument, not an error deep inside a library."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any


def _type_error(name: str, expected: str, value: Any) -> TypeError:
    return TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def check_path(name: str, value: Any, optional: bool = False) -> None:
    """A file path: ``str`` or ``os.PathLike`` (``None`` too when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)):
        raise _type_error(name, "a path (str or os.PathLike)" + (" or None" if optional else ""),
                          value)


def check_int(name: str, value: Any, optional: bool = False) -> None:
    """An ``int`` (not a ``bool``); ``None`` too when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an int" + (" or None" if optional else ""), value)


def check_float(name: str, value: Any, optional: bool = False) -> None:
    """A real number (``int`` or ``float``, not a ``bool``); ``None`` too when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a number" + (" or None" if optional else ""), value)


def check_bool(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise _type_error(name, "True or False" + (" or None" if optional else ""), value)


def check_str(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise _type_error(name, "a str" + (" or None" if optional else ""), value)


def patterns(name: str, value: Any, pairs: bool = False) -> tuple:
    """Layer patterns: one string (one pattern, not its characters) or an iterable of strings
    (and of ``(pattern, grid)`` pairs when ``pairs``, as overrides may be given)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise _type_error(name, "a pattern string or a list of them", value)
    items = tuple(value)
    for item in items:
        if not (isinstance(item, str) or pairs and isinstance(item, tuple)):
            raise _type_error(f"every item of {name}", "a pattern string", item)
    return items


def check_calibration_data(name: str, value: Any) -> None:
    """A text source (a path or ``"wiki-vital"``), an ONNX Runtime ``CalibrationDataReader``
    (``get_next()``), or an iterable of feed dicts (checked as they are read)."""
    if isinstance(value, (str, os.PathLike)) or hasattr(value, "get_next"):
        return
    if isinstance(value, (dict, bytes)) or not isinstance(value, Iterable):
        raise _type_error(name, "a text file, 'wiki-vital', a CalibrationDataReader or an "
                          "iterable of feed dicts", value)
