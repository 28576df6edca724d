"""Per-node control (include, exclude, per-pattern grids, lm_head policy) and report.json."""

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.errors import QronosError
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.options import DEFAULT_REPORT, Options
from qronos_onnx.pipeline import run
from qronos_onnx.quant import Grid
from qronos_onnx.writers import FileWriter
from tests.helpers import padded_samples, random_samples


def quantize(path, out_dir, data=None, observer=None, **options):
    """The orchestrator with the file writer (int4 asymmetric, group 32, range scales unless
    ``options`` say otherwise) on random feeds: ``(report, output, feeds, solved target
    results)``."""
    grid = {"bits": 4, "group_size": 32, "symmetric": False, "scale_search": "minmax"}
    config = Options(**{**grid, "progress": False, **options})
    samples = data
    if samples is None and config.needs_data:
        samples = random_samples(detect_signature(load_model(path)))
    results = []

    def observe(group, H, G, solved):
        results.extend(solved)
        if observer is not None:
            observer(group, H, G, solved)

    output = Path(out_dir) / "q.onnx"
    report = run(path, config, FileWriter(output, report=DEFAULT_REPORT), samples, observe)
    return report, output, samples, results


def test_include_and_exclude_patterns(tiny_models, tmp_path):
    report, *_ = quantize(
        tiny_models("nokv"), tmp_path, include=("*mlp*",), exclude=("re:layers\\.1\\..*down",)
    )
    names = {t.name for t in report.targets}
    assert names == {
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    }
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["model.layers.1.mlp.down_proj"] == "excluded by pattern"
    assert reasons["model.layers.0.self_attn.q_proj"] == "not included by pattern"


def test_bad_regex_is_a_clear_error(tiny_models, tmp_path):
    with pytest.raises(QronosError, match="bad exclude regex"):
        quantize(tiny_models("nokv"), tmp_path, exclude=("re:([",))


def test_per_pattern_grids(tiny_models, tmp_path):
    report, output, *_ = quantize(
        tiny_models("nokv"),
        tmp_path,
        format="qdq",
        overrides=("*down_proj=bits:8,group:16,sym", "*.k_proj=bits:2,group:64"),
    )
    grids = {t.name.split(".")[-1]: t.grid for t in report.targets}
    assert grids["down_proj"] == asdict(Grid(bits=8, group_size=16, symmetric=True))
    assert grids["k_proj"] == asdict(Grid(bits=2, group_size=64))
    assert grids["q_proj"] == grids["v_proj"] == asdict(Grid(bits=4, group_size=32))
    assert report.targets[1].grid["bits"] == 2  # layer 0 k_proj
    ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", ["nokv", "untied"])
def test_lm_head_policies(tiny_models, tmp_path, variant):
    """``skip`` leaves the lm_head (and the embedding) float; ``int8`` solves it int8 per
    channel, and the embedding becomes a GatherBlockQuantized (the lm_head's codes when tied,
    its own blocks when not: both at 64 values a block here); the result stays close to float."""
    path = tiny_models(variant)
    (tmp_path / "a").mkdir()
    _, output, samples, skipped = quantize(path, tmp_path / "a", lm_head="skip")
    assert not any(r.target.lm_head for r in skipped)
    report = json.loads((tmp_path / "a" / "q.report.json").read_text())
    assert any("lm_head" in s["reason"] for s in report["skipped"])
    ops = [n.op_type for n in load_model(output).graph]
    assert ops.count("MatMulNBits") == 14 and "Gather" in ops  # the embedding stays float
    (tmp_path / "b").mkdir()
    _, output, _, results = quantize(path, tmp_path / "b", lm_head="int8")
    heads = [r for r in results if r.target.lm_head]
    assert len(heads) == 1 and heads[0].weight.grid == Grid(bits=8, group_size=None, symmetric=True)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in load_model(output).graph]
    assert ops.count("MatMulNBits") == 15 and "GatherBlockQuantized" in ops and "Gather" not in ops
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a, b = (s.run(["logits"], samples[0])[0] for s in (session, ref))
    assert np.abs(a - b).max() < 0.5 * np.abs(b).max()


@pytest.mark.parametrize("patterns", [{"exclude": ("lm_head",)}, {"include": ("*q_proj",)}])
def test_an_lm_head_left_out_by_patterns_is_not_untied(tiny_models, tmp_path, patterns):
    """``lm_head="int8"`` with patterns that leave the tied lm_head out writes the same tensors
    as without the policy: no float copy of the embedding for an lm_head that stays float."""
    path = tiny_models("nokv")
    tensors = {}
    for policy in ("skip", "int8"):
        (tmp_path / policy).mkdir()
        _, output, _, results = quantize(path, tmp_path / policy, lm_head=policy, **patterns)
        assert not any(r.target.lm_head for r in results)
        proto = onnx.load(str(output))
        tensors[policy] = {
            t.name: numpy_helper.to_array(t, str(tmp_path / policy)).nbytes
            for t in proto.graph.initializer
        }
    assert tensors["int8"] == tensors["skip"]


