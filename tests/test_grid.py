"""Grids: code ranges, fitted parameters against a per-group loop, dequantization."""

import numpy as np
import pytest
import torch

from qronos_onnx.quant import Grid, solve
from tests import reference as ref


@pytest.mark.parametrize(
    "bits,symmetric,narrow,lo,hi",
    [
        (4, False, False, 0, 15),
        (4, True, False, -8, 7),
        (3, True, False, -4, 3),
        (8, False, False, 0, 255),
        (8, True, False, -128, 127),
        (2, True, True, -1, 1),
    ],
)
def test_code_range(bits, symmetric, narrow, lo, hi):
    g = Grid(bits=bits, symmetric=symmetric, narrow_range=narrow)
    assert (g.qmin, g.qmax) == (lo, hi)


def test_ternary_is_two_bit_narrow_symmetric():
    g = Grid.ternary(group_size=32)
    assert (g.bits, g.symmetric, g.narrow_range, g.qmin, g.qmax) == (2, True, True, -1, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 1},
        {"bits": 9},
        {"bits": 4.0},
        {"group_size": 0},
        {"narrow_range": True, "symmetric": False},
        {"scale_search": "l1"},
    ],
)
def test_invalid_grids_are_refused(kwargs):
    with pytest.raises(ValueError):
        Grid(**kwargs)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size,d", [(16, 64), (16, 50), (None, 37), (128, 576)])
