"""The two-stream calibration engine against brute-force full-model captures."""

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import random_samples
from qronos_onnx.calibration.runner import CalibrationOptions
from qronos_onnx.config import Recipe, SolverOptions
from qronos_onnx.errors import QronosError
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.stages import plan_stages
from qronos_onnx.ir.targets import find_targets
from qronos_onnx.pipeline import quantize_file
from qronos_onnx.quant import Grid

RECIPE = Recipe(grid=Grid(bits=3, group_size=16), solver=SolverOptions("qronos"))


def quantize_observed(model_path, tmp_path, reference="network", **cal):
    """Quantize and record every group's (group, H, G, results)."""
    seen = []
    samples = random_samples(detect_signature(load_model(model_path)))
    options = CalibrationOptions(reference=reference, progress=False, **cal)
    outcome = quantize_file(model_path, tmp_path / "q.onnx", RECIPE, samples, options, fmt=None,
                            report=None, observer=lambda g, H, G, r: seen.append((g, H.numpy(), G.numpy(), r)))
    return outcome, seen, samples


def full_model_capture(model_path, names, solved, samples):
    """Run the whole model (onnx + ORT, no project code) with ``names`` as extra outputs and
    the ``solved`` weights ({initializer: array}) substituted; returns {name: [arrays]}."""
    proto = onnx.load(str(model_path))
    for init in proto.graph.initializer:
        if init.name in solved:
            init.CopyFrom(numpy_helper.from_array(solved[init.name], init.name))
    for name in names:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = {n: [] for n in names}
    for feed in samples:
        for n, a in zip(names, session.run(names, feed)):
            out[n].append(a)
    return out


def gram(a, b):
    a = np.concatenate([x.reshape(-1, x.shape[-1]) for x in a]).astype(np.float64)
    b = np.concatenate([x.reshape(-1, x.shape[-1]) for x in b]).astype(np.float64)
    return a.T @ b / a.shape[0]


def solved_weights(results):
    """{initializer: dequantized weight in the stored layout} of a list of results."""
    return {r.target.weight: r.weight.dequantize().numpy().T.copy() for r in results}


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("variant", ["nokv", "kv"])
@pytest.mark.parametrize("reference", ["network", "stage"])
def test_statistics_equal_brute_force_capture(tiny_models, tmp_path, variant, reference):
    path = tiny_models(variant)
    _, seen, samples = quantize_observed(path, tmp_path, reference)
    assert len(seen) == 8                                    # 2 layers x (qkv, o, gate/up, down)
    inputs = [g.input for g, *_ in seen]
    float_x = full_model_capture(path, inputs, {}, samples)
    solved_before = {}
    earlier = []                                             # solved weights of groups 0..i-1
    for i, (group, H, G, results) in enumerate(seen):
        x_quant = full_model_capture(path, [group.input], solved_before, samples)[group.input]
        if reference == "network":
            x = float_x[group.input]
        else:   # float stage on quantized inputs: the previous group is still float
            previous = {k: v for r in earlier[:-1] for k, v in r.items()}
            x = full_model_capture(path, [group.input], previous, samples)[group.input]
        assert rel(H, gram(x_quant, x_quant)) < 1e-5, (i, group.input)
        assert rel(G, gram(x, x_quant)) < 1e-5, (i, group.input)
        earlier.append(solved_weights(results))
        solved_before.update(earlier[-1])
    # the first group sees no quantized layer: G == H; later ones see a real mismatch
    assert rel(seen[0][2], seen[0][1]) == 0
    assert rel(seen[-1][2], seen[-1][1]) > 1e-3


@pytest.mark.parametrize("variant", ["nokv", "kv"])
def test_each_node_runs_once_per_stream_and_sample(tiny_models, tmp_path, variant):
    """Counted by ONNX Runtime's profiler, not by our own bookkeeping."""
    path = tiny_models(variant)
    outcome, _, samples = quantize_observed(path, tmp_path, profile=True, optimize_graph=False)
    runs = outcome.quantize.run_info.node_runs
    model = load_model(path)
    groups, _ = find_targets(model)
    stages = plan_stages(model, groups)
    n = len(samples)
    expected = {node.name: n if stage.shared else 2 * n for stage in stages for node in stage.nodes}
    assert dict(runs) == expected
    # the lm_head, the final norm and the present.* outputs never run
    never = {node.name for node in model.graph} - set(expected)
    assert any("lm_head" in str(node.metadata_props) for node in model.graph if node.name in never)
    assert sum(runs.values()) <= 2 * n * sum(1 for _ in model.graph)