def test_an_override_of_the_lm_head_under_the_int8_policy_warns(tiny_models, tmp_path):
    from qronos_onnx import RecipeWarning

    with pytest.warns(
        RecipeWarning, match="'lm_head' matches no quantized layer .*set by the lm_head policy"
    ):
        _, _, _, results = quantize(
            tiny_models("nokv"), tmp_path, lm_head="int8", overrides=("lm_head=bits:4,group:32",)
        )
    head = next(r for r in results if r.target.lm_head)
    assert head.weight.grid.bits == 8


@pytest.mark.parametrize(
    "padded,reference", [(False, "network"), (True, "network"), (False, "stage")]
)
def test_report_errors_match_the_statistics(tiny_models, tmp_path, padded, reference):
    """The error measured by ORT on each layer's outputs, and the RTN error computed from the
    statistics, equal float64 evaluations of ``||W X - Q X~||^2 / ||W X||^2`` from ``H``, ``G``;
    with padding, both count only the real tokens, as the statistics do. In stage mode the
    measuring run's float layer reads ``X~``: both errors are ``||(W - Q) X~||^2 / ||W X~||^2``."""
    seen = {}

    def observe(group, H, G, results):
        for r in results:
            seen[r.target.node] = (H.double(), G.double())

    path = tiny_models("kv")
    signature = detect_signature(load_model(path))
    samples = random_samples(signature)
    if padded:  # batch 2, right padding on the second window
        samples = padded_samples(signature)
    report, _, _, results = quantize(
        path,
        tmp_path,
        samples,
        observe,
        bits=3,
        group_size=16,
        reference=reference,
        lm_head="skip",
        accuracy_level=0,  # in stage mode the float layer then reads X~ itself
    )
    from qronos_onnx.weights import weight_matrix

    model = load_model(path)
    for r in results:
        H, G = seen[r.target.node]
        W = weight_matrix(
            model.graph.initializers[r.target.weight].const_value, r.target.transposed
        ).double()
        Q = r.weight.dequantize().double()
        if reference == "stage":
            assert r.output_ref == pytest.approx(float(((W @ H) * W).sum()), rel=1e-4)
            G = H
        predicted = r.output_ref - 2 * float(((W @ G) * Q).sum()) + float(((Q @ H) * Q).sum())
        assert r.error == pytest.approx(predicted / r.output_ref, rel=2e-3, abs=1e-6)
        scales, zeros = r.weight.scales.double(), r.weight.zero_points
        step = scales.repeat_interleave(r.weight.grid.group_size, dim=1)[:, : W.shape[1]]
        zero = zeros.double().repeat_interleave(r.weight.grid.group_size, dim=1)[:, : W.shape[1]]
        Q_rtn = (
            torch.clamp(torch.round(W / step) + zero, r.weight.grid.qmin, r.weight.grid.qmax) - zero
        ) * step
        rtn = r.output_ref - 2 * float(((W @ G) * Q_rtn).sum()) + float(((Q_rtn @ H) * Q_rtn).sum())
        assert r.error_rtn == pytest.approx(rtn / r.output_ref, rel=1e-4)
        assert 0 < r.error < 1 and 0 < r.error_rtn < 2
    errors = [(t.error, t.error_rtn) for t in report.targets]
    assert np.mean([e for e, _ in errors]) < np.mean([e for _, e in errors])  # solving helps
    on_disk = json.loads((tmp_path / "q.report.json").read_text())
    assert on_disk["totals"]["targets"] == 14 and on_disk["format"] == "matmulnbits"
    assert on_disk["totals"]["output_bytes"] > 0 and on_disk["totals"]["peak_rss_mb"] > 0
    assert set(on_disk["targets"][0]) >= {
        "name",
        "shape",
        "grid",
        "algorithm",
        "damping",
        "damping_retries",
        "error_rtn",
        "error",
        "solve_seconds",
    }


def test_matmulnbits_group_size_is_checked_before_any_work(tiny_models, tmp_path):
    with pytest.raises(QronosError, match="power-of-two"):
        quantize(tiny_models("nokv"), tmp_path, group_size=24)
    assert list(tmp_path.iterdir()) == []


