"""Brute-force float64 references, written straight from docs/algorithm.md in numpy.

No lazy batches, no Cholesky factors, no shared code with the package beyond the fitted grid
parameters: every step solves its own linear system. Slow (O(d^4)); for small problems only.
Weights are ``[C, d]``; ``H = X~ X~^T / n``; ``G = X X~^T / n``.
"""

from __future__ import annotations

import numpy as np


class EntryGrid:
    """Per-entry scale and zero point of a fitted grid, for entry (row, original column)."""

    def __init__(self, scales, zero_points, group_len: int, qmin: int, qmax: int):
        self.scales = np.asarray(scales, dtype=np.float64)
        self.zeros = (
            np.zeros_like(self.scales)
            if zero_points is None
            else np.asarray(zero_points, dtype=np.float64)
        )
        self.group_len, self.qmin, self.qmax = group_len, qmin, qmax

    def round(self, v: np.ndarray, col: int) -> tuple[np.ndarray, np.ndarray]:
        """Codes and values of column ``col`` (original index) for all rows."""
        s = self.scales[:, col // self.group_len]
        z = self.zeros[:, col // self.group_len]
        codes = np.clip(np.round(v / s) + z, self.qmin, self.qmax)
        return codes, (codes - z) * s


def minmax_params(w: np.ndarray, group_len: int, bits: int, symmetric: bool):
    """Min-max scales (and zero points) of every group, one group at a time.

    Symmetric: the weight of largest magnitude ``m`` (with its sign) maps to code ``-2^(b-1)``.
    """
    C, d = w.shape
    n = -(-d // group_len)
    scales = np.zeros((C, n))
    zeros = np.zeros((C, n))
    for r in range(C):
        for g in range(n):
            v = w[r, g * group_len : (g + 1) * group_len]
            lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
            if symmetric:
                scales[r, g] = v[np.argmax(np.abs(v))] / -(2 ** (bits - 1))
            else:
                scales[r, g] = (hi - lo) / (2**bits - 1)
                zeros[r, g] = (
                    np.clip(np.round(-lo / scales[r, g]), 0, 2**bits - 1) if scales[r, g] else 0
                )
    return scales, (None if symmetric else zeros)


def order_of(H: np.ndarray, act_order: bool) -> np.ndarray:
    d = H.shape[0]
    return np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(d)


def gptq(W, H, grid: EntryGrid, act_order: bool, lam: float) -> np.ndarray:
    """Optimal-brain-surgeon form of GPTQ: at each step invert the trailing block afresh."""
    order = order_of(H, act_order)
    Hd = H[np.ix_(order, order)] + lam * np.eye(len(order))
    w = W[:, order].astype(np.float64).copy()
    codes = np.zeros_like(w)
    for t in range(len(order)):
        inv = np.linalg.inv(Hd[t:, t:])
        codes[:, t], q = grid.round(w[:, t], order[t])
        w[:, t:] -= np.outer((w[:, t] - q) / inv[0, 0], inv[0, :])
    out = np.zeros_like(codes)
    out[:, order] = codes
    return out


def qronos(W, H, G, grid: EntryGrid, act_order: bool, lam: float) -> np.ndarray:
    """Qronos as the paper states it: at every step, error correction then error diffusion.

    Objective at step t (ridge on the not-yet-quantized weights, toward the original ``w``):
        || w X - q_{<t} X~_{<t} - r_{>=t} X~_{>=t} ||^2 / n  +  lam || r_{>=t} - w_{>=t} ||^2
    Correction: ``q_t = Quant`` of the minimiser over ``r_t`` alone (others held at their current
    values; undamped at t = 1, as in the paper's first step). Diffusion: ``r_{>t}`` re-fitted by
    solving the normal equations of that objective with ``r_{<=t} = q_{<=t}``.
    """
    order = order_of(H, act_order)
    d = len(order)
    H = H[np.ix_(order, order)]
    G = G[np.ix_(order, order)]
    w0 = W[:, order].astype(np.float64)
    wG = w0 @ G  # [C, d]: float-stream target against X~_t
    cur = w0.copy()
    codes = np.zeros_like(w0)
    q = np.zeros_like(w0)
    for t in range(d):
        ridge = 0.0 if t == 0 else lam
        others = q[:, :t] @ H[:t, t] + cur[:, t + 1 :] @ H[t + 1 :, t]
        p = (wG[:, t] + ridge * w0[:, t] - others) / (H[t, t] + ridge)
        codes[:, t], q[:, t] = grid.round(p, order[t])
        cur[:, t] = q[:, t]
        if t + 1 < d:
            A = H[t + 1 :, t + 1 :] + lam * np.eye(d - t - 1)
            rhs = wG[:, t + 1 :] + lam * w0[:, t + 1 :] - q[:, : t + 1] @ H[: t + 1, t + 1 :]
            cur[:, t + 1 :] = np.linalg.solve(A, rhs.T).T
    out = np.zeros_like(codes)
    out[:, order] = codes
    return out


def qronos_ls(W, H, G, grid: EntryGrid, act_order: bool, lam: float) -> np.ndarray:
    """Remark 5.2 variant: ridge LS projection of all columns, then plain GPTQ."""
    d = H.shape[0]
    projected = np.linalg.solve(H + lam * np.eye(d), (W @ (G + lam * np.eye(d))).T).T
    return gptq(projected, H, grid, act_order, lam)


def gpfq(W, H, G, grid: EntryGrid, act_order: bool) -> np.ndarray:
    """GPFQ straight from its formula, one column and one sum at a time."""
    order = order_of(H, act_order)
    H = H[np.ix_(order, order)]
    G = G[np.ix_(order, order)]
    w = W[:, order].astype(np.float64)
    codes = np.zeros_like(w)
    q = np.zeros_like(w)
    for t in range(len(order)):
        num = sum(w[:, j] * G[j, t] for j in range(t + 1))
        num = num - sum((q[:, j] * H[j, t] for j in range(t)), np.zeros(w.shape[0]))
        codes[:, t], q[:, t] = grid.round(num / H[t, t], order[t])
    out = np.zeros_like(codes)
    out[:, order] = codes
    return out


def mismatched_problem(seed: int, C: int = 24, d: int = 48, n: int = 4000, noise: float = 0.02):
    """A layer whose quantized-stream input is a structured distortion of the float one.

    ``X`` has correlated features with a few outlier channels; ``X~ = (I + E) X + white noise``
    with ``E`` a random low-rank distortion, the kind of drift earlier quantized layers cause.
    Returns ``W [C, d]``, ``X [d, n]``, ``X~ [d, n]`` (float64).
    """
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    X = mix @ rng.standard_normal((d, n))
    X[rng.choice(d, 3, replace=False)] *= 6.0
    E = noise * rng.standard_normal((d, 4)) @ rng.standard_normal((4, d)) / 2.0
    Xq = X + E @ X + 0.05 * rng.standard_normal((d, n))
    W = rng.standard_normal((C, d))
    return W, X, Xq


def stats(X: np.ndarray, Xq: np.ndarray):
    n = X.shape[1]
    return Xq @ Xq.T / n, X @ Xq.T / n


def mlas_int8_blocks(x, block):
    """MLAS ``QuantizeARow_CompInt8`` (x86) from its source, dequantized: rows of ``K`` in
    blocks of ``block`` padded with zeros, ``q = round_half_even(x * (127 / max|x|))``, the
    block's scale ``max|x| / 127``, float32 throughout."""
    k = x.shape[-1]
    padded = -(-k // block) * block
    rows = np.zeros((x.size // k, padded), np.float32)
    rows[:, :k] = x.reshape(-1, k)
    blocks = rows.reshape(len(rows), -1, block)
    peak = np.abs(blocks).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(peak > 0, np.float32(127) / peak, np.float32(0)).astype(np.float32)
    y = np.rint(blocks * inverse) * (peak / np.float32(127))
    return y.reshape(len(rows), padded)[:, :k].reshape(x.shape)
