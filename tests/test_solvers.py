"""Solvers against the brute-force float64 references, and the properties docs/algorithm.md
promises."""

import numpy as np
import pytest
import torch

from qronos_onnx.quant import Grid, SolverWarning, solve
from qronos_onnx.quant.gptq import gptq_sweep
from qronos_onnx.quant.grid import ColumnGrid, dequantize
from qronos_onnx.quant.linalg import inverse_factor, largest_eigenvalue
from tests import reference as ref

GRIDS = [
    Grid(bits=3, group_size=None),  # per channel, asymmetric
    Grid(bits=4, group_size=16, symmetric=True),  # grouped, symmetric
    Grid(bits=2, group_size=12),  # 48 = 4 groups of 12; 2-bit
]


def problem(seed, C=12, d=48, n=3000):
    W, X, Xq = ref.mismatched_problem(seed, C=C, d=d, n=n)
    H, G = ref.stats(X, Xq)
    return W, X, Xq, H, G


def entry_grid(q, d):
    return ref.EntryGrid(
        q.scales.numpy(),
        None if q.zero_points is None else q.zero_points.numpy(),
        q.grid.group_len(d),
        q.grid.qmin,
        q.grid.qmax,
    )


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_reference(grid, act_order):
    W, _, _, H, _ = problem(1)
    q = solve("gptq", t64(W), t64(H), grid=grid, act_order=act_order, solver_block=8)
    lam = 0.01 * np.mean(np.diag(H))
    assert q.info.damping == pytest.approx(lam)
    expected = ref.gptq(W, H, entry_grid(q, W.shape[1]), act_order, lam)
    np.testing.assert_array_equal(q.codes.numpy(), expected)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_qronos_matches_per_step_correction_and_diffusion(grid, act_order):
    W, _, _, H, G = problem(2)
    q = solve("qronos", t64(W), t64(H), t64(G), grid=grid, act_order=act_order, solver_block=8)
    expected = ref.qronos(W, H, G, entry_grid(q, W.shape[1]), act_order, q.info.damping)
    np.testing.assert_array_equal(q.codes.numpy(), expected)


@pytest.mark.parametrize("grid", GRIDS[:2], ids=str)
@pytest.mark.parametrize("damping", [1e-6, 1e-2])
def test_qronos_matches_reference_with_strong_damping(grid, damping):
    """The ridge pulls toward the original weights: checked where it actually matters."""
    W, _, _, H, G = problem(3)
    q = solve("qronos", t64(W), t64(H), t64(G), grid=grid, damping=damping, solver_block=8)
    expected = ref.qronos(W, H, G, entry_grid(q, W.shape[1]), True, q.info.damping)
    np.testing.assert_array_equal(q.codes.numpy(), expected)


