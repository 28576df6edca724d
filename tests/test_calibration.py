"""The two-stream calibration engine against brute-force full-model captures."""

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from qronos_onnx.calibration.runner import CalibrationOptions
from qronos_onnx.errors import QronosError
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.stages import plan_stages
from qronos_onnx.ir.targets import find_targets, readable_name
from qronos_onnx.quant import Grid
from qronos_onnx.scheme import Scheme, SolverOptions
from tests.helpers import full_model_capture, gram, random_samples, rel, solve_file, solved_weights

RECIPE = Scheme(grid=Grid(bits=3, group_size=16), solver=SolverOptions("qronos"))


def quantize_observed(model_path, tmp_path, reference="network", **cal):
    """Quantize and record every group's (group, H, G, results)."""
    seen = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    samples = random_samples(detect_signature(load_model(model_path)))
    options = CalibrationOptions(reference=reference, progress=False, **cal)
    outcome = solve_file(
        model_path,
        tmp_path / "q.onnx",
        RECIPE,
        samples,
        options,
        observer=lambda g, H, G, r: seen.append((g, H.numpy(), G.numpy(), r)),
    )
    return outcome, seen, samples


@pytest.mark.parametrize("variant", ["nokv", "kv"])
@pytest.mark.parametrize("reference", ["network", "stage"])
def test_statistics_equal_brute_force_capture(tiny_models, tmp_path, variant, reference):
    path = tiny_models(variant)
    _, seen, samples = quantize_observed(path, tmp_path, reference)
    assert len(seen) == 8  # 2 layers x (qkv, o, gate/up, down)
    inputs = [g.input for g, *_ in seen]
    float_x = full_model_capture(path, inputs, {}, samples)
    solved_before = {}
    earlier = []  # solved weights of groups 0..i-1
    for i, (group, H, G, results) in enumerate(seen):
        x_quant = full_model_capture(path, [group.input], solved_before, samples)[group.input]
        if reference == "network":
            x = float_x[group.input]
        else:  # float stage on quantized inputs: the previous group is still float
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
    """Counted by ONNX Runtime's profiler, not by our own bookkeeping: every node that depends
    on a target runs once per stream and window; nodes computed from the graph inputs alone
    (masks, rotary tables, the embedding) are recomputed in each stage that needs them rather
    than kept for every window."""
    path = tiny_models(variant)
    outcome, _, samples = quantize_observed(path, tmp_path, profile=True, optimize_graph=False)
    runs = outcome[1].run_info.node_runs
    model = load_model(path)
    groups, _ = find_targets(model)
    targets = {t.node for g in groups for t in g.targets}
    dependent = set()  # the targets and what they feed, by a walk of the graph
    for node in model.graph:
        if node.name in targets or any(
            v is not None and v.producer() is not None and v.producer().name in dependent
            for v in node.inputs
        ):
            dependent.add(node.name)
    n = len(samples)
    ran_dependent = {name: count for name, count in runs.items() if name in dependent}
    assert ran_dependent and set(ran_dependent.values()) == {2 * n}
    stages = plan_stages(model, groups)
    expected = Counter()
    for stage in stages:
        for node in stage.nodes:
            expected[node.name] += n if stage.shared else 2 * n
    assert dict(runs) == dict(expected)
    # the lm_head, the final norm and the present.* outputs never run
    never = {node.name for node in model.graph} - set(expected)
    assert any("lm_head" in str(node.metadata_props) for node in model.graph if node.name in never)


