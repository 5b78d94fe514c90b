"""The model's shape: saved as `config.json` beside every checkpoint and exported model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from astrai_ds.config.base import check, from_dict, read_config, to_dict


@dataclass
class RopeScaling:
    """Llama 3's RoPE frequency scaling (`rope_scaling` type "llama3" in its config.json): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, those shorter than
    original_max_position_embeddings / high_freq_factor kept, those between blended."""
    rope_type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        check(self.factor >= 1, "factor", f"must be at least 1, got {self.factor}")
        check(0 < self.low_freq_factor < self.high_freq_factor, "low_freq_factor",
              f"must be positive and below high_freq_factor ({self.high_freq_factor}), got {self.low_freq_factor}")
        check(self.original_max_position_embeddings > 0, "original_max_position_embeddings",
              "must be positive")


@dataclass
class ModelConfig:
    vocab_size: int | str = "auto"  # an integer, or "auto": the tokenizer's size rounded up to a multiple of 64
    dim: int = 256  # hidden size
    n_layers: int = 4  # Transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); equal to n_heads for plain MHA
    ffn_dim: int = 688  # SwiGLU inner size
    max_seq_len: int = 512  # longest sequence the RoPE tables and the data may use
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the output head
    qk_norm: bool = False  # RMSNorm on queries and keys per head before RoPE
    init_std: float = 0.02  # std of the normal init; output projections are scaled by 1/sqrt(2 n_layers)
    # What pretrained models of other families use (a folder `transformers` saved sets them; leave them unset to
    # train from scratch):
    head_dim: int | None = None  # size of one attention head; None: dim / n_heads (Qwen3 sets its own)
    attention_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    rope_scaling: RopeScaling | None = None  # Llama 3's long-context RoPE scaling

    def __post_init__(self):
        check(self.vocab_size == "auto" or (isinstance(self.vocab_size, int) and self.vocab_size > 0),
              "vocab_size", f'must be a positive integer or "auto", got {self.vocab_size!r}')
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            check(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        if self.head_dim is None:
            check(self.dim % self.n_heads == 0, "dim", f"({self.dim}) must be divisible by n_heads ({self.n_heads}), "
                  f"or set head_dim")
            check(self.head_size % 2 == 0, "dim", f"/ n_heads = {self.head_size} must be even for RoPE")
        else:
            check(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim",
                  f"must be positive and even for RoPE, got {self.head_dim}")
        check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
              f"({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        check(self.rope_theta > 0, "rope_theta", "must be positive")
        check(self.norm_eps > 0, "norm_eps", "must be positive")
        check(not (self.qk_norm and self.attention_bias), "attention_bias",
              "and qk_norm together match no Hugging Face architecture (Qwen2 has the biases, Qwen3 the norms)")

    @property
    def head_size(self) -> int:
        """The size of one attention head: head_dim where set, else dim / n_heads."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def resolved(self, tokenizer_vocab_size: int) -> "ModelConfig":
        """A copy with `vocab_size` "auto" replaced by the tokenizer's size rounded up to a multiple of 64."""
        data = to_dict(self)
        if self.vocab_size == "auto":
            data["vocab_size"] = (tokenizer_vocab_size + 63) // 64 * 64
        return from_dict(ModelConfig, data, "model config")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Load a model config: JSON, or YAML for `.yaml`/`.yml`."""
        return from_dict(cls, read_config(path, "model config"), str(path))

    def to_dict(self) -> dict:
        return to_dict(self)