def test_minmax_fit_matches_per_group_loop(symmetric, group_size, d):
    w = torch.randn(6, d, dtype=torch.float64)
    grid = Grid(bits=4, group_size=group_size, symmetric=symmetric)
    scales, zeros = grid.fit(w)
    exp_s, exp_z = ref.minmax_params(w.numpy(), group_size or d, 4, symmetric)
    assert scales.shape == (6, -(-d // (group_size or d))) and scales.dtype == torch.float32
    np.testing.assert_allclose(scales.numpy(), exp_s, rtol=1e-6)
    if symmetric:
        assert zeros is None
    else:
        assert zeros.dtype == torch.uint8
        np.testing.assert_array_equal(zeros.numpy(), exp_z)


def test_short_last_group_is_fitted_on_its_own_columns():
    w = torch.zeros(2, 34)
    w[:, :32] = 1.0
    w[:, 32:] = 100.0  # the short group (2 columns) has its own, much larger range
    scales, _ = Grid(bits=4, group_size=16, symmetric=True).fit(w)
    assert scales.shape == (2, 3)
    np.testing.assert_allclose(scales[:, 2].numpy(), 100.0 / -8)  # the extreme sits on code -8
    np.testing.assert_allclose(scales[:, :2].numpy(), 1.0 / -8)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_search_picks_best_shrink_per_group(symmetric):
    """Brute force over the same shrink factors, one group at a time."""
    torch.manual_seed(1)
    w = torch.randn(3, 40) * torch.rand(3, 40) ** 3  # heavy tails: shrinking pays
    grid = Grid(bits=3, group_size=16, symmetric=symmetric, scale_search="mse")
    scales, zeros = grid.fit(w)
    wn = w.double().numpy()
    for r in range(3):
        for g in range(3):
            v = wn[r, g * 16 : (g + 1) * 16]
            best = None
            for i in range(80):
                p = 1 - 0.01 * i
                lo, hi = min(v.min(), 0) * p, max(v.max(), 0) * p
                if symmetric:
                    s, z = v[np.argmax(np.abs(v))] * p / grid.qmin, 0.0
                else:
                    s = (hi - lo) / grid.qmax
                    z = np.clip(np.round(-lo / s), 0, grid.qmax)
                c = np.clip(np.round(v / s) + z, grid.qmin, grid.qmax)
                err = np.sum(np.abs((c - z) * s - v) ** 2.4)
                if best is None or err < best[0] - 1e-12:
                    best = (err, s, z)
            np.testing.assert_allclose(scales[r, g].item(), best[1], rtol=1e-5)
            if not symmetric:
                assert zeros[r, g].item() == best[2]


def test_mse_never_worse_than_minmax_on_weight_error():
    w = torch.randn(16, 128) ** 3
    errs = []
    for search in ("minmax", "mse"):
        q = solve("rtn", w, grid=Grid(bits=3, group_size=32, scale_search=search))
        errs.append(float(((q.dequantize() - w) ** 2).sum()))
    assert errs[1] < errs[0]


def test_symmetric_grid_uses_every_code_and_keeps_the_extreme_exact():
    w = torch.tensor([[0.1, -0.3, 0.8, 0.2], [-0.9, 0.5, 0.1, 0.0]])
    q = solve("rtn", w, grid=Grid(bits=4, group_size=None, symmetric=True))
    assert q.codes[0, 2] == -8 and q.codes[1, 0] == -8  # both extremes on -8
    np.testing.assert_allclose(q.dequantize()[[0, 1], [2, 0]].numpy(), [0.8, -0.9], rtol=1e-6)
    assert float(q.scales[0, 0]) < 0 < float(q.scales[1, 0])


@pytest.mark.parametrize(
    "grid",
    [
        Grid(bits=4, group_size=16),
        Grid(bits=3, symmetric=True),
        Grid(bits=8, group_size=32, symmetric=True),
        Grid.ternary(group_size=8),
    ],
)
def test_rtn_and_dequantize_match_numpy(grid):
    w = torch.randn(5, 40)
    q = solve("rtn", w, grid=grid)
    eg = ref.EntryGrid(
        q.scales.numpy(),
        None if q.zero_points is None else q.zero_points.numpy(),
        grid.group_len(40),
        grid.qmin,
        grid.qmax,
    )
    for c in range(40):
        codes, _ = eg.round(w[:, c].double().numpy(), c)
        np.testing.assert_array_equal(q.codes[:, c].numpy(), codes)
    # dequantize is exactly (codes - zero) * scale in float32
    s = q.scales.numpy()[:, np.arange(40) // grid.group_len(40)]
    z = (
        0
        if q.zero_points is None
        else q.zero_points.numpy()[:, np.arange(40) // grid.group_len(40)].astype(np.float32)
    )
    expected = (q.codes.numpy().astype(np.float32) - z) * s
    np.testing.assert_array_equal(q.dequantize().numpy(), expected)
    assert q.codes.dtype == grid.code_dtype
    assert int(q.codes.min()) >= grid.qmin and int(q.codes.max()) <= grid.qmax


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_group_stays_zero_with_a_nonzero_scale(symmetric):
    w = torch.randn(2, 32)
    w[0, :16] = 0
    q = solve("rtn", w, grid=Grid(bits=4, group_size=16, symmetric=symmetric))
    assert bool((q.scales != 0).all())
    assert bool((q.dequantize()[0, :16] == 0).all())


@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_by_blocks_of_rows_equals_numpy(monkeypatch, symmetric):
    """``QuantizedWeight.dequantize`` works a block of rows at a time (a 131,072-row lm_head
    would otherwise expand to several float copies): the result is numpy's
    ``(codes - zero) * scale`` per group, exactly, whatever the block size."""
    from qronos_onnx.quant import weight as weight_module
    from qronos_onnx.quant.weight import QuantizedWeight, SolveInfo

    grid = Grid(bits=4, group_size=16, symmetric=symmetric)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (50, 64)).astype(np.uint8)
    scales = rng.random((50, 4)).astype(np.float32) + 0.1
    zeros = None if symmetric else rng.integers(0, 16, (50, 4)).astype(np.float32)
    z = np.repeat(zeros, 16, axis=1) if zeros is not None else np.zeros((50, 64), np.float32)
    expected = (codes.astype(np.float32) - z) * np.repeat(scales, 16, axis=1)
    q = QuantizedWeight(
        torch.from_numpy(codes),
        torch.from_numpy(scales),
        None if zeros is None else torch.from_numpy(zeros),
        grid,
        SolveInfo("rtn"),
    )
    monkeypatch.setattr(weight_module, "_DEQUANTIZE_BLOCK_BYTES", 4 * 64 * 7)  # 7 rows
    np.testing.assert_array_equal(q.dequantize().numpy(), expected)