def test_output_holds_exactly_the_dequantized_weights(tiny_models, tmp_path):
    (saved, solved), _, _ = quantize_observed(tiny_models("kv"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]
    proto = onnx.load(str(saved))
    stored = {
        t.name: numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in proto.graph.initializer
    }
    results = solved.results
    assert len(results) == 14
    for r in results:
        np.testing.assert_array_equal(stored[r.target.weight], r.weight.dequantize().numpy().T)
    # the fake-quant model runs and is close to (not equal to) the float model
    feed = random_samples(detect_signature(load_model(saved)), count=1)[0]
    q = ort.InferenceSession(str(saved)).run(["logits"], feed)[0]
    f = ort.InferenceSession(str(tiny_models("kv"))).run(["logits"], feed)[0]
    assert 0 < rel(q, f) < 0.5


def test_stacked_group_solve_equals_separate_solves():
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


def test_nan_in_calibration_activations_is_refused(tiny_models, tmp_path):
    src = tiny_models("nokv")
    proto = onnx.load(str(src))
    for init in proto.graph.initializer:  # poison a norm weight: activations become NaN
        if "post_attention_layernorm" in init.name:
            a = numpy_helper.to_array(init).copy()
            a[0] = np.nan
            init.CopyFrom(numpy_helper.from_array(a, init.name))
            break
    else:
        pytest.fail("no norm weight found")
    onnx.save(
        proto, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data"
    )
    samples = random_samples(detect_signature(load_model(tmp_path / "model.onnx")))
    with pytest.raises(QronosError, match="NaN or Inf"):
        solve_file(tmp_path / "model.onnx", tmp_path / "out.onnx", RECIPE, samples)
    assert not (tmp_path / "out.onnx").exists()


def _codes(outcome):
    return {r.target.name: r.weight.codes for r in outcome[1].results}


def assert_same_run(a, b) -> None:
    """Two ``quantize_observed`` runs gave the same statistics and codes, to the bit."""
    (outcome_a, seen_a, _), (outcome_b, seen_b, _) = a, b
    for (_, H1, G1, _), (_, H2, G2, _) in zip(seen_a, seen_b, strict=True):
        np.testing.assert_array_equal(H1, H2)
        np.testing.assert_array_equal(G1, G2)
    codes_a, codes_b = _codes(outcome_a), _codes(outcome_b)
    assert codes_a.keys() == codes_b.keys()
    assert all(torch.equal(codes_a[k], codes_b[k]) for k in codes_a)


@pytest.mark.parametrize("reference", ["network", "stage"])
def test_a_small_memory_budget_spills_and_changes_nothing(tiny_models, tmp_path, reference):
    """With a budget of a few kilobytes the activations kept between stages go to files and the
    statistics are accumulated one window at a time: the statistics and codes are those of the
    unbounded run, to the bit (the sums are added in the same order)."""

    path = tiny_models("kv")
    free_run = quantize_observed(path, tmp_path / "free", reference)
    spill = tmp_path / "spill"
    tight_run = quantize_observed(
        path, tmp_path / "tight", reference, max_memory=4096, spill_dir=spill
    )
    free, tight, samples = free_run[0], tight_run[0], tight_run[2]
    run = tight[1].run_info
    assert run.store.peak_on_disk > 0 and run.store.peak_in_memory <= 4096
    assert run.stats_batches == [len(samples)] * 8  # one window per batch
    assert free[1].run_info.stats_batches == [1] * 8
    assert free[1].run_info.store.peak_on_disk == 0
    assert_same_run(free_run, tight_run)
    assert not list((spill / "activations").iterdir())  # every file removed at its last use


def test_what_is_kept_between_stages_does_not_grow_with_depth(tmp_path):
    """The bytes kept between stages (boundary values of every window) are the same for a
    2-layer and a 4-layer model: nothing accumulates layer after layer."""
    from models import tiny_llama

    kept = []
    for layers in (2, 4):
        path = tiny_llama.build(tmp_path / f"l{layers}", layers=layers)
        outcome, _, _ = quantize_observed(path, tmp_path / f"q{layers}")
        kept.append(outcome[1].run_info.kept)
    assert len(kept[1]) > len(kept[0])
    assert max(kept[1]) == max(kept[0])
    assert kept[0][-1] == kept[1][-1] == 0  # all freed at the end


def test_freed_heap_memory_is_returned_to_the_system():
    """Blocks below glibc's mmap threshold stay resident after ``free`` when a live block sits
    above them; ``return_freed_memory`` (run after every stage) gives them back."""
    from qronos_onnx.calibration.heap import _malloc_trim, return_freed_memory

    if _malloc_trim() is None:
        pytest.skip("not glibc")

    def rss_anon():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) * 1024

    big = np.ones(2**19)  # a 4 MB block, freed: glibc raises its mmap threshold to 4 MB
    del big
    blocks = [np.ones(2**15) for _ in range(1600)]  # 1600 x 256 KB, now below the threshold
    keep = blocks[-1]
    del blocks
    before = rss_anon()
    return_freed_memory()
    assert before - rss_anon() > 200 * 2**20
    assert keep.sum() == 2**15


