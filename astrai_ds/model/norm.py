"""RMSNorm (Zhang & Sennrich, 2019), the Llama variant: no mean subtraction, no bias."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension.

    The statistics are computed in float32 whatever the input dtype: in bf16 the mean of squares loses
    enough precision to move the loss. The result is cast back so the next matmul runs in the model's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim), same dtype as x."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)
