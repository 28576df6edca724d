"""GroupStats against numpy float64 on the same activations."""

import numpy as np
import pytest
import torch

from qronos_onnx.calibration import stats as stats_mod
from qronos_onnx.calibration.stats import GroupStats, token_rows


@pytest.mark.parametrize("d", [7, 64, 130])
def test_h_and_g_equal_float64_reference_with_padding_and_flushes(monkeypatch, d):
    monkeypatch.setattr(stats_mod, "FLUSH_TOKENS", 50)  # force several flushes
    rng = np.random.default_rng(d)
    s = GroupStats(d)
    xs, xqs = [], []
    for _ in range(4):
        x = rng.standard_normal((1, 40, d)).astype(np.float32)
        xq = (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        mask = np.ones((1, 40), np.int64)
        mask[0, 30:] = 0  # padding is left out
        s.add(x, xq, mask)
        xs.append(x[0, :30])
        xqs.append(xq[0, :30])
    H, G = s.finalize()
    X, Xq = np.concatenate(xs).astype(np.float64), np.concatenate(xqs).astype(np.float64)
    assert s.tokens == 120
    np.testing.assert_allclose(H.numpy(), Xq.T @ Xq / 120, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(G.numpy(), X.T @ Xq / 120, rtol=1e-5, atol=1e-6)
    assert np.array_equal(H.numpy(), H.numpy().T)


def test_same_activations_give_g_equal_h():
    x = np.random.default_rng(0).standard_normal((2, 16, 8)).astype(np.float32)
    s = GroupStats(8)
    s.add(x, x)
    H, G = s.finalize()
    assert np.array_equal(H.numpy(), G.numpy())
    with pytest.raises(ValueError):
        s2 = GroupStats(8)
        s2.add(x, x)
        s2.add(x, x.copy())


def test_token_rows_reads_the_new_tokens_of_a_mask_over_a_kv_cache():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # batch 2, 3 new tokens
    mask = np.array([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])  # 2 cached + 3 new
    expected = np.concatenate([a[0, [0, 2]], a[1]])
    np.testing.assert_array_equal(token_rows(a, mask), expected)
    np.testing.assert_array_equal(token_rows(a, mask[:, 2:]), expected)  # no cache
    np.testing.assert_array_equal(token_rows(a, None), a.reshape(-1, 4))


def test_torch_activations_with_padding_give_the_numpy_statistics():
    """Group inputs handed over as torch tensors (a bound stage run) count the same tokens
    and give the same sums as host arrays, padding left out alike."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    xq = x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
    host, device = GroupStats(8), GroupStats(8)
    host.add(x, xq, mask)
    device.add(torch.from_numpy(x), torch.from_numpy(xq), mask)
    assert host.tokens == device.tokens == 8
    for a, b in zip(host.finalize(), device.finalize(), strict=True):
        assert torch.equal(a, b)