def test_gemm_with_beta_is_skipped():
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from qronos_onnx.ir.targets import find_targets

    inits = [
        numpy_helper.from_array(np.ones((4, 8), np.float32), "w"),
        numpy_helper.from_array(np.ones(4, np.float32), "b"),
    ]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g1", transB=1, beta=0.5)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    groups, skipped = find_targets(ir.serde.deserialize_model(helper.make_model(graph)))
    assert not groups and skipped[0].reason == "Gemm with beta != 1"


def test_feeds_from_readers_are_completed_with_the_right_types(tiny_models):
    sig = detect_signature(load_model(tiny_models("kv")))
    feed = sig.complete(
        {
            "input_ids": np.array([[5, 6, 7, 8]], np.int32),
            "attention_mask": np.array([[0, 0, 1, 1]], np.int32),
        }
    )
    assert all(v.dtype == np.int64 for k, v in feed.items() if not k.startswith("past"))
    np.testing.assert_array_equal(feed["position_ids"], [[0, 0, 0, 1]])  # left padding
    assert feed["past_key_values.0.key"].shape == (1, 2, 0, 16)


def test_half_precision_weights_get_scales_representable_in_their_dtype():

    w = torch.randn(8, 64).half()
    for grid in (Grid(bits=4, group_size=16), Grid(bits=4, group_size=16, symmetric=True)):
        scales, _ = grid.fit(w)
        assert torch.equal(scales.half().float(), scales)


def test_fewer_tokens_than_input_features_warn(tiny_models, tmp_path):
    """The warning counts real tokens (padding excluded) against each group's input features."""
    from qronos_onnx import CalibrationWarning

    path = tiny_models("kv")
    signature = detect_signature(load_model(path))
    padded = padded_samples(signature, batch=1, seed=0)  # 3 x 20 real tokens
    with pytest.warns(CalibrationWarning, match=r"60 tokens.* of 9 layer groups \(up to 128"):
        report, *_ = quantize(path, tmp_path, padded, group_size=16)
    assert len(report.warnings) == 1 and "60 tokens" in report.warnings[0]
    (tmp_path / "b").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        report, *_ = quantize(path, tmp_path / "b", random_samples(signature), group_size=16)
    assert report.warnings == []  # 3 x 48 = 144 tokens


def test_patterns_that_match_nothing_warn_and_are_reported(tiny_models, tmp_path):
    """A typo in a pattern changes nothing silently: include / exclude patterns that match no
    layer and overrides that match no quantized layer (here one whose layer is excluded) warn,
    and the report keeps the warnings; patterns that match stay quiet."""
    from qronos_onnx import RecipeWarning

    with pytest.warns(RecipeWarning) as caught:
        report, *_ = quantize(
            tiny_models("nokv"),
            tmp_path,
            algo="rtn",
            group_size=16,
            include=("model.layers.*", "*.nothing"),
            exclude=("*down_proj", "lm_head*"),
            overrides=("*.kproj=bits:8", "*.k_proj=bits:8", "*down_proj=bits:8"),
        )
    messages = [str(w.message) for w in caught if w.category is RecipeWarning]
    assert [m.split(" (")[0] for m in messages] == [
        "include pattern '*.nothing' matches no layer",
        "override pattern '*.kproj' matches no quantized layer",
        "override pattern '*down_proj' matches no quantized layer",
    ]
    assert report.warnings == messages
    grids = {t.name: t.grid["bits"] for t in report.targets}
    assert (
        grids["model.layers.0.self_attn.k_proj"] == 8
        and "model.layers.0.mlp.down_proj" not in grids
    )


def half_precision_llm(path, dtype=np.float16):
    """A minimal decoder-shaped graph in ``dtype``: embedding, two MatMuls, logits."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal(shape) / 8).astype(dtype), name)
        for name, shape in (
            ("emb", (256, 64)),
            ("w1", (64, 128)),
            ("w2", (128, 64)),
            ("lm_head", (64, 256)),
        )
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("MatMul", ["y", "lm_head"], ["logits"], name="/lm_head/MatMul"),
    ]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", elem, None)],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def test_half_precision_model_is_solved_on_the_grid_it_deploys(tmp_path):
    """float16 weights: the solver's scales are float16 values, so the MatMulNBits file (float16
    scales) computes exactly what was solved."""
    path = half_precision_llm(tmp_path / "half.onnx")
    samples = random_samples(detect_signature(load_model(path)), count=4)
    _, _, _, results = quantize(path, tmp_path, samples)
    assert len(results) == 3  # two layers and the lm_head
    proto = onnx.load(str(tmp_path / "q.onnx"))
    stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for r in results:
        scales = r.weight.scales
        assert torch.equal(scales.half().float(), scales)
        node = next(n for n in proto.graph.node if n.name.startswith(r.target.node))
        np.testing.assert_array_equal(
            stored[node.input[2]].astype(np.float32).reshape(scales.shape), scales.numpy()
        )
