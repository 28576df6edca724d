"""Incoherence processing: Hadamard matrices, the rotation passes (the rotated float model must
compute the original's logits, checked here by plain ONNX Runtime), the self-check's refusal,
the outlier ratio the rotations are for, MagR against a float64 reference, and --w4a4 end to
end."""

import json
import math
import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import qronos_onnx
from qronos_onnx.cli import main
from qronos_onnx.errors import QronosError, RotationWarning
from qronos_onnx.files.scratch import ScratchArrays
from qronos_onnx.ir import stages, values
from qronos_onnx.ir.model_io import load_model, write_model
from qronos_onnx.ir.norms import find_norms, fuse_decomposed_norms
from qronos_onnx.ir.online_hadamard import insert_online_hadamard, is_online_hadamard
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.targets import readable_name
from qronos_onnx.ir.values import keep_constants_in
from qronos_onnx.passes import rotation_check
from qronos_onnx.passes.rotate import FoldNormScalesPass, apply_rotations
from qronos_onnx.passes.rotation_check import RotationCheckPass
from qronos_onnx.pipeline import run_passes
from qronos_onnx.quant.hadamard import hadamard_matrix, hadamard_orders, random_hadamard
from qronos_onnx.quant.magr import magr

from .helpers import logits, random_samples, rel

# Orders the tiny models and SmolLM2-135M use (head 16/64, d_model 64/576, MLP 128/1536), a few
# more of each construction (Sylvester, Paley I and II), and 92, which has no known product.
ORDERS = [1, 2, 4, 12, 16, 20, 24, 28, 36, 40, 64, 128, 576, 640, 1536, 2048, 92]


