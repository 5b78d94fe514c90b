"""Causal grouped-query self-attention (Ainslie et al., 2023) with optional QK-norm and q/k/v biases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai_ds.config.model import ModelConfig
from astrai_ds.model.init import NormalLinear, residual_std
from astrai_ds.model.kv_cache import CacheBatch
from astrai_ds.model.norm import RMSNorm
from astrai_ds.model.rope import apply_rotary


class Attention(nn.Module):
    """Multi-head attention where each group of n_heads / n_kv_heads query heads shares one key/value head."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # which layer's pool of the KV cache this attention uses
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_size
        bias = cfg.attention_bias  # Qwen2's q/k/v biases (o has none)
        self.wq = NormalLinear(cfg.dim, cfg.n_heads * cfg.head_size, cfg.init_std, bias)
        self.wk = NormalLinear(cfg.dim, cfg.n_kv_heads * cfg.head_size, cfg.init_std, bias)
        self.wv = NormalLinear(cfg.dim, cfg.n_kv_heads * cfg.head_size, cfg.init_std, bias)
        self.wo = NormalLinear(cfg.n_heads * cfg.head_size, cfg.dim, residual_std(cfg))
        # QK-norm (as in Qwen3 / OLMo 2) bounds the attention logits, which keeps bf16 training stable.
        self.q_norm = RMSNorm(cfg.head_size, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_size, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: CacheBatch | None = None) -> torch.Tensor:
        """x: (B, T, dim); cos/sin: float32 (B or 1, T, head_dim) from RotaryEmbedding.

        attn_mask: None for plain causal attention, or a bool mask broadcastable to (B, 1, T, T) with
        True = may attend (it must already contain the causal part, e.g. block-diagonal causal for packed
        sequences). cache: a generation step over the paged KV cache; then x is the step's new tokens
        flattened into one row (B = 1) and attn_mask is unused. Returns (B, T, dim).

        Head counts are read from the projections' output shapes, not from the config, so a tensor-parallel
        shard of wq/wk/wv (fewer heads on each rank) runs the same code.
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        q, k = apply_rotary(q, k, cos, sin)

        if cache is not None:
            y = cache.attend(self.layer_id, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0])  # (T, n_heads, head_dim)
            return self.wo(y.reshape(B, T, -1))  # (B, T, dim)

        v = v.transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        # Expand k/v to one head per query head: kv head j serves query heads j*rep .. j*rep + rep - 1.
        # SDPA's enable_gqa=True gives the same result, but on CUDA it rules out the memory-efficient
        # kernel, so a masked (packed SFT) batch would fall back to the slow math path.
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)  # (B, n_heads, T, head_dim)
            v = v.repeat_interleave(rep, dim=1)  # (B, n_heads, T, head_dim)

        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_heads * head_dim)
        return self.wo(y)  # (B, T, dim)