@pytest.mark.parametrize("grid", GRIDS[:2], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_qronos_ls_variant_matches_reference(grid, act_order):
    W, _, _, H, G = problem(4)
    q = solve(
        "qronos",
        t64(W),
        t64(H),
        t64(G),
        grid=grid,
        act_order=act_order,
        variant="ls",
        damping=1e-3,
        solver_block=8,
    )
    expected = ref.qronos_ls(W, H, G, entry_grid(q, W.shape[1]), act_order, q.info.damping)
    np.testing.assert_array_equal(q.codes.numpy(), expected)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gpfq_matches_reference(grid, act_order):
    W, _, _, H, G = problem(5)
    q = solve("gpfq", t64(W), t64(H), t64(G), grid=grid, act_order=act_order, solver_block=8)
    expected = ref.gpfq(W, H, G, entry_grid(q, W.shape[1]), act_order)
    np.testing.assert_array_equal(q.codes.numpy(), expected)


def test_qronos_damping_is_alpha_times_largest_eigenvalue():
    W, _, _, H, G = problem(6)
    q = solve("qronos", t64(W), t64(H), t64(G), grid=GRIDS[0], damping=1e-3)
    assert q.info.damping == pytest.approx(1e-3 * np.linalg.eigvalsh(H)[-1], rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_largest_eigenvalue_leaves_its_input_unchanged(dtype):
    _, _, _, H, _ = problem(6)
    H = torch.as_tensor(H, dtype=dtype)
    before = H.clone()
    assert largest_eigenvalue(H) == pytest.approx(
        float(np.linalg.eigvalsh(H.double())[-1]), rel=1e-3
    )
    torch.testing.assert_close(H, before, rtol=0, atol=0)


def test_gptq_error_identity():
    """||(w - q) X~||^2 / n == sum_t e_t^2 per row, for the undamped factor."""
    W, _, Xq, H, _ = problem(7)
    grid = Grid(bits=3, group_size=16)
    w = t64(W)
    scales, zeros = grid.fit(w)
    cols = ColumnGrid.expand(grid, scales, zeros, torch.arange(W.shape[1]), torch.float64)
    U, lam, retries = inverse_factor(t64(H), 0.0)
    assert (lam, retries) == (0.0, 0)
    codes, loss = gptq_sweep(w.clone(), U, cols, solver_block=16)
    deq = dequantize(codes.T, cols.scale, cols.zero).T
    err = (w.numpy() - deq.numpy()) @ Xq
    np.testing.assert_allclose(loss.numpy(), (err**2).sum(1) / Xq.shape[1], rtol=1e-9)


def objective(q, W, X, Xq):
    """Relative mismatched error ||W X - Q X~||^2 / ||W X||^2."""
    r = W @ X - q.dequantize().double().numpy() @ Xq
    return float((r**2).sum() / ((W @ X) ** 2).sum())


@pytest.mark.parametrize(
    "grid", [Grid(bits=4, group_size=16), Grid(bits=3, group_size=None)], ids=str
)
def test_mismatched_problems_order_qronos_gptq_rtn(grid):
    errs = {a: [] for a in ("rtn", "gptq", "gpfq", "qronos")}
    for seed in range(5):
        W, X, Xq, H, G = problem(10 + seed, C=32, d=64, n=4000)
        for a in errs:
            errs[a].append(objective(solve(a, t64(W), t64(H), t64(G), grid=grid), W, X, Xq))
    mean = {a: float(np.mean(v)) for a, v in errs.items()}
    assert mean["qronos"] < 0.6 * mean["gptq"], mean
    assert mean["gptq"] < 0.92 * mean["rtn"], mean
    assert mean["qronos"] < mean["gpfq"], mean


def test_qronos_equals_gptq_without_mismatch():
    """With X~ = X (G = H) Qronos' first step is a GPTQ step: at equal damping, same result."""
    grid = Grid(bits=3, group_size=16)
    for seed in range(3):
        W, X, _, _, _ = problem(20 + seed, C=32, d=64)
        H = X @ X.T / X.shape[1]
        qr = solve("qronos", t64(W), t64(H), t64(H), grid=grid, damping=1e-4)
        gp = solve("gptq", t64(W), t64(H), grid=grid, damping=qr.info.damping / np.mean(np.diag(H)))
        assert gp.info.damping == pytest.approx(qr.info.damping)
        assert (qr.codes == gp.codes).float().mean() > 0.99
        assert objective(qr, W, X, X) == pytest.approx(objective(gp, W, X, X), rel=1e-3)


@pytest.mark.parametrize("algorithm", ["gptq", "gpfq", "qronos"])
def test_dead_columns_give_a_valid_result_and_a_warning(algorithm):
    W, X, Xq, _, _ = problem(30)
    Xq[[3, 17, 40]] = 0.0  # features the quantized stream never activates
    H, G = ref.stats(X, Xq)
    grid = Grid(bits=4, group_size=16)
    with pytest.warns(SolverWarning, match="never active"):
        q = solve(algorithm, t64(W), t64(H), t64(G), grid=grid)
    assert q.info.dead_columns == 3
    deq = q.dequantize().numpy()
    assert np.isfinite(deq).all()
    np.testing.assert_array_equal(deq[:, [3, 17, 40]], 0.0)
    rtn = solve("rtn", t64(W), grid=grid)
    assert objective(q, W, X, Xq) < objective(rtn, W, X, Xq)


@pytest.mark.parametrize("algorithm", ["gptq", "qronos"])
def test_indefinite_h_retries_with_more_damping(algorithm):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 16))
    v = rng.standard_normal(16)
    H = np.eye(16) - 1.5 * np.outer(v, v) / (v @ v)  # one eigenvalue -0.5
    with pytest.warns(SolverWarning, match="retrying"):
        q = solve(algorithm, t64(W), t64(H), t64(H), grid=Grid(bits=4, group_size=8))
    assert q.info.retries >= 1 and not q.info.fell_back_to_rtn
    assert np.isfinite(q.dequantize().numpy()).all()