@pytest.mark.parametrize("n", [n for n in ORDERS if hadamard_orders(n, 1)])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard_matrix(n).numpy()
    assert set(np.unique(h)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("n", ORDERS)
def test_every_rotation_is_orthogonal_and_applies_as_its_dense_matrix(n):
    q = random_hadamard(n, seed=3)
    assert (q.kind == "hadamard") == (n != 92), q.describe()
    dense = q.dense().numpy()
    np.testing.assert_allclose(dense @ dense.T, np.eye(n), atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    np.testing.assert_allclose(q.apply(x).numpy(), x.numpy() @ dense, atol=1e-12)
    np.testing.assert_allclose(q.apply_inverse(x).numpy(), x.numpy() @ dense.T, atol=1e-12)
    if q.factors:  # a Kronecker product of the factors, with the signs first
        product = np.ones((1, 1))
        for f in q.factors:
            product = np.kron(product, f.numpy())
        signs = q.signs.numpy() if q.signs is not None else np.ones(n)
        np.testing.assert_allclose(dense, signs[:, None] * product / math.sqrt(n), atol=1e-12)


@pytest.mark.parametrize("orders", [(64,), (12, 128), (24, 24), (20, 32)])
def test_the_online_hadamard_nodes_compute_the_dense_hadamard(orders):
    """``x M`` through the inserted Reshape/MatMul nodes equals numpy's ``x @ kron(...)/sqrt(n)``
    for inputs of rank 2 and 3."""
    n = math.prod(orders)
    w = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    x_in = ir.Value(name="x", shape=ir.Shape(["b", "s", n]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="w", const_value=ir.tensor(w))
    layer = ir.node("MatMul", [x_in, weight], name="layer")
    layer.outputs[0].name = "y"
    graph = ir.Graph([x_in], [layer.outputs[0]], nodes=[layer], initializers=[weight])
    graph.opset_imports[""] = 21
    model = ir.Model(graph, ir_version=10)
    factors = [hadamard_matrix(k).numpy() for k in orders]
    insert_online_hadamard(model, layer, factors, ir.DataType.FLOAT)
    assert sum(is_online_hadamard(n) for n in model.graph) == (1 if len(orders) == 1 else 5)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString())
    m = np.ones((1, 1))
    for f in factors:
        m = np.kron(m, f)
    m /= math.sqrt(n)
    x = np.random.default_rng(1).standard_normal((2, 3, n)).astype(np.float32)
    (y,) = session.run(["y"], {"x": x})
    np.testing.assert_allclose(y, x.astype(np.float64) @ m @ w, rtol=1e-4, atol=1e-4)


def rotate_file(path, out, seed=0):
    """Rotate the model at ``path`` with the passes alone (no self-check); returns the log."""
    model = load_model(path)
    log = apply_rotations(model, seed=seed)
    write_model(model, out)
    return log


def feeds(path, count=2, seqlen=40):
    return random_samples(detect_signature(load_model(path)), count, seqlen, seed=5)


@pytest.mark.parametrize(
    ("variant", "tolerance"),
    [("kv", 1e-5), ("untied", 1e-5), ("gemma", 1e-5), ("fp16", 2e-2)],
)
def test_the_rotated_float_model_computes_the_original_logits(
    tiny_models, tmp_path, variant, tolerance
):
    """R1 + R2 + R4 on the tiny Llama (grouped-query attention, with a KV cache and with an
    untied lm_head), Gemma (norm scale ``1 + w``) and the float16 Llama: plain ONNX Runtime
    gives the same logits, and every norm is left scale-free."""
    path = tiny_models(variant)
    out = tmp_path / "rotated.onnx"
    log = rotate_file(path, out)
    assert [a.name for a in log.applied] == ["R1", "R2", "R4"]
    assert not log.skipped and log.folded_norms == 5  # 2 per layer and the final one
    for feed in feeds(path):
        before, after = logits(path, feed), logits(out, feed)
        assert rel(after.astype(np.float64), before.astype(np.float64)) < tolerance
    rotated = load_model(out)
    assert all(np.all(n.scale.const_value.numpy() == 1) for n in find_norms(rotated))
    assert all(v.uses() for v in rotated.graph.initializers.values())  # none left behind
    # the weights did change: a rotation that forgot a tensor would break the logits above
    original = {v.name: v for v in load_model(path).graph.initializers.values()}
    changed = [
        v.name
        for v in rotated.graph.initializers.values()
        if v.name in original
        and v.const_value.shape == original[v.name].const_value.shape
        and not np.array_equal(v.const_value.numpy(), original[v.name].const_value.numpy())
    ]
    assert len(changed) >= 2 * 7  # q/k/v/o/gate/up/down per layer, or their copies


def test_a_builder_model_with_fused_norms_and_packed_qkv_rotates_exactly(builder_model, tmp_path):
    """ONNX Runtime GenAI's builder graph: SkipSimplifiedLayerNormalization and
    SimplifiedLayerNormalization, GroupQueryAttention fed by one packed QKV projection, the
    embedding as a Transpose of the lm_head weight."""
    out = tmp_path / "rotated.onnx"
    log = rotate_file(builder_model, out)
    assert [a.name for a in log.applied] == ["R1", "R2", "R4"]
    ops = {n.op_type for n in load_model(out).graph}
    assert {"SkipSimplifiedLayerNormalization", "GroupQueryAttention"} <= ops
    for feed in feeds(builder_model):
        assert rel(logits(out, feed), logits(builder_model, feed)) < 1e-5


def test_decomposed_norms_become_simplified_layer_normalization(tiny_models, tmp_path):
    """The torch export's Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul chains are rewritten to
    ``SimplifiedLayerNormalization`` (all five of them) without changing the logits."""
    path = tiny_models("kv")
    model = load_model(path)
    assert fuse_decomposed_norms(model) == 5
    assert sum(n.op_type == "SimplifiedLayerNormalization" for n in model.graph) == 5
    assert not any(n.op_type in ("ReduceMean", "Sqrt", "Pow") for n in model.graph)
    write_model(model, tmp_path / "fused.onnx")
    feed = feeds(path, 1)[0]
    assert rel(logits(tmp_path / "fused.onnx", feed), logits(path, feed)) < 1e-6


def test_post_norms_skip_r1_with_the_reason_and_keep_r2_r4(tiny_models, tmp_path):
    """Gemma 2 normalises the attention and MLP outputs before the residual add: R1 cannot
    commute with those norms, so it is skipped with a warning; R2 and R4 still apply exactly."""
    path = tiny_models("gemma2")
    out = tmp_path / "rotated.onnx"
    with pytest.warns(RotationWarning, match="R1 skipped: .*norm"):
        log = rotate_file(path, out)
    assert [a.name for a in log.applied] == ["R2", "R4"]
    assert [s[0] for s in log.skipped] == ["R1"]
    feed = feeds(path, 1)[0]
    assert rel(logits(out, feed), logits(path, feed)) < 1e-5


def _relabel_a_norm_as_layer_norm(path, out):
    model = load_model(path)
    fuse_decomposed_norms(model)
    norm = find_norms(model)[0].node
    norm.op_type, norm.domain = "LayerNormalization", ""
    write_model(model, out)


def test_layer_norm_models_are_refused_in_one_line(tiny_models, tmp_path, capsys):
    src = tmp_path / "ln.onnx"
    _relabel_a_norm_as_layer_norm(tiny_models("kv"), src)
    shutil.copy(tiny_models("kv").parent / "tokenizer.json", tmp_path)
    with pytest.raises(QronosError, match=r"LayerNorm .*--rotate none"):
        rotate_file(src, tmp_path / "never.onnx")
    corpus = tmp_path / "text.txt"
    corpus.write_text("a small corpus of text for calibration " * 200)
    args = ["optimize", str(src), "-o", str(tmp_path / "q.onnx"), "--w4a4", "-q"]
    assert main([*args, "--calib-data", str(corpus), "--seqlen", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LayerNorm" in err[0]
    assert not (tmp_path / "q.onnx").exists()


def test_the_self_check_names_the_first_tensor_that_diverges(tiny_models, tmp_path):
    """A rotated model whose second layer's down projection was broken by hand (as a misread
    graph would leave it) is refused, naming that layer's output, not an earlier one."""
    path = tiny_models("kv")
    samples = feeds(path, 1, 64)
    model = load_model(path)
    log = apply_rotations(model)
    (check,) = run_passes(model, [RotationCheckPass(path, samples, log)])  # intact rotations
    assert 0 < check.check.error < 1e-5
    down = next(n for n in model.graph if "layers.1.mlp.down_proj" in readable_name(n))
    weight = down.inputs[1].const_value.numpy().copy()
    weight[:, 0] *= -1  # flip one output channel's sign
    down.inputs[1].const_value = ir.tensor(weight, name=down.inputs[1].name)
    with pytest.raises(QronosError, match=r"first diverging tensor: .*layers\.1\.mlp\.down_proj"):
        run_passes(model, [RotationCheckPass(path, samples, log)])


def test_rotated_weights_are_file_backed_and_the_check_serializes_none(
    tiny_models, tmp_path, monkeypatch
):
    """Rotated into a constant store, every rotated weight is a memory-mapped array whose file
    is already unlinked; the self-check feeds both models' weights from where they lie (the
    session protobufs hold no weight) and measures the error that whole-model sessions on
    saved copies measure (the reference)."""
    monkeypatch.setattr(values, "KEEP_MIN_BYTES", 0)  # the tiny weights are kept too
    path = tiny_models("kv")
    model = load_model(path)
    store = ScratchArrays(tmp_path / "scratch" / "weight")
    keep_constants_in(model.graph, store)
    log = apply_rotations(model)
    keep_constants_in(model.graph, None)
    mapped = [
        v for v in model.graph.initializers.values() if isinstance(v.const_value.raw, np.memmap)
    ]
    assert len(mapped) >= 4 * 3 and store.bytes >= sum(v.const_value.nbytes for v in mapped)
    assert not list((tmp_path / "scratch").iterdir())  # unlinked: nothing left on disk

    monkeypatch.setattr(stages, "FED_CONSTANT_BYTES", 0)  # every constant fed
    embedded = []  # bytes of weights inside each session's protobuf
    make = rotation_check.make_session

    def recording_make(proto, *args, **kwargs):
        embedded.append(sum(t.ByteSize() for t in proto.graph.initializer))
        return make(proto, *args, **kwargs)

    monkeypatch.setattr(rotation_check, "make_session", recording_make)
    samples = feeds(path, 1, 64)
    (check,) = run_passes(model, [RotationCheckPass(path, samples, log)])
    assert embedded == [0, 0]  # the original, then the rotated model

    ir.save(model, tmp_path / "rotated.onnx", external_data="rotated.onnx.data")
    logits = []
    for file in (path, tmp_path / "rotated.onnx"):
        session = ort.InferenceSession(str(file))
        names = {i.name for i in session.get_inputs()}
        logits.append(
            session.run(["logits"], {k: v for k, v in samples[0].items() if k in names})[0]
        )
    reference = np.linalg.norm(logits[1].astype(np.float64) - logits[0]) / np.linalg.norm(logits[0])
    assert 0 < check.check.error < 1e-5 and check.check.error == pytest.approx(reference, rel=1e-3)


def test_a_residual_reader_that_is_not_a_norm_skips_r1_and_stays_exact(tiny_models, tmp_path):
    """A layer reading the residual stream directly (no norm in between) cannot take ``Q^T``
    from a norm: R1 is skipped, the model is still exact."""
    path = tiny_models("untied")
    model = load_model(path)
    gather = next(n for n in model.graph if n.op_type == "Gather")
    head = next(n for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name == "logits")
    # logits += embedding(x) @ W, a second reader of the residual stream
    extra = ir.Value(name="probe_w", const_value=ir.tensor(np.ones((64, 256), np.float32) * 1e-3))
    model.graph.register_initializer(extra)
    probe = ir.node("MatMul", [gather.outputs[0], extra], name="probe")
    before = head.outputs[0]
    total = ir.node("Add", [before, probe.outputs[0]], name="probe_add")
    model.graph.insert_after(head, [probe, total])
    model.graph.outputs[model.graph.outputs.index(before)] = total.outputs[0]
    total.outputs[0].name, before.name = "logits", "logits_before_probe"
    total.outputs[0].dtype, total.outputs[0].shape = before.dtype, before.shape
    src = tmp_path / "probe.onnx"
    write_model(model, src)
    with pytest.warns(RotationWarning, match="R1 skipped"):
        log = rotate_file(src, tmp_path / "rotated.onnx")
    assert "R1" not in [a.name for a in log.applied]
    feed = feeds(src, 1)[0]
    assert rel(logits(tmp_path / "rotated.onnx", feed), logits(src, feed)) < 1e-5


def _outlier_ratio(x):
    """Mean over tokens of ``max |x_t| / rms(x_t)`` (brute force, float64)."""
    rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return float(np.mean(np.abs(rows).max(1) / np.sqrt((rows**2).mean(1))))


def _layer_inputs(path, feed, tmp_path):
    """{layer node name: its input 0} of every MatMul with a constant weight (brute force:
    the model saved with those values as outputs, run by ONNX Runtime)."""
    tmp_path.mkdir()
    model = load_model(path)
    layers = {
        readable_name(n): n.inputs[0].name
        for n in model.graph
        if n.op_type == "MatMul" and n.inputs[1] is not None and n.inputs[1].const_value
    }
    values = {v.name: v for n in model.graph for v in n.outputs}
    known = {o.name for o in model.graph.outputs}
    model.graph.outputs.extend(values[x] for x in set(layers.values()) - known)
    out = tmp_path / "capture.onnx"
    ir.save(model, out, external_data="capture.onnx.data")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, feed), strict=True))
    return {layer: got[x] for layer, x in layers.items()}


def test_rotations_flatten_the_layer_inputs(tiny_models, tmp_path):
    """The tiny Llama's norms have three channels scaled by 4 (outliers): after R1 + R4 the
    inputs of every norm-reading layer and of the down projections are flatter (a brute-force
    capture of both models), and the self-check's measurement agrees with that capture."""
    path = tiny_models("untied")
    out = tmp_path / "rotated.onnx"
    rotate_file(path, out)
    feed = feeds(path, 1, 64)[0]
    before = _layer_inputs(path, feed, tmp_path / "before")
    after = _layer_inputs(out, feed, tmp_path / "after")
    ratio = {k: (_outlier_ratio(before[k]), _outlier_ratio(after[k])) for k in before}
    reads_norm = [k for k in ratio if any(p in k for p in ("q_proj", "gate_proj", "lm_head"))]
    assert len(reads_norm) == 5
    for k in reads_norm:
        assert ratio[k][1] < 0.75 * ratio[k][0], (k, ratio[k])
    down = [k for k in ratio if "down_proj" in k]
    assert np.mean([ratio[k][1] for k in down]) < np.mean([ratio[k][0] for k in down])
    # the report's numbers are these numbers
    model = load_model(path)
    log = apply_rotations(model)
    (check,) = run_passes(model, [RotationCheckPass(path, [feed], log)])
    q0 = next(k for k in reads_norm if "layers.0" in k and "q_proj" in k)
    measured = next(r for r in check.check.after if "layers.0" in r.layer and "q_proj" in r.layer)
    assert measured.outlier == pytest.approx(ratio[q0][1], rel=1e-4)
    assert measured.max == pytest.approx(np.abs(after[q0]).max(), rel=1e-4)


def _prox_reference(u, alpha):
    """``argmin_v 1/2||v - u||^2 + alpha ||v||_inf`` per row, float64: clip at the level ``t``
    where the clipped-off mass equals ``alpha`` (found by bisection); 0 if ``||u||_1 <= alpha``."""
    out = np.zeros_like(u)
    for i, row in enumerate(u):
        a = np.abs(row)
        if a.sum() <= alpha:
            continue
        lo, hi = 0.0, a.max()
        for _ in range(100):
            t = (lo + hi) / 2
            lo, hi = (t, hi) if np.maximum(a - t, 0).sum() > alpha else (lo, t)
        out[i] = np.sign(row) * np.minimum(a, (lo + hi) / 2)
    return out


def _magr_reference(w, h, alpha, group, iterations):
    hn = h / np.linalg.eigvalsh(h).max()
    v = w.copy()
    for _ in range(iterations):
        u = v - (v - w) @ hn
        v = _prox_reference(u.reshape(-1, group), alpha).reshape(w.shape)
    return v


@pytest.mark.parametrize("group", [None, 8])
def test_magr_matches_a_float64_proximal_reference_and_shrinks_the_range(group):
    """Calibration inputs of rank 20 in 32 features (as a layer's inputs are, nearly): MagR
    brings the largest weights down while ``W X`` barely moves."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 20)) @ rng.standard_normal((20, 32))  # [tokens, d]
    w = rng.standard_normal((6, 32))
    w[:, 3] *= 6  # large weights on one input
    h = x.T @ x / len(x)
    got = magr(torch.from_numpy(w), torch.from_numpy(h), 0.03, group, iterations=150).numpy()
    expected = _magr_reference(w, h, 0.03, group or 32, 150)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert np.abs(got).max() < 0.95 * np.abs(w).max()
    assert rel(x @ got.T, x @ w.T) < 0.05
    # float32 weights take the same path in float32
    got32 = magr(torch.from_numpy(w).float(), torch.from_numpy(h).float(), 0.03, group, 150)
    np.testing.assert_allclose(got32.numpy(), expected, atol=1e-4)


def test_w4a4_end_to_end_quantizes_the_rotated_activations(tiny_models, tmp_path):
    """``--w4a4`` (rotations on by default): the written model runs in ONNX Runtime, every
    down projection's activation quantizer reads the online Hadamard's output, and the report
    has the rotations and the self-check."""
    path = tiny_models("kv")
    corpus = tmp_path / "text.txt"
    corpus.write_text("the rotated activations are quantized to four bits " * 300)
    out = tmp_path / "q" / "model.onnx"
    report = qronos_onnx.optimize(
        path,
        out,
        config="w4a4",
        calib_data=str(corpus),
        seqlen=64,
        calib_windows=4,
        progress=False,
    )
    assert report.rotation is not None
    assert [a["name"] for a in report.rotation.applied] == ["R1", "R2", "R4"]
    assert report.rotation.check["error"] < report.rotation.check["tolerance"] == 1e-4
    model = load_model(out)
    downs = [n for n in model.graph if "down_proj" in readable_name(n)]
    layers = [n for n in downs if n.op_type in ("MatMul", "MatMulNBits")]
    assert len(layers) == 2
    for layer in layers:
        chain, value = [], layer.inputs[0]
        while value is not None and value.producer() is not None:
            node = value.producer()
            chain.append(node)
            if is_online_hadamard(node):
                break
            value = node.inputs[0]
        # the per-token quantizer x -> clip(round(x / s)) * s reads the Hadamard's output
        assert is_online_hadamard(chain[-1]), [n.op_type for n in chain]
        assert [n.op_type for n in chain[:-1]] == ["Mul", "Clip", "Round", "Div"]
    feed = feeds(path, 1)[0]
    result = logits(out, feed)
    assert np.isfinite(result).all()
    assert rel(result, logits(path, feed)) < 0.5


def test_inspect_says_which_rotations_a_model_admits(tiny_models, capsys):
    assert main(["inspect", str(tiny_models("kv"))]) == 0
    out = capsys.readouterr().out
    assert "R1: yes: hadamard 8 x 8" in out and "(11 readers, 4 writers)" in out
    assert "R2: yes: 2 value/output pairs, head size 16" in out
    assert "R4: yes: online before 2 down projections (128 = 16 x 8)" in out
    assert main(["inspect", str(tiny_models("gemma2"))]) == 0
    out = capsys.readouterr().out
    assert "R1: no: " in out and "Gemma 2" in out and "R2: yes" in out


def test_the_command_line_reports_the_rotations(tiny_models, tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text("the rotated activations are quantized to four bits " * 300)
    out = tmp_path / "q.onnx"
    args = ["optimize", str(tiny_models("gemma2")), "-o", str(out), "--rotate", "hadamard"]
    assert main([*args, "--calib-data", str(corpus), "--seqlen", "64", "--calib-windows", "4"]) == 0
    captured = capsys.readouterr()
    assert "RotationWarning: rotation R1 skipped: " in captured.err
    line = next(x for x in captured.out.splitlines() if x.startswith("rotations "))
    assert line.startswith("rotations R2, R4; R1 skipped (seed 0); float self-check: logits")
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert [a["name"] for a in report["rotation"]["applied"]] == ["R2", "R4"]
    assert report["rotation"]["skipped"][0]["name"] == "R1"
    # one input range per layer group: q/k/v, o_proj, gate/up, down_proj per layer, and the
    # lm_head (quantized by default)
    assert len(report["rotation"]["inputs"]) == 2 * 4 + 1


@pytest.mark.parametrize("sites", [("R4",), ("R1", "R2")])
def test_each_rotation_site_is_switched_on_its_own(tiny_models, tmp_path, sites):
    """``rotate_sites`` picks the sites; the others are left as they are, and the model still
    computes the original logits."""
    path = tiny_models("kv")
    model = load_model(path)
    log = apply_rotations(model, sites=sites)
    assert [a.name for a in log.applied] == list(sites)
    assert any(is_online_hadamard(n) for n in model.graph) == ("R4" in sites)
    out = tmp_path / "rotated.onnx"
    write_model(model, out)
    feed = feeds(path, 1)[0]
    assert rel(logits(out, feed), logits(path, feed)) < 1e-5


def test_a_rotation_kind_registered_from_a_test(tiny_models, tmp_path, monkeypatch):
    """A rotation kind is one registration: a generator of orthogonal matrices (here dense
    random ones, which have no Kronecker factors, so the online site R4 says why it cannot
    take them). ``--rotate KIND`` then runs it, checked against the original model."""
    from qronos_onnx import registry
    from qronos_onnx.quant.hadamard import Rotation, random_orthogonal

    def orthogonal(n, seed):
        return Rotation(n, (), None, random_orthogonal(n, seed or 0), seed)

    monkeypatch.setitem(registry.ROTATIONS, "orthogonal", orthogonal)
    corpus = tmp_path / "text.txt"
    corpus.write_text("rotations by any orthogonal matrix keep the function " * 40)
    with pytest.warns(RotationWarning, match="R4 skipped"):
        report = qronos_onnx.optimize(
            tiny_models("kv"),
            tmp_path / "q.onnx",
            algo="rtn",
            group_size=32,
            rotate="orthogonal",
            calib_data=corpus,
            calib_windows=1,
            seqlen=32,
            progress=False,
        )
    assert report.rotation is not None
    assert [a["name"] for a in report.rotation.applied] == ["R1", "R2"]
    assert all("random orthogonal" in a["rotation"] for a in report.rotation.applied)
    assert report.rotation.check["error"] < 1e-4


def test_a_rotation_pass_object_runs_on_two_models(tiny_models):
    """The passes keep no state: one pass object rotates two models alike."""
    from qronos_onnx.passes.rotate import RotateResidualPass

    rotate = RotateResidualPass(seed=3)
    first, second = load_model(tiny_models("kv")), load_model(tiny_models("kv"))
    for model in (first, second):
        FoldNormScalesPass()(model)
        assert rotate(model).applied[0].name == "R1"
    assert first.graph.initializers.keys() == second.graph.initializers.keys()
    for name, value in first.graph.initializers.items():
        other = second.graph.initializers[name].const_value.numpy()
        np.testing.assert_array_equal(value.const_value.numpy(), other, err_msg=name)


def _logits_error(quantized, reference):
    """Relative error of the logits, each position's mean removed (softmax ignores it)."""
    q = quantized - quantized.mean(-1, keepdims=True)
    r = reference - reference.mean(-1, keepdims=True)
    return float(np.linalg.norm(q - r) / np.linalg.norm(r))


def test_w4a4_on_a_gemma3_with_a_massive_channel_is_no_worse_rotated(tiny_models, tmp_path):
    """Gemma 3's sandwich norms rule R1 out, and its pre-norms damp a massive residual channel
    to (near) zero. Folding those scales into the weights without R1 after them handed that
    channel to the int4 per-token activation quantizer: every other input of q/k/v and
    gate/up rounded to zero (Gemma-3-270M: perplexity 2,262,797 rotated against 792 without).
    With the scales folded only for R1, R2 and R4 can only help."""
    path = tiny_models("gemma3")
    corpus = tmp_path / "text.txt"
    corpus.write_text("a massive activation in one channel of the residual stream " * 60)
    feed = feeds(path, 3, 64)
    errors = {}
    for rotate in ("hadamard", "none"):
        out = tmp_path / rotate / "model.onnx"
        qronos_onnx.optimize(
            path,
            out,
            "w4a4",
            rotate=rotate,
            calib_data=corpus,
            calib_windows=8,
            seqlen=64,
            progress=False,
        )
        errors[rotate] = np.mean([_logits_error(logits(out, f), logits(path, f)) for f in feed])
    assert errors["hadamard"] <= 1.1 * errors["none"], errors
    assert errors["hadamard"] < 0.5, errors
