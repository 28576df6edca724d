"""The passes' contracts (``requires`` / ``ensures`` of ``onnx_ir.passes.PassBase``) and their
``modified`` flags, on the tiny Llama and small graphs written as ONNX text."""

import onnx
import onnx_ir as ir
import pytest
import torch

from qronos_onnx.calibration.runner import CalibrationOptions
from qronos_onnx.errors import QronosError
from qronos_onnx.formats.matmulnbits import ToMatMulNBitsPass
from qronos_onnx.formats.qdq import ToQDQPass
from qronos_onnx.ir.act_quant import ActQuant
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.targets import find_targets, tied_lm_head
from qronos_onnx.passes.act_quant import InsertActQuantPass
from qronos_onnx.passes.calibrate import CalibrateSolvePass
from qronos_onnx.passes.lm_head import UntieLmHeadPass
from qronos_onnx.pipeline import quantize_model, run_passes
from qronos_onnx.quant import Grid
from qronos_onnx.scheme import Scheme
from tests.helpers import random_samples

NO_LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (int64[1, 4] input_ids) => (float[1, 4, 2] logits)
    <float[4, 2] table = {1, 2, 3, 4, 5, 6, 7, 8}> {
    logits = Gather (table, input_ids)
}
"""


def test_untying_the_lm_head_is_done_once(tiny_models):
    model = load_model(tiny_models("nokv"))
    assert tied_lm_head(model) is not None
    assert UntieLmHeadPass()(model).modified
    assert tied_lm_head(model) is None
    assert not UntieLmHeadPass()(model).modified  # nothing left to untie
    kept = load_model(tiny_models("nokv"))
    assert not UntieLmHeadPass(exclude=("*lm_head*",))(kept).modified
    assert tied_lm_head(kept) is not None


def test_activation_quantizers_are_inserted_once(tiny_models):
    model = load_model(tiny_models("nokv"))
    assert not InsertActQuantPass(Scheme())(model).modified  # no quantizer in the recipe
    recipe = Scheme(act_quant=ActQuant(4))
    assert InsertActQuantPass(recipe)(model).modified
    assert all(g.source is not None for g in find_targets(model)[0])
    with pytest.raises(ir.passes.PreconditionError, match="already in place"):
        InsertActQuantPass(recipe)(model)


def test_calibrate_requires_targets_and_the_error_reaches_the_user():
    model = ir.serde.deserialize_model(onnx.parser.parse_model(NO_LAYERS))
    detect_signature(model)
    with pytest.raises(ir.passes.PreconditionError):
        CalibrateSolvePass(Scheme(), [])(model)
    with pytest.raises(QronosError, match="no quantizable MatMul/Gemm"):
        run_passes(model, [CalibrateSolvePass(Scheme(), [])])


def test_formats_report_modified_truthfully(tiny_models):
    model = load_model(tiny_models("nokv"))  # opset 20: QDQ converts it to 21
    assert ToQDQPass()(model).modified
    assert not ToQDQPass()(model).modified  # nothing solved, already 21
    assert not ToMatMulNBitsPass()(model).modified


@pytest.mark.parametrize("fmt,op", [("matmulnbits", "MatMulNBits"), ("qdq", "DequantizeLinear")])
def test_the_chain_leaves_no_float_weight_of_a_solved_target(tiny_models, fmt, op):
    model = load_model(tiny_models("nokv"))
    samples = random_samples(detect_signature(model), count=2)
    solved = quantize_model(
        model,
        Scheme(grid=Grid(bits=4, group_size=32)),
        samples,
        CalibrationOptions(progress=False),
        fmt,
    )
    assert len(solved.results) == 14
    assert sum(n.op_type == op for n in model.graph) == 14
    assert not find_targets(model)[0]  # every layer is integer now


def test_a_solve_pass_object_runs_on_two_models(tiny_models):
    """The solve pass keeps no state of its own: one object solves two models alike, and each
    run returns its own results."""
    scheme = Scheme(grid=Grid(bits=4, group_size=32))
    first, second = load_model(tiny_models("nokv")), load_model(tiny_models("nokv"))
    solve = CalibrateSolvePass(
        scheme, random_samples(detect_signature(first), count=2), CalibrationOptions(progress=False)
    )
    results = [solve(model).results for model in (first, second)]
    assert len(results[0]) == len(results[1]) == 14
    for a, b in zip(*results, strict=True):
        assert a.target == b.target and torch.equal(a.weight.codes, b.weight.codes)
