"""Running calibration statistics of one target group, accumulated in torch.

``H = X~ X~^T / n`` and ``G = X X~^T / n`` (ALGORITHM.md), with ``X`` the group input in the
float network and ``X~`` in the partially quantized network, both ``[d, n]``. Activations never
outlive a batch: each batch's products are computed in float32 on the statistics' device and
summed in float64.
"""

from __future__ import annotations

import numpy as np
import torch


class GroupStats:
    """Sums of ``X~ X~^T`` and ``X X~^T`` over the calibration tokens of one group input."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.device = torch.device(device)
        self._H = torch.zeros(in_features, in_features, dtype=torch.float64, device=self.device)
        self._G = torch.zeros_like(self._H)
        self.tokens = 0

    def add(self, x: np.ndarray, x_quant: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add one batch.

        Args:
            x: float-network activation ``[..., d]``.
            x_quant: quantized-network activation, same shape (may be the same array).
            mask: optional ``[...]`` (the leading dims of ``x``); only tokens where it is
                non-zero count (padding is left out).
        """
        xq = self._tokens(x_quant, mask)
        product = (xq.T @ xq).double()
        self._H += product
        if x is x_quant:                 # no mismatch yet (nothing quantized upstream): G == H
            self._G += product
        else:
            self._G += (self._tokens(x, mask).T @ xq).double()
        self.tokens += xq.shape[0]

    def _tokens(self, a: np.ndarray, mask: np.ndarray | None) -> torch.Tensor:
        if a.shape[-1] != self.in_features:
            raise ValueError(f"activation has {a.shape[-1]} features, expected {self.in_features}")
        rows = a.reshape(-1, self.in_features)
        if mask is not None and mask.size * self.in_features == a.size:
            rows = rows[mask.reshape(-1) != 0]
        return torch.from_numpy(np.ascontiguousarray(rows)).to(self.device, torch.float32)

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, G)``, float64 ``[d, d]``, normalised by the token count."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens were added")
        return self._H / self.tokens, self._G / self.tokens
