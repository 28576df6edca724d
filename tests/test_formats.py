"""Deployment formats against numpy references: MatMulNBits, QDQ, and their file sizes."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qronos_onnx
from qronos_onnx import registry
from qronos_onnx.calibration.runner import CalibrationOptions
from qronos_onnx.errors import QronosError
from qronos_onnx.formats.base import Format
from qronos_onnx.formats.matmulnbits import ToMatMulNBitsPass
from qronos_onnx.formats.qdq import ToQDQPass
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.packing import NBitsTensors, from_matmulnbits
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.targets import find_targets
from qronos_onnx.passes.calibrate import QUANTIZED, TARGET
from qronos_onnx.pipeline import quantize_model
from qronos_onnx.quant import Grid, QuantizedWeight, SolveInfo
from qronos_onnx.scheme import Scheme, SolverOptions
from tests.helpers import random_samples


def random_quantized(N, K, grid, seed):
    """Random codes on ``grid`` (all codes reachable, including the extremes)."""
    g = torch.Generator().manual_seed(seed)
    n_groups = grid.n_groups(K)
    codes = torch.randint(grid.qmin, grid.qmax + 1, (N, K), generator=g).to(grid.code_dtype)
    scales = torch.rand(N, n_groups, generator=g) + 0.05
    zp = (
        None
        if grid.symmetric
        else torch.randint(0, grid.qmax + 1, (N, n_groups), generator=g).to(torch.uint8)
    )
    return QuantizedWeight(codes, scales, zp, grid, SolveInfo("rtn"))


def one_matmul_model(q, transposed=False, bias=None, opset=20):
    """An IR model ``Y = A @ W^T`` (MatMul on W^T, or Gemm with transB=1 and a bias) whose
    node carries the codes the way CalibrateSolvePass leaves them. Below opset 18, ``A`` is first
    centred with a ``ReduceMean`` whose axes are an attribute (an input from opset 18 on)."""
    _N, K = q.codes.shape
    w = q.dequantize().numpy()
    inits = [numpy_helper.from_array(w if transposed else w.T.copy(), "w")]
    if transposed:
        inputs = ["A", "w"] + (["b"] if bias is not None else [])
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, "b"))
        node = helper.make_node("Gemm", inputs, ["Y"], name="layer", transB=1)
    else:
        node = helper.make_node("MatMul", ["A", "w"], ["Y"], name="layer")
    nodes = [node]
    if opset < 18:
        node.input[0] = "centred"
        nodes = [
            helper.make_node("ReduceMean", ["A"], ["mean"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["A", "mean"], ["centred"]),
            node,
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [7, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    )
    groups, _ = _targets(model)
    model.graph.node("layer").meta.update({QUANTIZED: q, TARGET: groups[0].targets[0]})
    return model


def _targets(model):
    return find_targets(model)


def session(model):
    """An ORT session that runs QDQ weights exactly: by default ONNX Runtime fuses
    DequantizeLinear + MatMul into MatMulNBits with accuracy_level 4 (int8 activations)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    proto = in_memory(model)
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def in_memory(model):
    """The model as a protobuf with its weights inside (loaded from external data)."""
    return ir.serde.serialize_model(ir.external_data.load_to_model(model))


def run(model, A):
    return session(model).run(None, {"A": A})[0]


CASES = [  # (N, K, grid)
    (24, 70, Grid(bits=4, group_size=32)),  # K not a multiple of the block
    (24, 70, Grid(bits=4, group_size=32, symmetric=True)),
    (16, 96, Grid(bits=2, group_size=32)),
    (16, 100, Grid(bits=2, group_size=16, symmetric=True)),
    (16, 80, Grid.ternary(group_size=16)),
    (16, 72, Grid(bits=8, group_size=64)),
    (16, 72, Grid(bits=8, group_size=16, symmetric=True)),
    (24, 70, Grid(bits=3, group_size=32)),  # 3 bits in the 4-bit container
    (24, 70, Grid(bits=3, group_size=32, symmetric=True)),
    (12, 576, Grid(bits=4, group_size=None)),  # per channel: one block of 1024
    (12, 576, Grid(bits=4, group_size=None, symmetric=True)),
]


