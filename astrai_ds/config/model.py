"""The model's shape: saved as `config.json` beside every checkpoint and exported model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from astrai_ds.config.base import check, from_dict, read_config, to_dict


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

    def __post_init__(self):
        check(self.vocab_size == "auto" or (isinstance(self.vocab_size, int) and self.vocab_size > 0),
              "vocab_size", f'must be a positive integer or "auto", got {self.vocab_size!r}')
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            check(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        check(self.dim % self.n_heads == 0, "dim", f"({self.dim}) must be divisible by n_heads ({self.n_heads})")
        check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
              f"({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        check(self.head_dim % 2 == 0, "dim", f"/ n_heads = {self.head_dim} must be even for RoPE")
        check(self.rope_theta > 0, "rope_theta", "must be positive")
        check(self.norm_eps > 0, "norm_eps", "must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def resolved(self, tokenizer_vocab_size: int) -> "ModelConfig":
        """A copy with `vocab_size` "auto" replaced by the tokenizer's size rounded up to a multiple of 64."""
        data = to_dict(self)
        if self.vocab_size == "auto":
            data["vocab_size"] = (tokenizer_vocab_size + 63) // 64 * 64
        return ModelConfig(**data)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Load a model config: JSON, or YAML for `.yaml`/`.yml`."""
        return from_dict(cls, read_config(path, "model config"), str(path))

    def to_dict(self) -> dict:
        return to_dict(self)
