"""Recipe files: YAML mappings of option names (the long flags without their dashes) to
values, listing what differs from the defaults. The presets (``--w4``, ...) are recipe files
shipped in ``qronos_onnx/recipes/``.

A recipe is read as plain data: one mapping of names to scalars or lists of strings, at most
``MAX_RECIPE_BYTES`` long, without anchors or aliases (no expansion), without a key given
twice, and only with options a recipe may set (``force`` may not: overwriting is asked for on
the command line or in the call, never by a file).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import QronosError
from .options import PRESETS, Options
from .schema import fields, meta, names

MAX_RECIPE_BYTES = 1 << 20
#: Nesting deeper than this (a list of lists of ...) is no option's value.
_MAX_DEPTH = 4
#: At most this many unknown keys are named in an error.
_NAMED = 8


def recipe_path(preset: str) -> Path:
    """The recipe file of a preset."""
    return Path(str(resources.files(__package__).joinpath("recipes").joinpath(f"{preset}.yaml")))


def load_recipe(recipe: str | os.PathLike) -> dict[str, Any]:
    """The values of a preset (``w4``, ...) or of a recipe file: option names to values
    (not yet checked: ``options_from`` checks them together with the values that override
    them).

    Raises:
        QronosError: no such preset or file, not YAML, not a plain mapping (see the module
            docstring), or keys that are no option a recipe may set.
    """
    path = recipe_path(str(recipe)) if str(recipe) in PRESETS else Path(recipe)
    if not path.is_file():
        raise QronosError(
            f"recipe {str(recipe)!r} is neither a preset ({', '.join(PRESETS)}) nor a recipe file"
        )
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise QronosError(
                f"recipe {path} is {path.stat().st_size} bytes; a recipe lists a few options "
                f"(at most {MAX_RECIPE_BYTES} bytes)"
            )
        text = path.read_text(encoding="utf-8")
        values = yaml.load(text, Loader=_RecipeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        message = " ".join(str(err).split())[:300]
        raise QronosError(f"cannot read the recipe {path}: {message}") from err
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise QronosError(
            f"recipe {path} must be a mapping of options to values, got {type(values).__name__}"
        )
    allowed = {f.name for f in fields(Options) if meta(f).recipe}
    run_only = sorted(str(k) for k in values if k in set(names(Options)) - allowed)
    if run_only:
        raise QronosError(
            f"recipe {path}: {', '.join(run_only)} cannot be set by a recipe; give it on the "
            "command line or in the call"
        )
    unknown = sorted(str(k) for k in values if k not in allowed)
    if unknown:
        named = ", ".join(unknown[:_NAMED]) + (
            f" and {len(unknown) - _NAMED} more" if len(unknown) > _NAMED else ""
        )
        raise QronosError(
            f"recipe {path}: unknown option(s) {named}; options: {', '.join(sorted(allowed))}"
        )
    return values


def options_from(recipe: str | os.PathLike, **overrides: Any) -> Options:
    """The options of a preset name or recipe file, with ``overrides`` (option names to
    values) applied on top, checked once together: a value the recipe gets wrong can be
    replaced by an override.

    Raises:
        TypeError: an unknown option name or a value of the wrong type in ``overrides``.
        QronosError: the recipe cannot be read, or a value is out of range (the message names
            the recipe when the value came from it).
    """
    values = load_recipe(recipe)
    merged = {**values, **overrides}
    try:
        return Options().replace(**merged)
    except (TypeError, QronosError) as err:
        named = str(err).split(" ", 1)[0]  # errors start with the option they are about
        if named in values and named not in overrides:
            raise QronosError(f"recipe {recipe}: {err}") from err
        raise


def dump_recipe(options: Options, path: str | os.PathLike) -> None:
    """Write the non-default values a recipe may hold as YAML."""
    values = {k: v for k, v in options.non_defaults().items() if _in_recipes(k)}
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def _in_recipes(name: str) -> bool:
    return next(meta(f).recipe for f in fields(Options) if f.name == name)


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads only plain data: no anchors or aliases, no key twice,
    no deep nesting."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "anchors and aliases are not allowed in a recipe", event.start_mark
            )
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > _MAX_DEPTH:
                raise yaml.constructor.ConstructorError(
                    None, None, "values nest too deeply for an option", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"option {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)