def test_unfactorisable_h_falls_back_to_rtn_and_says_so():
    W = torch.randn(8, 16, dtype=torch.float64)
    H = torch.eye(16, dtype=torch.float64)
    H[0, 1] = H[1, 0] = 1e6  # eigenvalue -1e6: beyond any damping the retries reach
    grid = Grid(bits=4, group_size=8)
    with pytest.warns(SolverWarning, match="falling back to RTN"):
        q = solve("gptq", W, H, grid=grid)
    assert q.info.fell_back_to_rtn
    assert torch.equal(q.codes, solve("rtn", W, grid=grid).codes)


@pytest.mark.parametrize("algorithm", ["rtn", "gptq", "gpfq", "qronos"])
def test_deterministic(algorithm):
    W, _, _, H, G = problem(40)
    args = (torch.from_numpy(W).float(), t64(H), t64(G))
    a = solve(algorithm, *args, grid=Grid(bits=3, group_size=16))
    b = solve(algorithm, *args, grid=Grid(bits=3, group_size=16))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("algorithm", ["gptq", "gpfq", "qronos"])
def test_half_precision_weights_work_in_float32(algorithm):
    W, X, Xq, H, G = problem(41)
    grid = Grid(bits=4, group_size=16)
    q16 = solve(algorithm, t64(W).to(torch.float16), t64(H), t64(G), grid=grid)
    q64 = solve(algorithm, t64(W).to(torch.float16).double(), t64(H), t64(G), grid=grid)
    assert q16.dequantize().dtype == torch.float32
    assert objective(q16, W, X, Xq) == pytest.approx(objective(q64, W, X, Xq), rel=0.02)
    assert (q16.codes == q64.codes).float().mean() > 0.95


def test_short_last_group_solves():
    W, _X, _Xq, H, G = problem(42, d=40)
    q = solve("qronos", t64(W), t64(H), t64(G), grid=Grid(bits=4, group_size=16))
    assert q.scales.shape == (12, 3)
    expected = ref.qronos(W, H, G, entry_grid(q, 40), True, q.info.damping)
    np.testing.assert_array_equal(q.codes.numpy(), expected)


def test_ternary_codes():
    W, _, _, H, G = problem(43)
    q = solve("qronos", t64(W), t64(H), t64(G), grid=Grid.ternary(group_size=16))
    assert set(np.unique(q.codes.numpy())) <= {-1, 0, 1}


