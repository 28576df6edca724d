"""Activation quantization: the graph against numpy, the quantized stream against the final
graph, and W8A8 on ONNX Runtime's integer kernels."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.calibration.runner import CalibrationOptions
from qronos_onnx.ir.act_quant import ActQuant, StaticRange, insert_act_quant
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.targets import find_targets
from qronos_onnx.pipeline import quantize_model
from qronos_onnx.quant import Grid
from qronos_onnx.scheme import Scheme
from tests.helpers import full_model_capture, gram, padded_samples, random_samples, rel, solve_file


def per_token_numpy(x, bits, clip=1.0):
    """Symmetric per-token fake quantization, straight from the definition: the scale covers
    ``clip`` times each token's ``max |x|``."""
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(x).max(axis=-1, keepdims=True) / np.float32(qmax / clip)
    s = np.maximum(s, np.finfo(np.float32).tiny)
    return np.clip(np.round(x / s), -qmax - 1, qmax) * s


@pytest.mark.parametrize(("bits", "clip"), [(4, 1.0), (8, 1.0), (4, 0.9)])
def test_per_token_quantizer_equals_numpy(bits, clip):
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["X"], ["h"]),
            helper.make_node("MatMul", ["h", "w"], ["Y"], name="mm"),
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 5, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    )
    group = find_targets(model)[0][0]
    out = insert_act_quant(model, group, ActQuant(bits, clip=clip), ir.DataType.FLOAT)
    model.graph.outputs.append(out)
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32) * 3
    x[0, 0] = 0  # an all-zero token stays zero
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    y, xq = session.run(None, {"X": x})
    expected = per_token_numpy(np.maximum(x, 0), bits, clip)
    np.testing.assert_array_equal(xq, expected)
    if clip < 1:  # each token's largest entries saturate below their value
        assert np.all(xq.max(-1)[x.max(-1) > 0] < 0.95 * np.maximum(x, 0).max(-1)[x.max(-1) > 0])
    np.testing.assert_allclose(y, expected @ w, rtol=1e-5, atol=1e-5)


def test_per_token_quantizer_builds_on_bfloat16():
    """The scale floor is bfloat16's smallest normal number (numpy's finfo does not know the
    type; ml_dtypes' does)."""
    import ml_dtypes

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "w"], ["Y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.BFLOAT16, [2, 5, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, None)],
        [
            helper.make_tensor(
                "w", TensorProto.BFLOAT16, [16, 8], np.zeros(128, np.uint16).tobytes(), raw=True
            )
        ],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    )
    insert_act_quant(model, find_targets(model)[0][0], ActQuant(4), ir.DataType.BFLOAT16)
    tiny = next(v for name, v in model.graph.initializers.items() if name.endswith("tiny"))
    assert tiny.const_value.dtype == ir.DataType.BFLOAT16
    assert tiny.const_value.numpy() == ml_dtypes.finfo(ml_dtypes.bfloat16).tiny


@pytest.mark.parametrize("opset", [17, 20])
def test_static_int8_quantizer_on_float16_equals_numpy(opset):
    """uint8 QDQ on float16 activations, also below opset 19 (no float16 QuantizeLinear)."""
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "w"], ["Y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [2, 5, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, None)],
        [numpy_helper.from_array(w, "w")],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    )
    group = find_targets(model)[0][0]
    out = insert_act_quant(
        model, group, ActQuant(8, "tensor", symmetric=False), ir.DataType.FLOAT16
    )
    scale, zero = (model.graph.initializers[f"X_aq_{k}"] for k in ("scale", "zero_point"))
    scale.const_value = ir.Tensor(
        np.asarray(0.03, scale.const_value.dtype.numpy()), name=scale.name
    )
    zero.const_value = ir.Tensor(np.asarray(100, np.uint8), name=zero.name)
    model.graph.outputs.append(out)
    x = (np.random.default_rng(1).standard_normal((2, 5, 16)) * 3).astype(np.float16)
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    _, xq = session.run(None, {"X": x})
    s = np.float32(scale.const_value.numpy())
    expected = ((np.clip(np.round(x.astype(np.float32) / s) + 100, 0, 255) - 100) * s).astype(
        np.float16
    )
    assert xq.dtype == np.float16
    np.testing.assert_array_equal(xq, expected)


