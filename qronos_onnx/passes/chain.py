"""Running passes in order and collecting what each returns."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from qronos_onnx.errors import QronosError


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> list[ir.passes.PassResult]:
    """Run ``passes`` on ``model`` in order and return their results; a ``QronosError``
    raised inside (which ``onnx_ir`` wraps in its pass errors) comes out as itself, so that
    the user sees one clear line."""
    try:
        return [pass_(model) for pass_ in passes]
    except (ir.passes.PassError, ir.passes.InvariantError) as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, QronosError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