@pytest.mark.parametrize("N,K,grid", CASES, ids=str)
def test_matmulnbits_equals_numpy_dequant_and_keeps_codes(N, K, grid):
    q = random_quantized(N, K, grid, seed=N * K)
    model = one_matmul_model(q)
    ToMatMulNBitsPass()(model)
    node = model.graph.node("layer")
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    A = np.random.default_rng(K).standard_normal((7, K)).astype(np.float32)
    expected = A.astype(np.float64) @ q.dequantize().numpy().astype(np.float64).T
    y = run(model, A)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # unpacking the written tensors gives back the solver's codes, bit for bit
    attrs = {k: a.value for k, a in node.attributes.items()}
    t = NBitsTensors(
        node.inputs[1].const_value.numpy(),
        node.inputs[2].const_value.numpy(),
        None if node.inputs[3] is None else node.inputs[3].const_value.numpy(),
        attrs["K"],
        attrs["N"],
        attrs["bits"],
        attrs["block_size"],
    )
    codes, scales, zp = from_matmulnbits(t, grid.symmetric)
    assert codes.dtype == q.codes.numpy().dtype
    np.testing.assert_array_equal(codes, q.codes.numpy())
    np.testing.assert_array_equal(scales[:, : q.scales.shape[1]], q.scales.numpy())
    if zp is not None:
        np.testing.assert_array_equal(zp, q.zero_points.numpy())
    assert "w" not in model.graph.initializers


def test_gemm_bias_becomes_matmulnbits_bias():
    q = random_quantized(16, 64, Grid(bits=4, group_size=32), seed=3)
    bias = np.linspace(-1, 1, 16).astype(np.float32)
    A = np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32)
    expected = A @ q.dequantize().numpy().T + bias
    model = one_matmul_model(q, transposed=True, bias=bias)
    ToMatMulNBitsPass()(model)
    np.testing.assert_allclose(
        run(model, A), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )
    # accuracy_level 4 is written only where the calibration simulated the kernel's int8
    # input (tests/test_kernel_int8.py); levels 1-3 (float compute types) everywhere
    model = one_matmul_model(q, transposed=True, bias=bias)
    ToMatMulNBitsPass(accuracy_level=4)(model)
    assert "accuracy_level" not in model.graph.node("layer").attributes
    model = one_matmul_model(q, transposed=True, bias=bias)
    ToMatMulNBitsPass(accuracy_level=1)(model)
    assert model.graph.node("layer").attributes["accuracy_level"].value == 1
    np.testing.assert_allclose(
        run(model, A), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )


@pytest.mark.parametrize(
    "N,K,grid",
    [
        *CASES[:7],
        (16, 60, Grid(bits=4, group_size=12)),  # QDQ blocks need not be powers of two
        (12, 64, Grid(bits=4, group_size=None)),
    ],
    ids=str,
)
@pytest.mark.parametrize("transposed", [False, True])
def test_qdq_equals_numpy_dequant(N, K, grid, transposed):
    q = random_quantized(N, K, grid, seed=K)
    model = one_matmul_model(q, transposed=transposed)
    ToQDQPass()(model)
    assert model.opset_imports[""] == 21
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and dq[0].inputs[0].const_value.dtype.bitwidth == (
        8 if grid.bits > 4 else 4
    )
    A = np.random.default_rng(1).standard_normal((7, K)).astype(np.float32)
    expected = A @ q.dequantize().numpy().T
    np.testing.assert_allclose(
        run(model, A), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )


def test_qdq_converts_older_opsets_with_their_reduce_axes():
    """Opset 17 -> 21 moves ReduceMean's axes from attribute to input (what onnxscript's own
    converter does not do below opset 18); the result loads and computes the same."""
    q = random_quantized(16, 64, Grid(bits=4, group_size=32), seed=3)
    model = one_matmul_model(q, opset=17)
    ToQDQPass()(model)
    assert model.opset_imports[""] == 21
    mean = next(n for n in model.graph if n.op_type == "ReduceMean")
    assert "axes" not in mean.attributes and len(mean.inputs) == 2
    A = np.random.default_rng(2).standard_normal((7, 64)).astype(np.float32)
    expected = (A - A.mean(axis=-1, keepdims=True)) @ q.dequantize().numpy().T
    np.testing.assert_allclose(
        run(model, A), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )


def test_matmulnbits_refuses_group_sizes_it_cannot_hold():
    from qronos_onnx.errors import QronosError

    q = random_quantized(8, 48, Grid(bits=4, group_size=12), seed=0)
    with pytest.raises(QronosError, match="power-of-two group size"):
        ToMatMulNBitsPass()(one_matmul_model(q))