@pytest.mark.parametrize(
    "act",
    [ActQuant(4, "token"), ActQuant(4, "tensor"), ActQuant(8, "tensor", symmetric=False)],
    ids=str,
)
def test_quantized_stream_agrees_with_the_final_graph(tiny_models, tmp_path, act):
    """H from calibration equals H recomputed from the saved model's own quantizers."""
    path = tiny_models("nokv")
    samples = random_samples(detect_signature(load_model(path)))
    seen = []
    recipe = Scheme(grid=Grid(bits=4, group_size=32), act_quant=act)
    saved, _solved = solve_file(
        path,
        tmp_path / "q.onnx",
        recipe,
        samples,
        CalibrationOptions(progress=False),
        observer=lambda g, H, G, r: seen.append((g, H.numpy(), G.numpy())),
    )
    inputs = [g.input for g, *_ in seen]
    assert all(g.source is not None and g.input != g.source for g, *_ in seen)
    # the saved model is fake-quantized: its quantizers and weights are the final graph's,
    # and for the last group every earlier group is solved: its input is the quant stream's
    last, H, _ = seen[-1]
    x_quant = full_model_capture(saved, [last.input], {}, samples)[last.input]
    assert rel(H, gram(x_quant, x_quant)) < 1e-5
    # the quantizer really quantizes: at most 2^bits levels per token (or per tensor)
    first = x_quant[0].reshape(-1, x_quant[0].shape[-1])
    levels = len(np.unique(first[3])) if act.granularity == "token" else len(np.unique(first))
    assert levels <= 2**act.bits
    if act.granularity == "tensor":  # the fitted scale is in the file
        proto = onnx.load(str(saved))
        scales = [
            numpy_helper.to_array(t)
            for t in proto.graph.initializer
            if t.name.endswith("_aq_scale")
        ]
        assert len(scales) == len(inputs) and all(float(s) != 1.0 for s in scales)


def test_w8a8_runs_on_integer_kernels_and_stays_close_to_float(tiny_models, tmp_path):
    path = tiny_models("nokv")
    model = load_model(path)
    samples = random_samples(detect_signature(model))
    recipe = Scheme(
        grid=Grid(bits=8, group_size=None, symmetric=True),
        act_quant=ActQuant(8, "tensor", symmetric=False),
    )
    quantize_model(model, recipe, samples, CalibrationOptions(progress=False), fmt="qdq")
    proto = ir.serde.serialize_model(ir.external_data.load_to_model(model))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert ops & {
        "MatMulIntegerToFloat",
        "QLinearMatMul",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
    }, ops
    feed = samples[0]
    out = session.run(["logits"], feed)[0]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feed)[
        0
    ]
    assert rel(out, ref) < 0.05


