"""The Llama-style decoder-only model, one module per component, bottom-up:
norm -> rope -> attention -> mlp -> block -> transformer."""

from astrai_ds.config.model import ModelConfig
from astrai_ds.model.attention import Attention
from astrai_ds.model.block import Block
from astrai_ds.model.init import NormalEmbedding, NormalLinear, residual_std
from astrai_ds.model.mlp import FeedForward
from astrai_ds.model.norm import RMSNorm
from astrai_ds.model.rope import RotaryEmbedding, apply_rotary, rotate_half
from astrai_ds.model.transformer import (HF_LLAMA_NAMES, Embedding, Head, Transformer, from_hf_llama_name,
                                         hf_llama_name)

__all__ = [
    "Attention", "Block", "Embedding", "FeedForward", "HF_LLAMA_NAMES", "Head", "ModelConfig",
    "NormalEmbedding", "NormalLinear", "RMSNorm", "RotaryEmbedding", "Transformer", "apply_rotary",
    "from_hf_llama_name", "hf_llama_name", "residual_std", "rotate_half",
]