def test_a_float16_model_keeps_float16_activations_on_disk_and_runs(
    tiny_models, tmp_path, monkeypatch
):
    """A float16 model end to end under a budget that spills: every activation kept between
    stages is float16 (as ONNX Runtime computed it, half the bytes of float32), and the
    written model runs in ONNX Runtime with finite float16 logits."""
    from qronos_onnx.calibration.store import BoundaryStore

    kept = set()
    put = BoundaryStore.put

    def spy(self, key, window, array):
        kept.add(array.dtype)
        return put(self, key, window, array)

    monkeypatch.setattr(BoundaryStore, "put", spy)
    path = tiny_models("fp16")
    outcome, _, samples = quantize_observed(
        path, tmp_path / "q", max_memory=4096, spill_dir=tmp_path / "spill"
    )
    assert kept == {np.dtype(np.float16)}
    assert outcome[1].run_info.store.peak_on_disk > 0
    session = ort.InferenceSession(str(tmp_path / "q" / "q.onnx"))
    feeds = {k: v for k, v in samples[0].items() if k in {i.name for i in session.get_inputs()}}
    logits = session.run(["logits"], feeds)[0]
    assert logits.dtype == np.float16 and np.isfinite(logits).all()


def test_solved_codes_are_held_in_file_backed_memory(tiny_models, tmp_path):
    """Every solved layer's codes live in a memory-mapped scratch file until the output is
    written (file-backed pages, not the process's heap), one file per stack, unlinked at once
    (nothing is left on disk), and they survive the removal of the scratch folder."""
    spill = tmp_path / "spill"
    outcome, _, _ = quantize_observed(tiny_models("kv"), tmp_path / "q", spill_dir=spill)
    results = outcome[1].results
    maps = "\n".join(m for m in Path("/proc/self/maps").read_text().splitlines() if str(spill) in m)
    mapped = {
        line.split()[-2]
        for line in maps.splitlines()
        if re.search(r"/codes\.\d+ \(deleted\)", line)
    }
    # one file per solved stack: q/k/v, o, gate/up and down in each of the 2 layers
    assert len(mapped) == 4 * 2, "not one mapped codes file per solved stack"
    for r in results:  # readable, and the values the dequantized weight was made of
        codes = r.weight.codes
        assert codes.dtype == torch.uint8 and int(codes.max()) < 2**r.weight.grid.bits


def test_a_wide_stack_solved_in_blocks_of_rows_gives_the_same_codes(
    tiny_models, tmp_path, monkeypatch
):
    """Rows are independent: a stack solved a few rows at a time (what bounds a 131,072-row
    lm_head's solve) gives the codes, scales and report terms of the stack solved whole."""
    from qronos_onnx.passes import calibrate

    path = tiny_models("kv")
    whole, _, _ = quantize_observed(path, tmp_path / "whole")
    monkeypatch.setattr(calibrate, "ROW_BLOCK_BYTES", 4 * 64 * 24)  # 24 rows of 64 inputs
    assert len(calibrate.row_blocks(128, 64)) == 6
    blocked, _, _ = quantize_observed(path, tmp_path / "blocked")
    pairs = zip(whole[1].results, blocked[1].results, strict=True)
    for a, b in pairs:
        assert torch.equal(a.weight.codes, b.weight.codes), a.target.name
        assert torch.equal(a.weight.scales, b.weight.scales)
        assert a.cross_rtn == pytest.approx(b.cross_rtn, rel=1e-6)
        assert a.quad_rtn == pytest.approx(b.quad_rtn, rel=1e-6)


