"""Integer codes -> ONNX Runtime's ``com.microsoft.MatMulNBits`` tensors, and back (numpy only).

MatMulNBits computes ``Y = A @ dequant(B)^T`` with, for output ``n`` and input ``k``,
``dequant(B)[n, k] = (code[n, k] - zero_point[n, k // block]) * scale[n, k // block]``:

- ``B``: uint8 ``[N, k_blocks, block * bits / 8]``, codes packed low bits first along K;
  K is padded to ``k_blocks * block`` (the padding multiplies nothing: A has only K columns);
- ``scales``: ``[N * k_blocks]`` in the activation dtype;
- ``zero_points``: uint8 ``[N * ceil(k_blocks * bits / 8)]``, packed the same way per row;
  absent for symmetric grids, whose codes are stored offset by ``2^(bits-1)`` (the default
  zero point).

ONNX Runtime's CPU kernel takes 2, 4 and 8 bits (3, 5 and 6 are refused, measured with
onnxruntime 1.32), so other widths are stored in the next container: 3 -> 4, 5..7 -> 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTAINERS = (2, 4, 8)
MIN_BLOCK = 16


def container_bits(bits: int) -> int:
    """The MatMulNBits width that stores ``bits``-bit codes exactly."""
    for c in CONTAINERS:
        if bits <= c:
            return c
    raise ValueError(f"no MatMulNBits container for {bits} bits")


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``codes`` (< 2^bits) along the last axis, low bits first.

    The last axis is padded with zeros to a whole number of bytes.
    """
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    c = np.pad(codes.astype(np.uint8), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    c = c.reshape(*codes.shape[:-1], -1, per)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= (c[..., i] << (bits * i)).astype(np.uint8)
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``count`` codes along the last axis."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)[..., :count]


def block_size_for(group_size: int | None, in_features: int) -> int:
    """MatMulNBits ``block_size`` of a grid: the group size (a power of two >= 16), or for
    per-channel grids the smallest such power covering ``in_features``."""
    if group_size is None:
        return max(MIN_BLOCK, 1 << (in_features - 1).bit_length())
    if group_size < MIN_BLOCK or group_size & (group_size - 1):
        raise ValueError(
            f"MatMulNBits needs a power-of-two group size >= {MIN_BLOCK}, got {group_size}"
        )
    return group_size


@dataclass
class NBitsTensors:
    """The constant inputs and attributes of one MatMulNBits node."""

    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    K: int
    N: int
    bits: int
    block_size: int


def to_matmulnbits(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: np.dtype,
) -> NBitsTensors:
    """MatMulNBits tensors holding exactly ``codes``.

    Args:
        codes: ``[N, K]`` int8 (symmetric) or uint8 (asymmetric) on a ``bits``-bit grid.
        scales: ``[N, n_groups]``; ``zero_points``: ``[N, n_groups]`` uint8 or ``None``.
        group_size: the grid's group size, ``None`` for per channel (one group per row).
    """
    N, K = codes.shape
    store = container_bits(bits)
    block = block_size_for(group_size, K)
    k_blocks = -(-K // block)
    if symmetric:
        stored = codes.astype(np.int16) + (1 << (store - 1))
        pad_value = 1 << (store - 1)  # code 0
    else:
        stored = codes.astype(np.int16)
        pad_value = 0
    full = np.full((N, k_blocks * block), pad_value, dtype=np.uint8)
    full[:, :K] = stored.astype(np.uint8)
    B = pack_bits(full.reshape(N, k_blocks, block), store)
    if scales.shape[1] != k_blocks:  # groups and blocks must coincide
        raise ValueError(f"{scales.shape[1]} groups per row cannot fill {k_blocks} blocks")
    zp = None if zero_points is None else pack_bits(zero_points, store).reshape(-1)
    return NBitsTensors(B, scales.astype(scale_dtype).reshape(-1), zp, K, N, store, block)


def from_matmulnbits(
    t: NBitsTensors, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The codes ``[N, K]``, scales ``[N, k_blocks]`` and zero points stored in ``t``."""
    k_blocks = t.B.shape[1]
    stored = unpack_bits(t.B, t.bits, t.block_size).reshape(t.N, -1)[:, : t.K].astype(np.int16)
    scales = t.scales.reshape(t.N, k_blocks)
    if symmetric:
        return (stored - (1 << (t.bits - 1))).astype(np.int8), scales, None
    assert t.zero_points is not None  # asymmetric codes are stored with their zero points
    zp = unpack_bits(t.zero_points.reshape(t.N, -1), t.bits, k_blocks)
    return stored.astype(np.uint8), scales, zp.astype(np.uint8)
