"""Size budgets (``--bits-per-weight``): the knapsack against brute force, the measured errors
against ONNX Runtime's, the sizes against the files written, the reuse of measurements."""

import itertools
import json
import random

import numpy as np
import onnx_ir as ir
import pytest

from qronos_onnx.budget import KNAPSACK_STEPS, WEIGHTINGS, Candidate, Unit, allocate
from qronos_onnx.cli import main
from qronos_onnx.errors import QronosError
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.packing import to_matmulnbits
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.sizes import stored_weights
from qronos_onnx.ir.targets import Target, TargetGroup
from qronos_onnx.options import Options
from qronos_onnx.passes.act_quant import InsertActQuantPass
from qronos_onnx.passes.calibrate import CalibrateSolvePass, SolveResult
from qronos_onnx.passes.chain import run_passes
from qronos_onnx.pipeline import preflight
from qronos_onnx.quant import Grid
from qronos_onnx.registry import get_format
from qronos_onnx.scheme import LM_HEAD_GRIDS, Scheme
from tests.helpers import random_samples
from tests.test_recipe import quantize


def random_units(rng: random.Random, n: int) -> list[Unit]:
    units = []
    for i in range(n):
        k = rng.randint(1, 4)
        candidates = [
            Candidate(Grid(2 + 2 * (j % 3), 32), rng.randint(100, 5000), [rng.random()], [1.0])
            for j in range(k)
        ]
        units.append(Unit([f"u{i}"], [f"n{i}"], 1000, [rng.uniform(0.5, 2)], candidates))
    return units


def widest_floor(units, budget):
    """The widest width every unit has and whose cheapest candidates fit (the rule)."""
    for width in (8, 6, 4, 2):
        if all(any(c.grid.bits >= width for c in u.candidates) for u in units) and (
            sum(min(c.bytes for c in u.candidates if c.grid.bits >= width) for u in units) <= budget
        ):
            return width
    return 2


