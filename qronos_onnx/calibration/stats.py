"""Running calibration statistics of one target group, accumulated in torch.

``H = X~ X~^T / n`` and ``G = X X~^T / n`` (docs/algorithm.md), with ``X`` the group input in the
float network and ``X~`` in the partially quantized network, both ``[d, n]``. Activations never
outlive a batch. Products accumulate in place in float32 on the statistics' device (only the
upper block triangle of the symmetric ``H``) and are folded into float64 sums every
``FLUSH_TOKENS`` tokens (float64 because the sums run over up to millions of tokens). Memory:
the two float64 sums and two float32 accumulators, ``24 d^2`` bytes, plus ``d^2`` while folding.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

#: A numpy array or a torch tensor (``token_rows`` returns what it is given).
Array = TypeVar("Array", np.ndarray, torch.Tensor)

FLUSH_TOKENS = 8192
_H_PANELS = 4
_FLUSH_PANELS = 8


def token_rows(a: Array, mask: Array | None) -> Array:
    """Activation ``[..., seq, d]`` as ``[tokens, d]`` rows, keeping only the tokens where
    ``mask`` (an attention mask ``[..., past + seq]``) is non-zero (numpy or torch, both
    alike).

    A mask longer than ``seq`` also covers a KV cache: its last ``seq`` columns are the tokens
    of ``a``. Without a mask, or with one that does not match ``a``, every row is kept.
    """
    rows = a.reshape(-1, a.shape[-1])
    if (
        mask is not None
        and a.ndim >= 2
        and mask.ndim == a.ndim - 1
        and mask.shape[:-1] == a.shape[:-2]
        and mask.shape[-1] > a.shape[-2]
    ):
        mask = mask[..., -a.shape[-2] :]
    if mask is not None and int(np.prod(mask.shape)) == rows.shape[0]:
        rows = rows[mask.reshape(-1) != 0]
    return rows


class GroupStats:
    """Sums of ``X~ X~^T`` and ``X X~^T`` over the calibration tokens of one group input."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        d = in_features
        self.in_features = d
        self.device = torch.device(device)
        self._H = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        self._H32 = torch.zeros(d, d, dtype=torch.float32, device=self.device)
        self._G: torch.Tensor | None = None  # made at the first mismatched batch
        self._G32: torch.Tensor | None = None
        self._pending = 0
        self._same: bool | None = None  # X is X~ for every batch (nothing quantized upstream)
        self.tokens = 0

    def add(
        self,
        x: np.ndarray | torch.Tensor,
        x_quant: np.ndarray | torch.Tensor,
        mask: np.ndarray | None = None,
    ) -> None:
        """Add one batch.

        Args:
            x: float-network activation ``[..., d]``.
            x_quant: quantized-network activation, same shape; passing the same array object
                says there is no mismatch (then ``G = H`` and no product is spent on it).
            mask: optional ``[...]`` (the leading dims of ``x``); only tokens where it is
                non-zero count (padding is left out).
        """
        same = x is x_quant
        if self._same is None:
            self._same = same
        elif self._same != same:
            raise ValueError("a group's batches must all be matched or all mismatched")
        xq = self._tokens(x_quant, mask)
        d = self.in_features
        width = -(-d // _H_PANELS)
        for i in range(0, d, width):  # upper block triangle of H
            self._H32[i : i + width, i:].addmm_(xq[:, i : i + width].T, xq[:, i:])
        if not same:
            if self._G32 is None:
                self._G = torch.zeros_like(self._H)
                self._G32 = torch.zeros_like(self._H32)
            self._G32.addmm_(self._tokens(x, mask).T, xq)
        self.tokens += xq.shape[0]
        self._pending += xq.shape[0]
        if self._pending >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        for total, part in ((self._H, self._H32), (self._G, self._G32)):
            if total is not None and part is not None:
                rows = -(-part.shape[0] // _FLUSH_PANELS)
                for i in range(0, part.shape[0], rows):  # a float64 temporary of 1/8 of part
                    total[i : i + rows] += part[i : i + rows].double()
                part.zero_()
        self._pending = 0

    def _tokens(self, a: np.ndarray | torch.Tensor, mask: np.ndarray | None) -> torch.Tensor:
        """Rows of ``a`` (host numpy, or a torch tensor on any device) as float32 on the
        statistics' device."""
        if a.shape[-1] != self.in_features:
            raise ValueError(f"activation has {a.shape[-1]} features, expected {self.in_features}")
        if isinstance(a, torch.Tensor):
            keep = None if mask is None else torch.from_numpy(np.asarray(mask)).to(a.device)
            return token_rows(a, keep).to(self.device, torch.float32).contiguous()
        rows = np.ascontiguousarray(token_rows(a, mask), dtype=np.float32)
        return torch.from_numpy(rows).to(self.device)

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, G)`` ``[d, d]``, normalised by the token count: ``H`` float64, ``G`` float32
        (it only enters products with the float32 working weight; the same tensor as ``H``
        when nothing upstream is quantized).

        The statistics are handed over: the sums become ``H`` and ``G`` in place (the widest
        temporary is a quarter of ``H``), so finalizing needs no memory beyond the sums'.
        """
        if self.tokens == 0:
            raise ValueError("no calibration tokens were added")
        self._flush()
        H, G = self._H, self._G
        # hand the sums over: this object keeps nothing of them (finalize ends its use)
        self._H = self._H32 = torch.empty(0)
        self._G = self._G32 = None
        _mirror_upper(H)
        H.div_(self.tokens)
        if G is None or self._same:
            return H, H
        G32 = G.div_(self.tokens).to(torch.float32)
        del G
        return H, G32


def _mirror_upper(H: torch.Tensor) -> None:
    """Copy the upper triangle of a square ``H`` onto its lower one, in place, a block of rows
    at a time (every entry on or above the diagonal lies in a computed block of ``add``)."""
    d = H.shape[0]
    width = -(-d // _H_PANELS)
    for i in range(0, d, width):
        j = min(i + width, d)
        block = H[i:j, i:j]
        block.copy_(torch.triu(block) + torch.triu(block, 1).T)
        H[j:, i:j] = H[i:j, j:].T
