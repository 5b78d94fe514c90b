"""The decoder-only language model: Embedding -> Block x n_layers -> Head.

The model is a flat sequence of stages that each take and return plain tensors, so a pipeline-parallel
wrapper can reuse the same modules, and the parameter names map one-to-one onto Hugging Face Llama's
(`HF_LLAMA_NAMES`). Nothing here knows about DeepSpeed.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from astrai_ds.config.model import ModelConfig
from astrai_ds.model.block import Block
from astrai_ds.model.head_loss import OutputLinear
from astrai_ds.model.init import NormalEmbedding
from astrai_ds.model.kv_cache import CacheBatch
from astrai_ds.model.losses import token_logps
from astrai_ds.model.norm import RMSNorm
from astrai_ds.model.rope import RotaryEmbedding

# Our parameter name -> Hugging Face LlamaForCausalLM name; `{i}` is the layer index. The map is flat:
# same shapes, no transposes, and no wq/wk permutation because RoPE uses HF's rotate_half convention.
# Llama has no QK-norm; the q_norm/k_norm names are the ones Qwen3 (Llama layout plus QK-norm) uses, the q/k/v
# biases Qwen2's.
HF_LLAMA_NAMES: dict[str, str] = {
    "embed.tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention.wq.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.attention.wk.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.attention.wv.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.attention.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attention.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "head.norm.weight": "model.norm.weight",
    "head.output.weight": "lm_head.weight",
}

_LAYER = re.compile(r"\.(\d+)\.")


def _translate(name: str, table: dict[str, str]) -> str:
    match = _LAYER.search(name)
    template = _LAYER.sub(".{i}.", name, count=1) if match else name
    if template not in table:
        raise KeyError(f"no Hugging Face Llama counterpart for parameter {name!r}")
    return table[template].replace("{i}", match.group(1)) if match else table[template]


def hf_llama_name(name: str) -> str:
    """Our parameter name -> HF Llama name, e.g. layers.3.feed_forward.w1.weight -> model.layers.3.mlp.gate_proj.weight."""
    return _translate(name, HF_LLAMA_NAMES)


def from_hf_llama_name(hf_name: str) -> str:
    """HF Llama name -> our parameter name (the inverse of `hf_llama_name`)."""
    return _translate(hf_name, {hf: ours for ours, hf in HF_LLAMA_NAMES.items()})


def _vocab_size(cfg: ModelConfig) -> int:
    if not isinstance(cfg.vocab_size, int):
        raise ValueError(f"ModelConfig.vocab_size is {cfg.vocab_size!r}; build the model from "
                         f"cfg.resolved(tokenizer_vocab_size), which fills in the integer")
    return cfg.vocab_size


class Embedding(nn.Module):
    """First stage: token ids (B, T) -> hidden states (B, T, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok_embeddings = NormalEmbedding(_vocab_size(cfg), cfg.dim, cfg.init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)  # (B, T, dim)


class Head(nn.Module):
    """Last stage: hidden states (B, T, dim) -> logits (B, T, vocab), in the model's dtype; or, given labels
    (B, T), each label's float32 log-probability (B, T) computed in chunks of tokens without the whole logits
    (`head_loss.chunked_token_logps`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = OutputLinear(cfg.dim, _vocab_size(cfg), cfg.init_std)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(h)
        if labels is None:
            return self.output(x)  # (B, T, vocab)
        if isinstance(self.output, OutputLinear):
            return self.output(x, labels)  # (B, T) float32
        return token_logps(self.output(x), labels)  # a LoRA adapter on the head: through the whole logits


def build_parts(cfg: ModelConfig):
    """Yield (name, module) for the embedding, each block and the head, built in the order the model's weights
    are drawn from the torch RNG. `Transformer` is made of them; a pipeline stage builds them all in the same order
    and keeps its own, so one seed gives one set of initial weights however the model is split."""
    yield "embed", Embedding(cfg)
    for i in range(cfg.n_layers):
        yield f"layers.{i}", Block(cfg, i)
    yield "head", Head(cfg)


class Transformer(nn.Module):
    """Llama-style decoder: RMSNorm pre-norm, RoPE, grouped-query attention, SwiGLU.

    Weights are initialised in the constructors from the global torch RNG (deterministic under
    `torch.manual_seed`): N(0, init_std) for linears and embeddings, N(0, init_std / sqrt(2 n_layers))
    for `wo` and `w2`, ones for norms.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        parts = dict(build_parts(cfg))
        self.embed = parts.pop("embed")
        head = parts.pop("head")
        self.layers = nn.ModuleList(parts.values())
        self.head = head
        if cfg.tie_embeddings:
            # One Parameter under two names; the head's own init above is simply discarded.
            self.head.output.weight = self.embed.tok_embeddings.weight
        self.rope = RotaryEmbedding(cfg.head_size, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        # Set by the trainer: recompute each block in the backward pass instead of storing activations.
        self.activation_checkpointing = False

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None, cache: CacheBatch | None = None) -> torch.Tensor:
        """input_ids: (B, T) int -> the last block's hidden states (B, T, dim), before the final norm.

        position_ids: (B, T) or (T,) int, default arange(T); pass them for left padding or packed
        sequences. attn_mask: None for causal attention, else a bool mask broadcastable to (B, 1, T, T),
        True = may attend, which must include the causal constraint itself. cache: a generation step over
        a paged KV cache, with the step's tokens flattened into one row (B = 1) and their position_ids
        given. `self.head(...)` turns the result into logits; generation applies it only to the positions
        it samples from.
        """
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)  # (T,)
        cos, sin = self.rope(position_ids)  # float32 (B or 1, T, head_dim)
        h = self.embed(input_ids)  # (B, T, dim)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                h = checkpoint(block, h, cos, sin, attn_mask, use_reentrant=False)
            else:
                h = block(h, cos, sin, attn_mask, cache)
        return h  # (B, T, dim)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) int -> logits (B, T, vocab) in the model's dtype; arguments as in `hidden`. Given
        labels (B, T) (shifted, IGNORE_INDEX where nothing is trained), it returns each label's float32
        log-probability (B, T) instead, 0 where ignored, computed in chunks without the whole logits: what the
        training losses need, with the head's share of a step's memory cut to one chunk."""
        return self.head(self.hidden(input_ids, position_ids, attn_mask), labels)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, a tied embedding/head matrix counted once.

        exclude_embeddings leaves out the token-embedding table (when tied, that is the shared matrix).
        Counts the local tensors: under a framework that shards parameters, count before sharding.
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            total -= self.embed.tok_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N + 12 n_layers dim seq_len (PaLM, Chowdhery et al. 2022, appendix B).

        N counts the weights of every matmul: the blocks' projections plus the output head (counted even
        when tied to the embedding, since the head is a real matmul), but not the embedding lookup or the
        norms. 6 N is forward (2) plus backward (4) FLOPs per weight; the second term is attention's
        QK^T and AV matmuls over a context of seq_len, which no parameter count sees. It is read from
        the layers' shapes, so it stays right when the weights themselves are sharded.
        """
        n = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * n + 12.0 * self.cfg.n_layers * self.cfg.dim * seq_len


def shape_model(cfg: ModelConfig) -> Transformer:
    """The model on the meta device: its parameter names, shapes and FLOP counts without any memory, for any size,
    whatever shards or stages a run splits it into."""
    with torch.device("meta"):
        return Transformer(cfg)