def quantized_tiny(path, recipe):
    model = load_model(path)
    samples = random_samples(detect_signature(model))
    quantize_model(model, recipe, samples, CalibrationOptions(progress=False), fmt=None)
    return model, samples


def logits(model, feed):
    return session(model).run(["logits"], feed)[0]


@pytest.mark.parametrize(
    "grid",
    [
        Grid(bits=4, group_size=32),
        Grid(bits=4, group_size=None, symmetric=True),
        Grid(bits=3, group_size=16),
    ],
    ids=str,
)
def test_qdq_and_matmulnbits_give_the_same_logits(tiny_models, grid):
    path = tiny_models("kv")
    recipe = Scheme(grid=grid)
    fake, samples = quantized_tiny(path, recipe)
    reference = logits(fake, samples[0])  # float model with dequantized weights
    nbits, _ = quantized_tiny(path, recipe)
    qdq, _ = quantized_tiny(path, recipe)
    ToMatMulNBitsPass()(nbits)
    ToQDQPass()(qdq)
    assert sum(n.op_type == "MatMulNBits" for n in nbits.graph) == 14
    assert sum(n.op_type == "DequantizeLinear" for n in qdq.graph) == 14
    for m in (nbits, qdq):
        out = logits(m, samples[0])
        assert np.abs(out - reference).max() < 1e-3 * np.abs(reference).max()
    np.testing.assert_allclose(
        logits(nbits, samples[0]),
        logits(qdq, samples[0]),
        rtol=1e-4,
        atol=1e-4 * np.abs(reference).max(),
    )
    # ORT's default for QDQ (fused with int8 activations) stays close
    default = ort.InferenceSession(
        in_memory(qdq).SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(["logits"], samples[0])[0]
    assert np.abs(default - reference).max() < 0.05 * np.abs(reference).max()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_saved_size_is_bits_over_8_of_the_weights_plus_scales(tiny_models, tmp_path, bits):
    from qronos_onnx.ir.model_io import write_model

    path = tiny_models("untied")
    model, _ = quantized_tiny(path, Scheme(grid=Grid(bits=bits, group_size=32)))
    targets = [t for g in find_targets(load_model(path))[0] for t in g.targets]
    ToMatMulNBitsPass()(model)
    files = write_model(model, tmp_path / "q.onnx")

    def tensor_bytes(model_path):
        proto = onnx.load(str(model_path))
        return sum(
            numpy_helper.to_array(t, base_dir=str(model_path.parent)).nbytes
            for t in proto.graph.initializer
        )

    params = sum(t.in_features * t.out_features for t in targets)
    groups = sum(t.out_features * -(-t.in_features // 32) for t in targets)
    # float weights of the targets out; codes (bits/8 per weight), scales and zero points in
    expected = tensor_bytes(path) - 4 * params + params * bits / 8 + groups * (4 + bits / 8)
    assert abs(tensor_bytes(files[0]) - expected) < 0.01 * expected
    # on disk: the tensors plus no more non-tensor overhead than the input model had
    overhead = sum(f.stat().st_size for f in path.parent.glob("model.onnx*")) - tensor_bytes(path)
    assert (
        tensor_bytes(files[0])
        <= sum(f.stat().st_size for f in files)
        <= tensor_bytes(files[0]) + overhead + 4096
    )


# -- a format registered from outside the package -----------------------------------------


class _KeepFloat(ir.passes.InPlacePass):
    """Leave the fake-quantized float weights in the graph (the codes go to a side file)."""

    def call(self, model):
        return ir.passes.PassResult(model, modified=False)

    def ensures(self, model):
        from qronos_onnx.passes.calibrate import quantized_nodes

        if not quantized_nodes(model):
            raise ir.passes.PostconditionError("no solved layer")


class CodesBeside(Format):
    """A format declared in this test file alone: the model with its dequantized float weights
    in one ``.onnx`` file (no data file), and every layer's codes in ``OUT.onnx.codes.npz``
    beside it. It holds grids of at most 4 bits."""

    name = "codes-beside"
    summary = "float weights in the model, codes in an .npz beside it"

    def check(self, grids):
        if any(g.bits > 4 for g in grids):
            raise QronosError("codes-beside holds grids of at most 4 bits")
        return ["codes are in an .npz file beside the model"]

    def rewrite_pass(self, options):
        return _KeepFloat()

    def files(self, output):
        return [f"{output.name}.codes.npz", output.name]

    def save(self, model, path):
        from qronos_onnx.passes.calibrate import quantized_nodes

        codes = {t.name: q.codes.numpy() for _, t, q in quantized_nodes(model)}
        np.savez(path.with_name(f"{path.name}.codes.npz"), **codes)
        ir.save(ir.external_data.load_to_model(model), path)  # every weight in the protobuf
        return [path.with_name(f"{path.name}.codes.npz"), path]


def test_a_format_registered_from_a_test_runs_end_to_end(tiny_models, tmp_path, monkeypatch):
    """Registering a format is one call: the options accept its name, its grid check refuses
    before any work, its pass rewrites the graph and its files are placed all or nothing."""
    monkeypatch.setitem(registry.FORMATS, "codes-beside", CodesBeside())
    model = tiny_models("nokv")
    out = tmp_path / "q.onnx"
    with pytest.raises(QronosError, match="at most 4 bits"):
        qronos_onnx.optimize(model, out, format="codes-beside", algo="rtn", bits=8)
    assert list(tmp_path.iterdir()) == []
    report = qronos_onnx.optimize(
        model, out, format="codes-beside", algo="rtn", group_size=32, progress=False
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "q.onnx",
        "q.onnx.codes.npz",
        "q.report.json",
        "tokenizer.json",
    ]
    assert report.notes == ["codes are in an .npz file beside the model"]
    codes = np.load(tmp_path / "q.onnx.codes.npz")
    assert sorted(codes.files) == sorted(t.name for t in report.targets)
    # the model is the fake-quantized one: RTN codes of the same grid, dequantized
    feed = random_samples(detect_signature(load_model(model)), 1, 16)[0]
    grid = Grid(bits=4, group_size=32, symmetric=True, scale_search="mse")  # the defaults
    rtn = Scheme(grid=grid, solver=SolverOptions("rtn"), lm_head="int4")
    reference, _ = quantized_tiny(model, rtn)
    written = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        written.run(["logits"], feed)[0], logits(reference, feed), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(QronosError, match="exists; give force"):
        qronos_onnx.optimize(model, out, format="codes-beside", algo="rtn", group_size=32)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_constants_a_run_writes_are_file_backed_until_saved(
    tiny_models, tmp_path, monkeypatch, fmt
):
    """In an optimize run, every constant the run writes into the model (packed codes, scales,
    zero points; the rotated weights) is a memory-mapped array of an unlinked file when the
    output is saved, not a heap array, so the packed model does not accumulate in memory; the
    output is the same as a run that keeps them in memory."""
    from qronos_onnx.ir import values

    saved = []  # per run: initializer name -> memory-mapped
    save = Format.save

    def inspecting(self, model, path):
        written = [v for v in model.graph.initializers.values() if v.const_value is not None]
        saved.append(
            {
                v.name: isinstance(v.const_value.raw, np.memmap)
                for v in written
                if not isinstance(v.const_value, ir.ExternalTensor)
            }
        )
        return save(self, model, path)

    monkeypatch.setattr(Format, "save", inspecting)
    model = tiny_models("kv")
    common = {"calib_windows": 2, "seqlen": 64, "format": fmt, "rotate": "hadamard"}
    for keep_min in (0, 1 << 62):  # every constant kept on disk, then none
        monkeypatch.setattr(values, "KEEP_MIN_BYTES", keep_min)
        qronos_onnx.optimize(model, tmp_path / str(keep_min) / "q.onnx", "w4", **common)
    on_disk, in_memory = saved
    suffixes = ("_Q4", "_scales", "_q", "_scale")  # MatMulNBits' and QDQ's names
    quantized = [n for n in on_disk if n.endswith(suffixes)]
    assert quantized and all(on_disk[n] for n in quantized)
    assert not any(in_memory.values())
    outputs = [load_model(tmp_path / k / "q.onnx") for k in ("0", str(1 << 62))]
    for a, b in zip(*(sorted(m.graph.initializers.items()) for m in outputs), strict=True):
        assert a[0] == b[0] and np.array_equal(a[1].const_value.numpy(), b[1].const_value.numpy())
