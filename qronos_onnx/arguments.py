"""Type checks of the Python API's arguments, before any work: a wrong type is a ``TypeError``
that names the argument, not an error deep inside a library."""

from __future__ import annotations

import os
from typing import Any


def _type_error(name: str, expected: str, value: Any) -> TypeError:
    return TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def check_path(name: str, value: Any, optional: bool = False) -> None:
    """A file path: ``str`` or ``os.PathLike`` (``None`` too when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)):
        raise _type_error(
            name, "a path (str or os.PathLike)" + (" or None" if optional else ""), value
        )


def check_int(name: str, value: Any, optional: bool = False) -> None:
    """An ``int`` (not a ``bool``); ``None`` too when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an int" + (" or None" if optional else ""), value)


def check_str(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise _type_error(name, "a str" + (" or None" if optional else ""), value)
