"""Causal grouped-query self-attention (Ainslie et al., 2023) with optional QK-norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai_ds.config.model import ModelConfig
from astrai_ds.model.init import NormalLinear, residual_std
from astrai_ds.model.norm import RMSNorm
from astrai_ds.model.rope import apply_rotary


class Attention(nn.Module):
    """Multi-head attention where each group of n_heads / n_kv_heads query heads shares one key/value head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.wq = NormalLinear(cfg.dim, cfg.n_heads * cfg.head_dim, cfg.init_std)
        self.wk = NormalLinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.init_std)
        self.wv = NormalLinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.init_std)
        self.wo = NormalLinear(cfg.n_heads * cfg.head_dim, cfg.dim, residual_std(cfg))
        # QK-norm (as in Qwen3 / OLMo 2) bounds the attention logits, which keeps bf16 training stable.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim); cos/sin: float32 (B or 1, T, head_dim) from RotaryEmbedding.

        attn_mask: None for plain causal attention, or a bool mask broadcastable to (B, 1, T, T) with
        True = may attend (it must already contain the causal part, e.g. block-diagonal causal for packed
        sequences). Returns (B, T, dim).
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        q, k = apply_rotary(q, k, cos, sin)

        # Expand k/v to one head per query head: kv head j serves query heads j*rep .. j*rep + rep - 1.
        # SDPA's enable_gqa=True gives the same result, but on CUDA it rules out the memory-efficient
        # kernel, so a masked (packed SFT) batch would fall back to the slow math path.
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)  # (B, n_heads, T, head_dim)
            v = v.repeat_interleave(rep, dim=1)  # (B, n_heads, T, head_dim)

        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads * head_dim)
        return self.wo(y)  # (B, T, dim)