def test_output_holds_exactly_the_dequantized_weights(tiny_models, tmp_path):
    outcome, _, _ = quantize_observed(tiny_models("kv"), tmp_path)
    files = outcome.files
    assert [f.name for f in files] == ["q.onnx", "q.onnx.data"]
    proto = onnx.load(str(files[0]))
    stored = {t.name: numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in proto.graph.initializer}
    results = outcome.quantize.results
    assert len(results) == 14
    for r in results:
        np.testing.assert_array_equal(stored[r.target.weight], r.weight.dequantize().numpy().T)
    # the fake-quant model runs and is close to (not equal to) the float model
    feed = random_samples(detect_signature(load_model(files[0])), count=1)[0]
    q = ort.InferenceSession(str(files[0])).run(["logits"], feed)[0]
    f = ort.InferenceSession(str(tiny_models("kv"))).run(["logits"], feed)[0]
    assert 0 < rel(q, f) < 0.5


def test_stacked_group_solve_equals_separate_solves():
    import torch

    from qronos_onnx.quant import solve

    torch.manual_seed(0)
    X = torch.randn(32, 500, dtype=torch.float64)
    H = X @ X.T / 500
    G = (X + 0.1 * torch.randn_like(X)) @ X.T / 500
    Ws = [torch.randn(8, 32, dtype=torch.float64) for _ in range(3)]
    grid = Grid(bits=4, group_size=8)
    stacked = solve("qronos", torch.cat(Ws), H, G, grid=grid)
    for i, W in enumerate(Ws):
        alone = solve("qronos", W, H, G, grid=grid)
        assert torch.equal(stacked.rows(8 * i, 8 * i + 8).codes, alone.codes)


# -- clear errors, nothing written ---------------------------------------------------------