@pytest.mark.parametrize("reference", ["network", "stage"])
def test_stages_run_through_io_binding_give_the_same_statistics(
    tiny_models, tmp_path, reference, monkeypatch
):
    """The GPU path (``calibration/bound.py``: weights bound once per stage, the statistics'
    inputs handed to torch through DLPack), run on CPU: the statistics and codes of the plain
    runs, to the bit, with the group inputs reaching the statistics as torch tensors."""
    from qronos_onnx.calibration import bound

    handed = []
    run = bound.BoundRun.run

    def counting(self, *args, **kwargs):
        outputs = run(self, *args, **kwargs)
        handed.extend(type(v) for v in outputs.values())
        return outputs

    monkeypatch.setattr(bound.BoundRun, "run", counting)
    path = tiny_models("kv")
    plain_run = quantize_observed(path, tmp_path / "plain", reference)
    assert not handed
    bound_run = quantize_observed(path, tmp_path / "bound", reference, io_binding=True)
    assert torch.Tensor in handed and np.ndarray in handed
    assert_same_run(plain_run, bound_run)
    plain, bound_run = plain_run[0], bound_run[0]
    assert bound_run[1].run_info.output_error == plain[1].run_info.output_error


def test_a_bfloat16_model_is_refused_on_cpu_before_any_work(tiny_models, tmp_path, capsys):
    """ONNX Runtime's CPU provider has no bfloat16 kernels: a bfloat16 model is refused in one
    line that names the ways out, before any calibration, and nothing is written."""
    from qronos_onnx.cli import main

    path = tiny_models("bf16")
    out = tmp_path / "out"
    out.mkdir()
    assert main(["optimize", str(path), "-o", str(out / "q.onnx"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bfloat16" in err and "--device cuda" in err and "--dtype fp16" in err
    assert len(err.splitlines()) == 1
    assert not list(out.iterdir())


def test_recomputing_the_mlp_input_keeps_less_and_changes_nothing(tiny_models, tmp_path):
    """With ``recompute_wide`` the intermediate-wide down_proj input is computed again in the
    next stage instead of kept for every window: the statistics, codes and output errors are
    those of the run that keeps it, to the bit; no value wider than the hidden size crosses a
    stage boundary; less is kept; and (counted by ONNX Runtime's profiler) exactly the nodes
    from gate/up to down_proj's input run twice as often, all else as often as before."""
    path = tiny_models("kv")
    common = {"profile": True, "optimize_graph": False}
    keep_run = quantize_observed(path, tmp_path / "k", recompute_wide=False, **common)
    again_run = quantize_observed(path, tmp_path / "r", recompute_wide=True, **common)
    assert_same_run(keep_run, again_run)
    keep, again = keep_run[0], again_run[0]
    assert keep[1].run_info.output_error == again[1].run_info.output_error
    assert max(again[1].run_info.kept) < max(keep[1].run_info.kept)

    model = load_model(path)
    groups, _ = find_targets(model)
    hidden = min(g.in_features for g in groups)
    values = {v.name: v for n in model.graph for v in n.outputs}
    for stage in plan_stages(model, groups, recompute_wide=True):
        assert all(values[n].shape[-1] == hidden for n in stage.inputs if n in values)
    runs_keep, runs_again = keep[1].run_info.node_runs, again[1].run_info.node_runs
    assert runs_keep.keys() == runs_again.keys()
    twice = {n for n in runs_keep if runs_again[n] == 2 * runs_keep[n]}
    assert all(runs_again[n] == runs_keep[n] for n in runs_keep if n not in twice)
    mlp = {
        n.name
        for n in model.graph
        if "mlp" in readable_name(n) and "down_proj" not in readable_name(n)
    }
    assert twice and twice <= mlp
