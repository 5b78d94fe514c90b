"""Rotary position embeddings (Su et al., 2021) in the Hugging Face Llama "rotate_half" convention.

A head's vector is split in two halves (x1, x2) and pair i is (x1[i], x2[i]), not the interleaved pairs
(x[2i], x[2i+1]) of Meta's complex-number code. Training in HF's convention means the exported wq/wk need
no row permutation: conversion to HF Llama is a flat rename.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Looks up the cos/sin tables for given positions.

    The tables are deliberately not buffers: DeepSpeed casts the whole module with `module.bfloat16()`,
    which casts float buffers too, and bf16 angles are wrong by whole radians at large positions. They are
    built lazily in float32 and cached in a plain dict keyed by device, so they never enter the
    state_dict and no dtype cast reaches them.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, scaling=None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.scaling = scaling  # None, or a config.model.RopeScaling (Llama 3's)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        # float64 on the CPU, then float32: the angle pos * inv_freq is exact to float32 precision even
        # at large positions, and every device gets the same table.
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        if self.scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        pos = torch.arange(self.max_seq_len, dtype=torch.float64)
        freqs = torch.outer(pos, inv_freq)  # (max_seq_len, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, head_dim): both halves share an angle
        return emb.cos().float(), emb.sin().float()

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Full float32 (max_seq_len, head_dim) cos and sin tables on `device`."""
        device = torch.device(device)
        if device not in self._tables:
            cos, sin = self._build()
            self._tables[device] = (cos.to(device), sin.to(device))
        return self._tables[device]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, T) or (T,) int -> (cos, sin), each float32 (B or 1, T, head_dim)."""
        if position_ids.numel():
            # Checked on the device, without a host synchronisation in the forward (a CPU raises at once).
            torch._assert_async((position_ids.min() >= 0) & (position_ids.max() < self.max_seq_len),
                                f"position ids must lie in [0, max_seq_len={self.max_seq_len}); crop the sequence "
                                f"or raise model.max_seq_len")
        cos, sin = self.tables(position_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)  # (1, T)
        return cos[position_ids], sin[position_ids]  # (B or 1, T, head_dim)


def llama3_inv_freq(inv_freq: torch.Tensor, s) -> torch.Tensor:
    """Llama 3's frequency scaling (`s`: a RopeScaling): low frequencies (wavelengths above
    original_max_position_embeddings / low_freq_factor) divided by `factor`, high ones (below .../ high_freq_factor)
    kept, and a linear blend between, by wavelength, as Meta's reference code and transformers compute it."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor
                                                                                 - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return torch.where(wavelen > low_wavelen, inv_freq / s.factor,
                       torch.where(wavelen < high_wavelen, inv_freq, blended))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys.

    q: (B, n_heads, T, head_dim), k: (B, n_kv_heads, T, head_dim), cos/sin: (B or 1, T, head_dim).
    The rotation runs in float32 and the results come back in q's and k's dtypes.
    """
    cos = cos.unsqueeze(1)  # (B or 1, 1, T, head_dim): broadcast over heads
    sin = sin.unsqueeze(1)
    q32, k32 = q.float(), k.float()
    q_out = q32 * cos + rotate_half(q32) * sin
    k_out = k32 * cos + rotate_half(k32) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)
