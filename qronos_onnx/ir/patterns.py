"""Layer patterns of ``include``, ``exclude`` and ``overrides``: globs, or regular expressions
written ``re:PATTERN``, matched against a layer's readable name (its module path) and its node
name."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from qronos_onnx.errors import QronosError


def check_patterns(patterns: Sequence[str], option: str) -> None:
    """Refuse ``re:`` patterns that do not compile, naming the option they came from."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise QronosError(f"bad {option} regex {pattern!r}: {err}") from err


def matches(patterns: Sequence[str], *names: str) -> bool:
    """Whether any pattern matches any of ``names``: globs, or regexes written ``re:PATTERN``."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if any(re.search(pattern[3:], n) for n in names):
                return True
        elif any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return True
    return False
