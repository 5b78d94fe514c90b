"""One pre-norm Transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from astrai_ds.config.model import ModelConfig
from astrai_ds.model.attention import Attention
from astrai_ds.model.init import residual_std
from astrai_ds.model.kv_cache import CacheBatch
from astrai_ds.model.mlp import FeedForward
from astrai_ds.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, std=cfg.init_std, out_std=residual_std(cfg))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: CacheBatch | None = None) -> torch.Tensor:
        """x: (B, T, dim) -> (B, T, dim); cos/sin, attn_mask and cache as in `Attention.forward`."""
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))