def test_stage_reference_with_static_quantizers_equals_brute_force(tiny_models, tmp_path):
    """reference="stage": the last group's X is the float stage run on the quantized stream's
    inputs, i.e. the previous group with float weights reading its input before its quantizer.
    Brute force: the saved model edited that way, run whole by ONNX Runtime."""
    path = tiny_models("nokv")
    samples = random_samples(detect_signature(load_model(path)))
    seen = []
    recipe = Scheme(
        grid=Grid(bits=4, group_size=32), act_quant=ActQuant(8, "tensor", symmetric=False)
    )
    saved, _solved = solve_file(
        path,
        tmp_path / "q.onnx",
        recipe,
        samples,
        CalibrationOptions(reference="stage", progress=False),
        observer=lambda g, H, G, r: seen.append((g, H.numpy(), G.numpy())),
    )
    (last, H, G), (previous, *_) = seen[-1], seen[-2]
    proto = onnx.load(str(saved))
    original = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    weights = {t.weight for t in previous.targets}
    for init in proto.graph.initializer:
        if init.name in weights:
            init.CopyFrom(original[init.name])
    for node in proto.graph.node:
        if weights & set(node.input):
            node.input[list(node.input).index(previous.input)] = previous.source
    proto.graph.output.extend([onnx.ValueInfoProto(name=last.source)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = [session.run([last.source], feed)[0] for feed in samples]
    x_quant = full_model_capture(saved, [last.input], {}, samples)[last.input]
    assert rel(H, gram(x_quant, x_quant)) < 1e-5
    assert rel(G, gram(x, x_quant)) < 1e-5


def test_static_scales_are_fitted_on_real_tokens_only(tiny_models, tmp_path):
    """Padding (attention mask 0) does not widen a static activation scale."""
    path = tiny_models("nokv")
    signature = detect_signature(load_model(path))
    samples = padded_samples(signature, count=2, real=12, seed=3)
    mask = samples[0]["attention_mask"]
    seen = []
    spec = ActQuant(8, "tensor", symmetric=True)
    saved, _solved = solve_file(
        path,
        tmp_path / "q.onnx",
        Scheme(grid=Grid(bits=4, group_size=32), act_quant=spec),
        samples,
        CalibrationOptions(progress=False),
        observer=lambda g, H, G, r: seen.append(g),
    )
    scales = {
        t.name: float(numpy_helper.to_array(t))
        for t in onnx.load(str(saved)).graph.initializer
        if t.name.endswith("_aq_scale")
    }
    differs = 0
    for group in seen:
        # the source in the saved (fake-quantized) model is the quantized stream's value
        x = full_model_capture(saved, [group.source], {}, samples)[group.source]
        real = max(np.abs(a[mask != 0]).max() for a in x) / spec.qmax
        every = max(np.abs(a).max() for a in x) / spec.qmax
        assert scales[f"{group.source}_aq_scale"] == pytest.approx(real, rel=1e-6)
        differs += not np.isclose(every, real, rtol=1e-6)
    assert differs > 0  # padding would have changed some scale


def test_an_int8_lm_head_reads_int8_activations_under_w4a4(tiny_models, tmp_path):
    """``lm_head="int8"`` with 4-bit per-token activations: the lm_head's input is quantized to
    8 bits (more than 16 and at most 256 levels per token), every other input to 4 bits."""
    path = tiny_models("nokv")
    samples = random_samples(detect_signature(load_model(path)))
    recipe = Scheme(
        grid=Grid(bits=4, group_size=None, symmetric=True),
        lm_head="int8",
        act_quant=ActQuant(bits=4, granularity="token"),
    )
    saved, solved = solve_file(
        path, tmp_path / "q.onnx", recipe, samples, CalibrationOptions(progress=False)
    )
    inputs = {r.target.input: r.target.lm_head for r in solved.results}
    assert sum(inputs.values()) == 1 and len(inputs) == 9
    captured = full_model_capture(saved, list(inputs), {}, samples)
    for name, lm_head in inputs.items():
        token = captured[name][0].reshape(-1, captured[name][0].shape[-1])[5]
        levels = len(np.unique(token))
        assert (16 < levels <= 256) if lm_head else levels <= 16, (name, levels)


def avx2_u8s8_matmul(a, b):
    """ONNX Runtime's u8 x s8 integer MatMul as x86 CPUs with AVX2 and without VNNI compute it
    (``vpmaddubsw``): adjacent products along K summed in pairs into a saturating int16, then
    the pairs in int32. ``a`` ``[M, K]`` uint8, ``b`` ``[K, N]`` int8 -> ``[M, N]`` int32."""
    a = np.pad(a.astype(np.int32), [(0, 0), (0, a.shape[1] % 2)])
    b = np.pad(b.astype(np.int32), [(0, b.shape[0] % 2), (0, 0)])
    pairs = a[:, 0::2, None] * b[None, 0::2] + a[:, 1::2, None] * b[None, 1::2]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def _w8a8_file(tiny_models, tmp_path, bits):
    """The tiny Llama under the W8A8 recipe with ``bits``-bit symmetric weights, saved as QDQ."""
    path = tiny_models("nokv")
    samples = random_samples(detect_signature(load_model(path)))
    recipe = Scheme(
        grid=Grid(bits=bits, group_size=None, symmetric=True),
        act_quant=ActQuant(8, "tensor", symmetric=False),
    )
    out = tmp_path / f"w8a8_{bits}.onnx"
    solve_file(path, out, recipe, samples, CalibrationOptions(progress=False), fmt="qdq")
    return out, samples


def _integer_matmuls(proto):
    """``(MatMul, activation QuantizeLinear, weight codes initializer)`` of every MatMul whose
    two inputs are DequantizeLinear outputs, read from the file (no project code)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: t for t in proto.graph.initializer}
    found = []
    for node in (n for n in proto.graph.node if n.op_type == "MatMul"):
        dq_a, dq_b = producer.get(node.input[0]), producer.get(node.input[1])
        if (
            dq_a is not None
            and dq_b is not None
            and dq_a.op_type == dq_b.op_type == "DequantizeLinear"
        ):
            found.append((node, producer[dq_a.input[0]], inits[dq_b.input[0]]))
    return found


@pytest.mark.parametrize("bits", [7, 8])
def test_w8a8_weights_are_exact_on_every_x86_integer_kernel(tiny_models, tmp_path, bits):
    """Structural, CPU-independent: every integer MatMul of the written model pairs uint8
    activations with uint8 weights or with int8 weights of |code| <= 64, so that the AVX2
    kernel without VNNI (emulated here) computes the exact product; the full-range int8 codes
    the same layer would have had are shown to saturate in that kernel."""
    out, samples = _w8a8_file(tiny_models, tmp_path, bits)
    proto = onnx.load(str(out))
    matmuls = _integer_matmuls(proto)
    assert len(matmuls) == 14
    for node, _quantizer, codes in matmuls:
        weights = numpy_helper.to_array(codes)
        assert weights.dtype == (np.int8 if bits == 7 else np.uint8), node.name
        if weights.dtype == np.int8:
            assert np.abs(weights.astype(np.int16)).max() <= 64
    # the first layer's real activation codes, and its weights, through the emulated kernel
    node, quantizer, codes = matmuls[0]
    a = full_model_capture(out, [quantizer.output[0]], {}, samples)[quantizer.output[0]][0]
    a = a.reshape(-1, a.shape[-1])
    assert a.dtype == np.uint8 and a.max() > 200
    w = numpy_helper.to_array(codes).astype(np.int16)
    if w.min() >= 0:
        w = w - 128  # zero point 128: the same codes, signed
    exact = a.astype(np.int64) @ w.astype(np.int64)
    if bits == 7:
        np.testing.assert_array_equal(avx2_u8s8_matmul(a, w), exact)
    else:  # stored as uint8: u8 x u8 kernels are exact,
        assert np.abs(w).max() > 64  # and these codes as int8 would saturate
        assert not np.array_equal(avx2_u8s8_matmul(a, w), exact)


def test_w8a8_integer_kernels_agree_with_the_float_simulation(tiny_models, tmp_path):
    """The same W8A8 file run by ONNX Runtime with its integer kernels (default session) and
    with optimizations off (the QDQ pairs in float) agrees within one quantization step: an
    8-bit activation code flipped by float rounding moves a value by 1/255 of its range at
    most, so the logits differ by less than that relative to their size."""
    out, samples = _w8a8_file(tiny_models, tmp_path, 7)
    runs = []
    for level in (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    ):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        runs.append(np.concatenate([session.run(["logits"], feed)[0] for feed in samples]))
    assert rel(runs[0], runs[1]) < 1 / 255


def test_the_w8a8_preset_writes_7_bit_int8_weights(tiny_models, tmp_path):
    """``--w8a8``: 7-bit symmetric weights stored as int8 (ONNX Runtime's fast u8 x s8 kernels,
    saturation-free) behind uint8 static activations."""
    import qronos_onnx

    out = tmp_path / "q.onnx"
    report = qronos_onnx.optimize(tiny_models("nokv"), out, "w8a8", algo="rtn", progress=False)
    assert {(t.grid["bits"], t.grid["symmetric"]) for t in report.targets} == {(7, True)}
    matmuls = _integer_matmuls(onnx.load(str(out)))
    assert len(matmuls) == 14
    for _, _quantizer, codes in matmuls:
        weights = numpy_helper.to_array(codes)
        assert weights.dtype == np.int8 and np.abs(weights.astype(np.int16)).max() <= 64


def test_a_static_scale_covers_clip_times_the_calibrated_range():
    """The range is widened a window at a time; the scale covers clip times all of it."""
    seen = StaticRange()
    for array in (np.array([-2.0, 1.0]), np.array([4.0, 0.5])):
        seen.add(array)
    scale, zero = seen.fit(ActQuant(8, "tensor", symmetric=True, clip=0.5))
    assert (scale, zero) == (np.float32(0.5 * 4 / 127), 0)
    scale, zero = seen.fit(ActQuant(8, "tensor", symmetric=False, clip=0.5))
    assert scale == np.float32(0.5 * 6 / 255) and zero == round(1 / scale)
