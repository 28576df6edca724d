"""Orthogonal rotations for incoherence processing: random Hadamard matrices of any order that
is a product of known Hadamard orders, and a seeded random orthogonal matrix where none is.

Conventions: a rotation ``Q`` is ``[n, n]`` and orthogonal; it acts on row vectors, ``x -> x Q``
(an activation ``[..., n]``, an ONNX MatMul weight ``[in, out]`` on its rows). A Hadamard
rotation is ``Q = diag(s) (H_1 kron ... kron H_k) / sqrt(n)`` with ``+-1`` matrices ``H_i`` of
known orders and random signs ``s`` (or no signs); it is applied through its Kronecker factors,
``O(n * sum(n_i))`` per row instead of ``O(n^2)``.

Known orders: powers of two (Sylvester), ``p + 1`` for a prime ``p = 3 mod 4`` (Paley I) and
``2 (p + 1)`` for a prime ``p = 1 mod 4`` (Paley II), and products of these: 576 = 12 x 48,
640 = 20 x 32, 1536 = 12 x 128, 2048 = 2^11, 5632 = 44 x 128.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rotation:
    """An orthogonal ``[n, n]`` matrix ``Q``.

    Attributes:
        n: the order.
        factors: the ``+-1`` Hadamard factors (float64, orders multiplying to ``n``), or empty
            for a dense random orthogonal matrix.
        signs: ``[n]`` float64 ``+-1`` applied before the factors, or ``None``.
        dense_q: the matrix itself when it has no Hadamard factors (``[n, n]`` float64).
        seed: the seed of the signs or of the random matrix (``None``: deterministic).
    """

    n: int
    factors: tuple[Tensor, ...]
    signs: Tensor | None
    dense_q: Tensor | None
    seed: int | None

    @property
    def kind(self) -> str:
        """``"hadamard"`` or ``"random orthogonal"``."""
        return "hadamard" if self.factors else "random orthogonal"

    def describe(self) -> str:
        """One line: ``"hadamard 12 x 48, random signs (seed 0)"``."""
        if not self.factors:
            return f"random orthogonal {self.n} x {self.n} (seed {self.seed})"
        orders = " x ".join(str(f.shape[0]) for f in self.factors)
        signs = f", random signs (seed {self.seed})" if self.signs is not None else ""
        return f"hadamard {orders}{signs}"

    def apply(self, x: Tensor) -> Tensor:
        """``x Q`` over the last dimension (``x``: ``[..., n]``), in ``x``'s dtype."""
        self._check(x)
        if self.dense_q is not None:
            return x @ self.dense_q.to(x)
        if self.signs is not None:
            x = x * self.signs.to(x)
        return _kron_apply(x, self.factors, transpose=False) / math.sqrt(self.n)

    def apply_inverse(self, x: Tensor) -> Tensor:
        """``x Q^T`` over the last dimension."""
        self._check(x)
        if self.dense_q is not None:
            return x @ self.dense_q.T.to(x)
        y = _kron_apply(x, self.factors, transpose=True) / math.sqrt(self.n)
        return y * self.signs.to(y) if self.signs is not None else y

    def dense(self) -> Tensor:
        """``Q`` as a dense float64 ``[n, n]`` matrix."""
        return self.apply(torch.eye(self.n, dtype=torch.float64))

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.n:
            raise ValueError(f"a rotation of order {self.n} cannot act on shape {tuple(x.shape)}")


def random_hadamard(n: int, seed: int | None = 0) -> Rotation:
    """A Hadamard rotation of order ``n`` with random signs drawn from ``seed`` (``None``: no
    signs, a deterministic matrix); a seeded random orthogonal matrix when no product of
    known orders gives ``n`` (``Rotation.kind`` tells which). The ``hadamard`` rotation kind
    (``registry.ROTATIONS``)."""
    if n < 1:
        raise ValueError(f"a rotation needs a positive order, got {n}")
    orders = hadamard_orders(n)
    if orders is None:
        return Rotation(n, (), None, random_orthogonal(n, seed or 0), seed or 0)
    factors = tuple(hadamard_matrix(k) for k in orders)
    s = None
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        s = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return Rotation(n, factors, s, None, seed)