@pytest.mark.parametrize(
    "bad",
    [
        {"algorithm": "adaround"},
        {"algorithm": "qronos", "G": None},
        {"algorithm": "gptq", "H": None},
        {"algorithm": "gptq", "H": torch.eye(5)},
        {"algorithm": "gptq", "H": torch.full((16, 16), float("nan"))},
        {"algorithm": "qronos", "variant": "exact"},
        {"algorithm": "gptq", "damping": -1.0},
    ],
)
def test_bad_inputs_are_refused(bad):
    args = {"algorithm": "gptq", "H": torch.eye(16), "G": torch.eye(16)}
    args.update(bad)
    with pytest.raises(ValueError):
        solve(
            args.pop("algorithm"),
            torch.randn(4, 16),
            args.pop("H"),
            args.pop("G"),
            grid=Grid(bits=4, group_size=8),
            **args,
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("algorithm", ["gptq", "gpfq", "qronos"])
def test_cuda_matches_cpu(algorithm):
    W, _, _, H, G = problem(50, C=64, d=128)
    grid = Grid(bits=4, group_size=32)
    cpu = solve(algorithm, t64(W), t64(H), t64(G), grid=grid)
    gpu = solve(algorithm, t64(W).cuda(), t64(H).cuda(), t64(G).cuda(), grid=grid)
    assert gpu.codes.device.type == "cuda"
    assert (gpu.codes.cpu() == cpu.codes).float().mean() > 0.99


@pytest.mark.parametrize("algorithm", ["rtn", "gptq", "gpfq", "qronos"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("variant", ["step", "ls"])
def test_inputs_are_never_modified(algorithm, act_order, variant):
    W, _, _, H, G = problem(44)
    W[:, 5] = 0
    args = [t64(W), t64(H), t64(G)]
    before = [a.clone() for a in args]
    solve(
        algorithm,
        *args,
        grid=Grid(bits=4, group_size=16),
        act_order=act_order,
        variant=variant if algorithm == "qronos" else "step",
    )
    for a, b in zip(args, before, strict=False):
        assert torch.equal(a, b)


def test_a_solver_registered_from_a_test(monkeypatch):
    """A solver is one registration (a row of the table): ``solve`` runs its function with the
    table's facts (what it needs, its damping and what that is relative to), and the options
    accept its name."""
    from qronos_onnx.options import Options
    from qronos_onnx.registry import SOLVERS, Solver

    def nearest(problem, lam, settings):
        codes, _ = problem.cols.round(problem.weight.T, slice(None))  # column-major rows
        return codes.T, lam, 0

    row = Solver("nearest", "round in solve order", True, False, 0.5, "mean_diag", nearest)
    monkeypatch.setitem(SOLVERS, "nearest", row)
    W, _, _, H, _ = problem(3)
    W, H = t64(W), t64(H)
    grid = Grid(bits=3, group_size=16)
    q = solve("nearest", W, H, grid=grid)
    assert torch.equal(q.codes, solve("rtn", W, grid=grid).codes)
    assert q.info.damping == pytest.approx(0.5 * float(torch.diagonal(H).mean()))
    with pytest.raises(ValueError, match="nearest needs H"):
        solve("nearest", W, grid=grid)
    assert Options(algo="nearest").needs_data


@pytest.mark.parametrize("algorithm", ["qronos", "gptq"])
def test_owned_statistics_are_freed_before_the_sweep_and_change_no_code(monkeypatch, algorithm):
    """Handed over as owned ``SecondMoments`` (what the calibration does), ``H``, its reordered
    copy and the unordered ``G`` are freed by the time the column sweep runs (the widest solve
    holds the inverse factor, not the sums beside it), and the codes are those of a solve that
    leaves the caller's tensors alone; a dead column is fixed in place only when owned."""
    import weakref

    from qronos_onnx.quant import gptq as gptq_module
    from qronos_onnx.quant import qronos as qronos_module
    from qronos_onnx.quant.problem import SecondMoments

    W, X, Xq, _, _ = problem(7, d=48)
    Xq[5] = 0  # a dead input feature
    H = t64(Xq @ Xq.T / Xq.shape[1])
    G = torch.from_numpy((X @ Xq.T / Xq.shape[1]).astype(np.float32))
    grid = GRIDS[1]
    kept = H.clone()
    expected = solve(algorithm, t64(W).float(), H, G, grid=grid).codes
    assert torch.equal(H, kept)  # not owned: untouched

    module = qronos_module if algorithm == "qronos" else gptq_module
    refs = [weakref.ref(H), weakref.ref(G)]
    factor, sweep = module.inverse_factor, module.gptq_sweep
    alive_at_sweep = []

    def spy_factor(H_given, *args):
        refs.append(weakref.ref(H_given))  # the reordered copy
        return factor(H_given, *args)

    def spy_sweep(*args, **kwargs):
        alive_at_sweep.append([r() is not None for r in refs])
        return sweep(*args, **kwargs)

    monkeypatch.setattr(module, "inverse_factor", spy_factor)
    monkeypatch.setattr(module, "gptq_sweep", spy_sweep)
    moments = SecondMoments(H, G, owned=True)
    del H, G, kept
    codes = solve(algorithm, t64(W).float(), grid=grid, moments=moments).codes
    assert alive_at_sweep == [[False, False, False]]
    assert torch.equal(codes, expected)