@pytest.mark.parametrize("weighting", sorted(WEIGHTINGS))
@pytest.mark.parametrize("seed", range(4))
def test_knapsack_against_brute_force(weighting, seed):
    """Within the budget, no unit narrower than the budget needs (every unit at the widest
    width whose cheapest choices fit), and at least as good as the exact optimum over those
    widths of a budget smaller by the rounding (one step of the byte axis per unit)."""
    rng = random.Random(seed)
    units = random_units(rng, 6)
    score = WEIGHTINGS[weighting]
    parameters = sum(u.parameters for u in units)
    least = sum(min(c.bytes for c in u.candidates) for u in units)
    most = sum(max(c.bytes for c in u.candidates) for u in units)
    for fraction in (0.0, 0.3, 0.7, 1.0):
        budget_bytes = least + fraction * (most - least) + 1
        bits = 8 * budget_bytes / parameters
        got = allocate(units, bits, weighting)
        floor = widest_floor(units, got.budget_bytes)
        assert got.min_bits == floor and all(u.chosen.grid.bits >= floor for u in units)
        assert got.used_bytes <= got.budget_bytes
        assert got.used_bytes == sum(u.chosen.bytes for u in units)
        got_score = sum(score(u, u.chosen) for u in units)
        step = max(1, -(-got.budget_bytes // KNAPSACK_STEPS))
        tight = got.budget_bytes - len(units) * step
        best = min(
            (
                sum(score(u, c) for u, c in zip(units, combo, strict=True))
                for combo in itertools.product(*(u.candidates for u in units))
                if sum(c.bytes for c in combo) <= tight and min(c.grid.bits for c in combo) >= floor
            ),
            default=None,
        )
        if best is not None:
            assert got_score <= best + 1e-12


def test_a_budget_below_the_smallest_choice_is_refused_before_measuring(tiny_models, tmp_path):
    calls = []
    with pytest.raises(QronosError, match="below the smallest choice"):
        quantize(
            tiny_models("nokv"),
            tmp_path,
            observer=lambda *a: calls.append(a),
            bits_per_weight=1.5,
            lm_head="skip",
        )
    assert not calls and not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize(
    "bad",
    [
        {"sensitivity": "r.json"},
        {"bits_per_weight": 3.0, "mix_grids": ("bits:9",)},
        {"bits_per_weight": 3.0, "mix_grids": ()},
        {"bits_per_weight": 0.5},
    ],
)
def test_bad_budget_options_are_clear_errors(bad):
    with pytest.raises(QronosError):
        Options(**bad)


def test_a_budget_refuses_sizes_it_cannot_count():
    with pytest.raises(QronosError, match="8-bit activations"):
        preflight(Options(bits_per_weight=5.0, format="qdq", act_bits=8, act_granularity="tensor"))


def test_lm_head_candidates_are_those_the_embedding_can_share():
    """576 columns: blocks of 64 and 32 tile them, blocks of 128 and per channel do not, nor
    do 2-bit codes; with no such candidate, the lm_head policy's grid."""
    head = Target("n", "lm_head", "MatMul", "x", "w", False, 576, 1000, "y", lm_head=True)
    layer = Target("m", "layer", "MatMul", "x", "v", False, 576, 576, "z", lm_head=False)
    scheme = Scheme.of(Options(bits_per_weight=4.0))
    grids = scheme.candidates_for(TargetGroup("x", (head,)))
    assert {(g.bits, g.group_size) for g in grids} == {(4, 64), (4, 32), (8, 64)}
    assert len(scheme.candidates_for(TargetGroup("x", (layer,)))) == 6
    two = Scheme.of(Options(bits_per_weight=4.0, mix_grids=("bits:2,group:32",)))
    assert two.candidates_for(TargetGroup("x", (head,))) == [LM_HEAD_GRIDS["int4"]]


def test_measured_errors_match_onnx_runtime(tiny_models):
    """The candidate on the scheme's own grid is solved exactly as the advancing solve: its
    error from the measured terms equals the error ONNX Runtime measures on the layer's
    outputs in both streams, and its round-to-nearest error the report's."""
    path = tiny_models("kv")
    model = load_model(path)
    options = Options(
        bits=4,
        group_size=16,
        symmetric=False,
        bits_per_weight=4.0,
        mix_grids=("bits:2,group:16,asym", "bits:4,group:16,asym", "bits:8,group:16,sym"),
        lm_head="skip",
    )
    scheme = Scheme.of(options)
    samples = random_samples(detect_signature(model))
    passes = [InsertActQuantPass(scheme), CalibrateSolvePass(scheme, samples, measure=True)]
    solved = next(r for r in run_passes(model, passes) if isinstance(r, SolveResult))
    results = {r.target.node: r for r in solved.results}
    own = 0
    for m in solved.measured:
        assert m.grid in scheme.candidates_for(m.group)
        for i, t in enumerate(m.group.targets):
            r = results[t.node]
            assert r.output_ref is not None and r.error is not None and r.error_rtn is not None
            error = (r.output_ref - 2 * m.cross[i] + m.quad[i]) / r.output_ref
            rtn = (r.output_ref - 2 * m.cross_rtn[i] + m.quad_rtn[i]) / r.output_ref
            assert rtn >= error - 1e-6  # the solver does not do worse than rounding
            if m.grid == scheme.grid_for(t):
                own += 1
                assert error == pytest.approx(r.error, rel=2e-3, abs=1e-6)
                assert rtn == pytest.approx(r.error_rtn, rel=1e-4)
    assert own == len(solved.results)
    by_bits: dict[int, list[float]] = {}
    for m in solved.measured:
        by_bits.setdefault(m.grid.bits, []).append(sum(m.quad) - 2 * sum(m.cross))
    assert np.mean(by_bits[8]) < np.mean(by_bits[4]) < np.mean(by_bits[2])


@pytest.mark.parametrize(
    "fmt,lm_head,variant,bits",
    [
        ("matmulnbits", "int4", "kv", 3.3),
        ("matmulnbits", "int4", "untied", 3.3),
        ("qdq", "skip", "kv", 6.0),  # 2-bit codes are int4 there
    ],
)
def test_a_budget_run_stores_what_it_planned(tiny_models, tmp_path, fmt, lm_head, variant, bits):
    """The planned bytes are the bytes written; the budget holds; each group shares one grid
    and every layer is solved on its group's choice; the lm_head takes only 4- and 8-bit
    grids (its codes are the embedding's when tied)."""
    report, output, *_ = quantize(
        tiny_models(variant), tmp_path, bits_per_weight=bits, lm_head=lm_head, format=fmt
    )
    budget = report.budget
    assert budget is not None and budget["used_bytes"] <= budget["budget_bytes"]
    written = {w.layer: w.bytes for w in stored_weights(ir.load(output))}
    planned = sum(c["bytes"] for u in budget["units"] for c in [u["candidates"][u["choice"]]])
    assert planned == budget["used_bytes"]
    embedding = {k: v for k, v in written.items() if k not in {t.name for t in report.targets}}
    if variant == "untied" and lm_head != "skip":  # its own blocks, outside the budget
        assert len(embedding) == 1
        planned += sum(embedding.values())
    assert sum(written.values()) == planned
    grids = {t.name: t.grid for t in report.targets}
    chosen = set()
    for u in budget["units"]:
        choice = u["candidates"][u["choice"]]["grid"]
        chosen.add(choice["bits"])
        assert all(grids[name] == choice for name in u["targets"])
        label = f"{'s' if choice['symmetric'] else 'a'}{choice['bits']} "
        assert u["why"].startswith(label) and " MB" in u["why"]
        if "lm_head" in u["targets"]:
            assert all(c["grid"]["bits"] >= 4 for c in u["candidates"])
    assert len(chosen) > 1  # a mix, at this budget


def test_measurements_are_reused_for_another_budget(tiny_models, tmp_path):
    path = tiny_models("nokv")
    first, *_ = quantize(path, tmp_path / "a", bits_per_weight=4.0, lm_head="skip")

    def reuse(folder, measured, bits=3.0, **options):
        report, *_ = quantize(
            path,
            tmp_path / folder,
            bits_per_weight=bits,
            lm_head="skip",
            sensitivity=str(tmp_path / measured / "q.report.json"),
            **options,
        )
        return report

    again = reuse("b", "a")
    assert first.budget is not None and again.budget is not None
    for u, v in zip(first.budget["units"], again.budget["units"], strict=True):
        assert u["candidates"] == v["candidates"]  # the same measurements
    assert again.budget["used_bytes"] <= again.budget["budget_bytes"] < first.budget["used_bytes"]
    with pytest.raises(QronosError, match="other layer groups or candidate grids"):
        reuse("c", "a", 5.0, mix_grids=("bits:2,group:16,asym", "bits:8,group:16,sym"))
    quantize(path, tmp_path / "d", lm_head="skip")  # no budget
    with pytest.raises(QronosError, match="holds no measured grids"):
        reuse("e", "d")


@pytest.mark.parametrize("bits,group,symmetric", [(2, 16, False), (4, 32, True), (8, None, True)])
@pytest.mark.parametrize("k", [64, 80])
def test_matmulnbits_sizes_are_the_tensors_it_writes(bits, group, symmetric, k):
    grid = Grid(bits, group, symmetric).for_features(k)
    rng = np.random.default_rng(0)
    n_groups = grid.n_groups(k)
    codes = rng.integers(0, 2**bits, (24, k)).astype(np.uint8)
    if symmetric:
        codes = (codes.astype(np.int16) - 2 ** (bits - 1)).astype(np.int8)
    zero = None if symmetric else rng.integers(0, 2**bits, (24, n_groups)).astype(np.uint8)
    scales = rng.random((24, n_groups)).astype(np.float32)
    t = to_matmulnbits(codes, scales, zero, bits, grid.group_size, symmetric, np.float32)
    written = t.B.nbytes + t.scales.nbytes + (0 if t.zero_points is None else t.zero_points.nbytes)
    assert get_format("matmulnbits").stored_bytes(grid, 24, k, 4) == written


def test_inspect_prints_the_stored_sizes(tiny_models, tmp_path, capsys):
    _, output, *_ = quantize(tiny_models("nokv"), tmp_path, bits_per_weight=4.0, lm_head="skip")
    assert main(["inspect", str(output)]) == 0
    out = capsys.readouterr().out
    total = sum(w.bytes for w in stored_weights(ir.load(output)))
    assert f"quantized weights: {total / 1e6:.2f} MB stored" in out
    assert "MatMulNBits 2-bit" in out or "MatMulNBits 8-bit" in out


def test_w3_help_says_it_is_stored_in_4_bits(capsys):
    with pytest.raises(SystemExit):
        main(["optimize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "4-bit container" in help_text and "--bits-per-weight" in help_text
    report = json.dumps(Options(bits_per_weight=3.0).non_defaults())
    assert "bits_per_weight" in report