def random_orthogonal(n: int, seed: int = 0) -> Tensor:
    """A seeded random orthogonal ``[n, n]`` float64 matrix (Haar: QR of a Gaussian matrix
    with the signs of ``R``'s diagonal moved into ``Q``)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q)


def hadamard_orders(n: int, max_factors: int = 2) -> tuple[int, ...] | None:
    """Known Hadamard orders whose product is ``n``, at most ``max_factors`` of them, chosen
    to make the Kronecker application cheap (the smallest sum of orders); ``None`` when
    ``n`` has no such factorisation. ``n = 1`` gives ``(1,)``."""
    best: tuple[int, ...] | None = None
    for split in _factorisations(n, max_factors):
        if best is None or (sum(split), len(split)) < (sum(best), len(best)):
            best = split
    return best


def _factorisations(n: int, depth: int) -> list[tuple[int, ...]]:
    """Every way of writing ``n`` as a non-increasing product of at most ``depth`` known
    orders (each order itself may be a product, built by ``hadamard_matrix``)."""
    found: list[tuple[int, ...]] = [(n,)] if is_known_order(n) else []
    if depth > 1:
        for a in range(2, math.isqrt(n) + 1):
            if n % a == 0 and is_known_order(n // a):
                found += [(n // a, *rest) for rest in _factorisations(a, depth - 1)]
    return found


@functools.cache
def is_known_order(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` can build an order-``n`` Hadamard matrix."""
    return _construction(n) is not None


@functools.cache
def hadamard_matrix(n: int) -> Tensor:
    """A ``+-1`` Hadamard matrix of order ``n`` (``H H^T = n I``), float64.

    Raises:
        ValueError: no construction is known here for ``n``.
    """
    how = _construction(n)
    if how is None:
        raise ValueError(f"no Hadamard matrix of order {n} is known here")
    kind, arg = how
    if kind == "one":
        return torch.ones(1, 1, dtype=torch.float64)
    if kind == "paley1":
        return _paley_1(arg)
    if kind == "paley2":
        return _paley_2(arg)
    half = hadamard_matrix(arg)  # Sylvester doubling of a known order
    return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)


@functools.cache
def _construction(n: int) -> tuple[str, int] | None:
    """How to build order ``n``: ``("one", 1)``, Paley I/II on a prime, or doubling of
    ``n / 2``; ``None`` if none applies."""
    if n == 1:
        return ("one", 1)
    if n == 2:
        return ("double", 1)
    if n % 4:
        return None
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return ("paley1", n - 1)
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return ("paley2", n // 2 - 1)
    if _construction(n // 2) is not None:
        return ("double", n // 2)
    return None


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % k for k in range(2, math.isqrt(p) + 1))


def _jacobsthal(p: int) -> Tensor:
    """``Q[i, j] = chi(j - i)``, the quadratic character mod the prime ``p``."""
    squares = {(k * k) % p for k in range(1, p)}
    chi = torch.tensor([0.0] + [1.0 if k in squares else -1.0 for k in range(1, p)])
    idx = (torch.arange(p)[None, :] - torch.arange(p)[:, None]) % p
    return chi[idx].to(torch.float64)


def _paley_1(p: int) -> Tensor:
    """Order ``p + 1`` for a prime ``p = 3 mod 4``: ``I + S`` with the skew conference matrix
    ``S = [[0, 1^T], [-1, Q]]``."""
    q = _jacobsthal(p)
    s = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, q
    return torch.eye(p + 1, dtype=torch.float64) + s


def _paley_2(p: int) -> Tensor:
    """Order ``2 (p + 1)`` for a prime ``p = 1 mod 4``: the symmetric conference matrix
    ``C = [[0, 1^T], [1, Q]]`` expanded by ``C kron [[1, -1], [-1, -1]] + I kron [[1, 1],
    [1, -1]]``."""
    q = _jacobsthal(p)
    c = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, q
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(p + 1, dtype=torch.float64), b)


def _kron_apply(x: Tensor, factors: tuple[Tensor, ...], transpose: bool) -> Tensor:
    """``x (F_1 kron ... kron F_k)`` (or with each ``F_i^T``) over the last dimension, one
    factor at a time: the last dimension is viewed as ``[n_1, ..., n_k]`` (row-major, the
    Kronecker product's index order) and factor ``i`` contracts axis ``i``."""
    shape = x.shape
    orders = [f.shape[0] for f in factors]
    y = x.reshape(-1, *orders)
    for i, f in enumerate(factors):
        f = f.to(x)
        moved = torch.movedim(y, i + 1, -1).contiguous()  # one large GEMM per factor
        moved = (moved.reshape(-1, orders[i]) @ (f.T if transpose else f)).reshape(moved.shape)
        y = torch.movedim(moved, -1, i + 1)
    return y.reshape(shape)
