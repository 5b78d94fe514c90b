"""SwiGLU feed-forward (Shazeer, 2020), Llama layout: w1 = gate, w3 = up, w2 = down."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai_ds.model.init import NormalLinear


class FeedForward(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases.

    `std` initialises w1 and w3; `out_std` (default: `std`) initialises w2, which writes into the
    residual stream and is usually scaled down with depth (see `init.residual_std`).
    """

    def __init__(self, dim: int, ffn_dim: int, std: float = 0.02, out_std: float | None = None):
        super().__init__()
        self.w1 = NormalLinear(dim, ffn_dim, std)
        self.w3 = NormalLinear(dim, ffn_dim, std)
        self.w2 = NormalLinear(ffn_dim, dim, std if out_std is None else out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # inner: (..., ffn_dim)