def expect_error(model_path, tmp_path, match, samples=None):
    out = tmp_path / "out.onnx"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(QronosError, match=match):
        quantize_file(model_path, out, RECIPE, samples or [{}], CalibrationOptions(progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_non_llm_graph_is_refused(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                   [x], [y], [w])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "plain.onnx")
    expect_error(tmp_path / "plain.onnx", tmp_path, "not a decoder LLM graph")


def test_missing_external_data_is_refused(tiny_models, tmp_path):
    shutil.copy(tiny_models("nokv"), tmp_path / "model.onnx")
    expect_error(tmp_path / "model.onnx", tmp_path, "external data file .* is missing")


def test_truncated_external_data_is_refused(tiny_models, tmp_path):
    src = tiny_models("nokv")
    shutil.copy(src, tmp_path / "model.onnx")
    data = (src.parent / "model.onnx.data").read_bytes()
    (tmp_path / "model.onnx.data").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "model.onnx", tmp_path, "truncated")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_model_file_is_refused(tiny_models, tmp_path, damage):
    src = tiny_models("nokv").read_bytes()
    bad = src[: len(src) // 3] if damage == "truncate" else bytes(range(256)) * 50
    (tmp_path / "model.onnx").write_bytes(bad)
    expect_error(tmp_path / "model.onnx", tmp_path, "not a readable ONNX model")


def test_nan_in_calibration_activations_is_refused(tiny_models, tmp_path):
    src = tiny_models("nokv")
    proto = onnx.load(str(src))
    for init in proto.graph.initializer:       # poison a norm weight: activations become NaN
        if "post_attention_layernorm" in init.name:
            a = numpy_helper.to_array(init).copy()
            a[0] = np.nan
            init.CopyFrom(numpy_helper.from_array(a, init.name))
            break
    else:
        pytest.fail("no norm weight found")
    onnx.save(proto, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    samples = random_samples(detect_signature(load_model(tmp_path / "model.onnx")))
    expect_error(tmp_path / "model.onnx", tmp_path, "NaN or Inf", samples)


def test_existing_output_is_not_overwritten_without_force(tiny_models, tmp_path):
    (tmp_path / "out.onnx").write_text("keep me")
    with pytest.raises(QronosError, match="exists"):
        quantize_file(tiny_models("nokv"), tmp_path / "out.onnx", RECIPE, [{}])
    assert (tmp_path / "out.onnx").read_text() == "keep me"
    with pytest.raises(QronosError, match="refusing to overwrite .* the input model"):
        quantize_file(tiny_models("nokv"), tiny_models("nokv"), RECIPE, [{}], force=True)


def test_input_data_files_and_existing_companions_are_never_overwritten(tiny_models, tmp_path):
    """The output's data file and report count as outputs: one the input model reads is refused
    even with force; an existing one needs force."""
    source = onnx.load(tiny_models("nokv"))
    onnx.save(source, tmp_path / "float.onnx", save_as_external_data=True,
              location="model.onnx.data")                 # the data name of an output model.onnx
    before = (tmp_path / "model.onnx.data").read_bytes()
    for force in (False, True):
        with pytest.raises(QronosError, match="model.onnx.data: the input model .* reads it"):
            quantize_file(tmp_path / "float.onnx", tmp_path / "model.onnx", RECIPE, [{}],
                          force=force)
    assert (tmp_path / "model.onnx.data").read_bytes() == before
    assert not (tmp_path / "model.onnx").exists()
    (tmp_path / "q.report.json").write_text("an earlier run")
    with pytest.raises(QronosError, match="q.report.json exists"):
        quantize_file(tmp_path / "float.onnx", tmp_path / "q.onnx", RECIPE, [{}])
    (tmp_path / "q.onnx.data").write_text("stale")
    with pytest.raises(QronosError, match="q.onnx.data exists"):
        quantize_file(tmp_path / "float.onnx", tmp_path / "q.onnx", RECIPE, [{}], report=None)
    assert (tmp_path / "q.report.json").read_text() == "an earlier run"


@pytest.mark.parametrize("output,report,message", [
    ("q.onnx", "../r.json", "not a plain file name"),
    ("q.onnx", "q.onnx.data", "output model's own file name"),
    ("q.onnx", "", "not a plain file name"),
    ("q.onnx", "other.onnx", "cannot name a file beside the output"),
    ("q.onnx", "tokenizer.json", "the tokenizer copied there"),
    ("q.onnx", "rdir", "is a directory; it would be replaced"),
    ("adir", "r.json", "must end in .onnx"),
    ("adir.onnx", "r.json", "is a directory"),
    ("locked/sub/q.onnx", "r.json", "permission denied"),
])
def test_bad_output_places_are_refused_before_any_work(tiny_models, tmp_path, output, report,
                                                       message):
    (tmp_path / "adir.onnx").mkdir()
    (tmp_path / "rdir").mkdir()
    (tmp_path / "locked").mkdir(mode=0o500)
    if os.access(tmp_path / "locked", os.W_OK) and "locked" in output:
        pytest.skip("running as a user who can write anywhere")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(QronosError, match=message):
        quantize_file(tiny_models("nokv"), tmp_path / output, RECIPE, [], report=report)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


RTN4 = Recipe(grid=Grid(bits=4, group_size=16), solver=SolverOptions("rtn"))
RTN2 = Recipe(grid=Grid(bits=2, group_size=16), solver=SolverOptions("rtn"))


def failing_replace(monkeypatch, fails):
    """Make ``os.replace`` raise ``fails[(step, file name)]`` for the moves of ``_place``:
    step ``aside`` (an existing file into ``old/``), ``place`` (a new file from ``new/``) or
    ``restore`` (back from ``old/``)."""
    real_replace = os.replace

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        step = {"old": "restore", "new": "place"}.get(src.parent.name, "aside")
        error = fails.get((step, (dst if step != "aside" else src).name))
        if error is not None:
            raise error
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("step", ["aside", "place"])
@pytest.mark.parametrize("failing", ["q.onnx", "q.onnx.data", "q.report.json"])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt()])
def test_a_failed_write_leaves_the_previous_output_as_it_was(tiny_models, tmp_path, monkeypatch,
                                                             step, failing, error):
    """Model, data and report are placed together: when moving any of them fails (or is
    interrupted), what was placed is removed and the previous files come back, byte for byte."""
    quantize_file(tiny_models("nokv"), tmp_path / "q.onnx", RTN4, [])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"q.onnx", "q.onnx.data", "q.report.json"}
    failing_replace(monkeypatch, {(step, failing): error})
    expected = QronosError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected, match="could not write .*No space left" if expected is QronosError
                       else None):
        quantize_file(tiny_models("nokv"), tmp_path / "q.onnx", RTN2, [], force=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_previous_files_that_cannot_be_put_back_are_kept_and_named(tiny_models, tmp_path,
                                                                   monkeypatch):
    quantize_file(tiny_models("nokv"), tmp_path / "q.onnx", RTN4, [])
    old_data = (tmp_path / "q.onnx.data").read_bytes()
    failing_replace(monkeypatch, {("place", "q.onnx"): OSError(errno.EIO, "I/O error"),
                                  ("restore", "q.onnx.data"): OSError(errno.EIO, "I/O error")})
    with pytest.raises(QronosError, match="could not put back q.onnx.data .* previous files are "
                                          "in (.*)") as caught:
        quantize_file(tiny_models("nokv"), tmp_path / "q.onnx", RTN2, [], force=True)
    kept = Path(str(caught.value).rsplit(" in ", 1)[1])
    assert (kept / "q.onnx.data").read_bytes() == old_data
    assert {"q.onnx", "q.report.json"} <= {p.name for p in tmp_path.iterdir()}


def test_a_failed_write_removes_the_directories_it_made(tiny_models, tmp_path, monkeypatch):
    failing_replace(monkeypatch, {("place", "q.onnx"): OSError(errno.ENOSPC, "No space left")})
    with pytest.raises(QronosError, match="could not write"):
        quantize_file(tiny_models("nokv"), tmp_path / "a" / "b" / "q.onnx", RTN4, [])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("naming", ["unnamed", "one name for all"])
def test_nodes_without_unique_names_are_quantized_like_named_ones(tiny_models, tmp_path, naming):
    """ONNX allows empty and repeated node names: the same layers are found and get the same
    codes as in the named model."""
    source = tiny_models("nokv")
    proto = onnx.load(str(source))
    for node in proto.graph.node:
        node.name = "" if naming == "unnamed" else "node"
    onnx.save(proto, tmp_path / "model.onnx")
    loaded = load_model(tmp_path / "model.onnx")
    names = [n.name for n in loaded.graph]
    assert all(names) and len(set(names)) == len(names)
    values = sorted(v.name or "" for n in loaded.graph for v in n.outputs)   # left as they were
    assert values == sorted(o for n in proto.graph.node for o in n.output)
    samples = random_samples(detect_signature(load_model(source)))
    outputs = {}
    for label, path in (("named", source), ("renamed", tmp_path / "model.onnx")):
        out = tmp_path / f"{label}.onnx"
        outcome = quantize_file(path, out, RECIPE, samples, report=None)
        assert len(outcome.quantize.results) == 14
        q = onnx.load(str(out))
        assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == 14
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        outputs[label] = session.run(["logits"], samples[0])[0]
    np.testing.assert_array_equal(outputs["named"], outputs["renamed"])


def test_naming_nodes_leaves_optional_outputs_uncomputed(tmp_path):
    """An empty output name marks an optional output nobody computes (Dropout's mask here): only
    nodes get names on load, so it stays empty in the saved model."""
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x"], ["d", ""]), helper.make_node("MatMul", ["d", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    from qronos_onnx.ir.model_io import write_model

    write_model(load_model(tmp_path / "m.onnx"), tmp_path / "out.onnx")
    nodes = onnx.load(str(tmp_path / "out.onnx")).graph.node
    assert [[o for o in n.output if o] for n in nodes] == [["d"], ["y"]]   # no mask computed
    assert [n.name for n in nodes] == ["Dropout_0", "MatMul_0"]
