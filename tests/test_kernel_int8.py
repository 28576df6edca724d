"""MatMulNBits' int8 activations (``accuracy_level`` 4) seen by the solver, and the quantized
embedding beside a quantized lm_head: against numpy references of the kernel's arithmetic and
of the dequantized table."""

import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx import api
from qronos_onnx.formats.embedding import embedding_lookup
from qronos_onnx.formats.matmulnbits import FORMAT as MATMULNBITS
from qronos_onnx.ir.act_quant import ActQuant, insert_act_quant
from qronos_onnx.ir.model_io import load_model, write_model
from qronos_onnx.ir.packing import to_matmulnbits
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.targets import find_targets
from qronos_onnx.options import Options
from qronos_onnx.pipeline import quantize
from qronos_onnx.quant import Grid
from qronos_onnx.scheme import Scheme
from tests.helpers import QUIET, full_model_capture, gram, random_samples, rel
from tests.reference import mlas_int8_blocks


def _one_matmul(k, n=8):
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "w"], ["Y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 5, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    )


@pytest.mark.parametrize(("k", "block"), [(64, 16), (40, 16), (96, 32)])
def test_kernel_quantizer_equals_the_mlas_formula(k, block):
    """The graph's int8 blocks equal numpy's MLAS formula to the bit, a short last block
    padded (k = 40) and a block of zeros kept at zero."""
    model = _one_matmul(k)
    group = find_targets(model)[0][0]
    out = insert_act_quant(model, group, ActQuant(8, "block", block=block), ir.DataType.FLOAT)
    model.graph.outputs.append(out)
    x = np.random.default_rng(1).standard_normal((2, 5, k)).astype(np.float32)
    x[0, 0, :block] = 0
    x[1, 2, 3] = 40.0  # an outlier coarsens its block only
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    _, xq = session.run(None, {"X": x})
    expected = mlas_int8_blocks(x, block)
    np.testing.assert_array_equal(xq, expected)
    assert np.all(xq[0, 0, :block] == 0)
    assert len(np.unique(np.abs(xq[1, 2, :block]))) <= 128
    assert not np.array_equal(xq, x)


def _matmulnbits(A, codes, scales, zeros, bits, block, level):
    N, K = codes.shape
    t = to_matmulnbits(codes, scales, zeros, bits, block, zeros is None, np.float32)
    inits = [numpy_helper.from_array(t.B, "B"), numpy_helper.from_array(t.scales, "S")]
    inputs = ["A", "B", "S"]
    if t.zero_points is not None:
        inits.append(numpy_helper.from_array(t.zero_points, "Z"))
        inputs.append("Z")
    attrs = {"K": K, "N": N, "bits": bits, "block_size": block, "accuracy_level": level}
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(A.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": A})[0]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(("bits", "block", "rows"), [(4, 32, 1), (4, 128, 5), (8, 64, 3)])
def test_level_4_computes_what_the_simulated_stream_computes(bits, block, rows, symmetric):
    """ONNX Runtime's MatMulNBits at accuracy_level 4 equals the simulated int8 blocks of A
    times numpy's dequantized weight to float accuracy, and differs from it at level 0 by the
    int8 error (so the comparison can tell them apart). One row is the decoding kernel."""
    rng = np.random.default_rng(bits + block)
    K, N = 256, 48
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if symmetric else (0, 1 << bits)
    codes = rng.integers(low, high, (N, K)).astype(np.int8 if symmetric else np.uint8)
    scales = (rng.random((N, K // block)) * 0.1 + 0.01).astype(np.float32)
    zeros = None if symmetric else rng.integers(0, 1 << bits, (N, K // block)).astype(np.uint8)
    centred = codes.astype(np.float64) - (0 if zeros is None else np.repeat(zeros, block, 1))
    weight = centred * np.repeat(scales, block, 1)
    A = rng.standard_normal((rows, K)).astype(np.float32)
    A[:, 7] *= 30  # a large channel: the int8 error is its block's
    simulated = mlas_int8_blocks(A, block).astype(np.float64) @ weight.T
    level4 = _matmulnbits(A, codes, scales, zeros, bits, block, 4)
    level0 = _matmulnbits(A, codes, scales, zeros, bits, block, 0)
    assert rel(level4, simulated) < 2e-6
    assert rel(level0, simulated) > 1e-3
    assert rel(level0, A.astype(np.float64) @ weight.T) < 2e-6


def test_calibration_sees_the_kernels_int8_blocks(tiny_models, tmp_path):
    """With the kernel quantizer the format declares at accuracy_level 4, the last group's H
    is the Gram matrix of numpy's MLAS blocks of its input in the quantized stream (captured
    from the fake-quantized model, every earlier layer solved)."""
    path = tiny_models("nokv")
    samples = random_samples(detect_signature(load_model(path)))
    seen = []
    model = load_model(path)
    quantize(
        model,
        Scheme(grid=Grid(bits=4, group_size=16)),
        samples,
        QUIET,
        None,
        lambda g, H, G, r: seen.append((g, H.numpy())),
        functools.partial(MATMULNBITS.kernel_act_quant, Options()),
    )
    write_model(model, tmp_path / "q.onnx")
    last, H = seen[-1]
    assert last.source is not None and last.input != last.source
    before = full_model_capture(tmp_path / "q.onnx", [last.source], {}, samples)[last.source]
    blocks = [mlas_int8_blocks(x, 16) for x in before]
    assert rel(H, gram(blocks, blocks)) < 1e-5
    assert rel(H, gram(before, before)) > 1e-4  # the blocks are not the float input


def _initializers(model_path):
    proto = onnx.load(str(model_path))
    return {
        t.name: numpy_helper.to_array(t, str(model_path.parent)) for t in proto.graph.initializer
    }


@pytest.mark.parametrize("variant", ["nokv", "untied"])
def test_default_output_quantizes_lm_head_and_embedding(tiny_models, tmp_path, variant):
    """The default output: every MatMulNBits at accuracy_level 4 and no simulating node left;
    the lm_head int4 in blocks of 32; the embedding a GatherBlockQuantized whose rows are
    numpy's dequantized lm_head rows (tied: the same tensors) or the float table's rows within
    half a quantization step (untied: its own blocks); no float table left in the file."""
    path = tiny_models(variant)
    out = tmp_path / "q" / "model.onnx"
    report = api.optimize(path, out, calib_windows=4, seqlen=64)
    proto = onnx.load(str(out), load_external_data=False)
    nodes = {n.op_type: n for n in proto.graph.node}
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 15
    assert all(_attrs(n).get("accuracy_level") == 4 for n in nbits)
    assert "Round" not in nodes  # the kernel's int8 step is the kernel's, not the graph's
    lm_head = max(nbits, key=lambda n: _attrs(n)["N"])  # the vocabulary-wide one
    attrs = _attrs(lm_head)
    assert (attrs["bits"], attrs["block_size"]) == (4, 32)
    gather = nodes["GatherBlockQuantized"]
    assert "Gather" not in nodes
    inits = _initializers(out)
    float_tables = [a for a in inits.values() if a.dtype == np.float32 and a.size >= 256 * 64]
    assert not float_tables
    _, table_value, transposed = embedding_lookup(load_model(path))
    table = table_value.const_value.numpy()
    table = table.T if transposed else table  # [vocab, hidden]
    ids = np.arange(table.shape[0], dtype=np.int64)[None, :]
    feed = {"input_ids": ids, **_rest(path, ids)}
    rows = full_model_capture(out, [gather.output[0]], {}, [feed])[gather.output[0]][0][0]
    dequant = _dequantized_rows(inits, lm_head, attrs)
    if variant == "nokv":
        assert any("sharing the lm_head" in note for note in report.notes)
        reshape = next(n for n in proto.graph.node if n.output[0] == gather.input[0])
        assert reshape.input[0] == lm_head.input[1]  # its B, reshaped
        np.testing.assert_allclose(rows, dequant, rtol=1e-6, atol=1e-7)
    else:
        assert any("own 4-bit blocks" in note for note in report.notes)
        block_peak = np.abs(table.reshape(len(table), -1, 32)).max(-1).repeat(32, 1)
        # round to nearest on the symmetric int4 grid (-8..7 steps of max|block| / 8, the
        # extreme at -8): at most a step's half, or the clipped far end's max|block| / 8
        assert np.all(np.abs(rows - table) <= block_peak / 8 * (1 + 1e-5))
        assert rel(rows, table) > 1e-3


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _rest(path, ids):
    """Feeds besides input_ids for a tiny model (mask, positions; no cache)."""
    sig = detect_signature(load_model(path))
    return {k: v for k, v in sig.feed(ids).items() if k != "input_ids"}


def _dequantized_rows(inits, node, attrs):
    """numpy's reading of a 4-bit MatMulNBits weight ``[N, K]``: two codes a byte, low nibble
    first, minus the zero point (8 without one), times the block's scale."""
    n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
    packed = inits[node.input[1]].reshape(n, -1)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, -1)[:, :k].astype(np.float64)
    blocks = -(-k // block)
    if len(node.input) > 3 and node.input[3]:
        zp = inits[node.input[3]].reshape(n, -1)
        zeros = np.stack([zp & 15, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        zeros = np.full((n, blocks), 8)
    scales = inits[node.input[2]].reshape(n, blocks).astype(np.float64)
    return ((codes - zeros.repeat(block, 1)[:, :k]) * scales.repeat(block, 1)[:, :k]).astype(
        np.float32
    )


def test_lm_head_skip_and_level_0_keep_float_tables_and_activations(tiny_models, tmp_path):
    """``--lm-head skip --accuracy-level 0``: the embedding stays a float Gather, the lm_head
    float, no MatMulNBits carries accuracy_level, and no layer reads a simulated input."""
    path = tiny_models("nokv")
    out = tmp_path / "q" / "model.onnx"
    api.optimize(path, out, calib_windows=4, seqlen=64, lm_head="skip", accuracy_level=0)
    proto = onnx.load(str(out), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert "Gather" in ops and "GatherBlockQuantized" not in ops and "Round" not in ops
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14
    assert all(a.name != "accuracy_level" for n in nbits for a in n.attribute)
