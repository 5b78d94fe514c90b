"""The model as a flat list of pipeline layers, built from the same modules as `Transformer` (no second copy
of the model code): embedding, one layer per block, the final norm, the output projection.

Each layer takes and returns a tuple of tensors, which is what crosses a pipeline stage boundary:
`(h, position_ids, doc_ids)`, small integer tensors beside the hidden states instead of (B, 1, T, T) masks
or rotary tables, which each block rebuilds from them. `doc_ids` is (B, T) for packed rows (attention stays
inside each segment, as `SFTStrategy` does it) or (B, 1) for plain causal attention. The final norm is its
own layer, so with tied embeddings the output layer can be the embedding module itself.

A layer's state_dict keys, prefixed with `layer_prefixes(cfg)[i]`, are the plain model's parameter names,
so model folders and pipeline checkpoints convert into each other. Nothing here knows about DeepSpeed:
`training/pipeline.py` wraps these layers in DeepSpeed's PipelineModule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai_ds.config.model import ModelConfig
from astrai_ds.model.block import Block
from astrai_ds.model.init import NormalLinear
from astrai_ds.model.masks import block_causal_mask
from astrai_ds.model.norm import RMSNorm
from astrai_ds.model.rope import RotaryEmbedding
from astrai_ds.model.transformer import Embedding, _vocab_size

StageTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (h, position_ids, doc_ids)


class EmbeddingPipe(Embedding):
    """First layer: (input_ids (B, T), position_ids (B, T), doc_ids) -> (h (B, T, dim), position_ids, doc_ids)."""

    def forward(self, inputs: StageTensors) -> StageTensors:
        input_ids, position_ids, doc_ids = inputs
        return super().forward(input_ids), position_ids, doc_ids


class BlockPipe(Block):
    """One Transformer block; the rotary tables and the attention mask are rebuilt from the positions and
    document ids that travel with the hidden states."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        # no parameters, no state
        self.rope = RotaryEmbedding(cfg.head_size, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, inputs: StageTensors) -> StageTensors:
        h, position_ids, doc_ids = inputs
        cos, sin = self.rope(position_ids)  # float32 (B, T, head_dim)
        attn_mask = block_causal_mask(doc_ids) if doc_ids.shape[1] > 1 else None  # (B, 1, T, T) or causal
        return super().forward(h, cos, sin, attn_mask), position_ids, doc_ids


class FinalNormPipe(nn.Module):
    """The final RMSNorm: (h, position_ids, doc_ids) -> normalised h (B, T, dim); the rest stops here."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, inputs: StageTensors) -> torch.Tensor:
        return self.norm(inputs[0])


class OutputPipe(nn.Module):
    """The untied output projection: h (B, T, dim) -> logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.output = NormalLinear(cfg.dim, _vocab_size(cfg), cfg.init_std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h)


def tied_output(embedding: Embedding, h: torch.Tensor) -> torch.Tensor:
    """The output projection through a tied embedding: h (B, T, dim) -> logits (B, T, vocab)."""
    return F.linear(h, embedding.tok_embeddings.weight)


def layer_prefixes(cfg: ModelConfig) -> list[str]:
    """Layer index -> the plain model's name prefix of that layer's state_dict keys: embed, the blocks, the final
    norm and the output (which, tied, is the embedding again and is never saved under its own index)."""
    return ["embed.", *(f"layers.{i}." for i in range(cfg.n_layers)), "head.", "head."]


def layer_state(state: dict[str, torch.Tensor], prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of a plain state dict `state` that belong to pipeline layer `module` (at `prefix`), under the
    layer's own keys."""
    return {key: state[prefix + key] for key in module.state_dict()}


def plain_state(layer_states: dict[int, dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """{layer index: that layer's state_dict} -> one state dict under the plain model's names; a tied output
    layer (saved only as the embedding) gets the embedding's matrix."""
    prefixes = layer_prefixes(cfg)
    state = {prefixes[i] + key: value for i, sd in layer_states.items() for key, value in sd.items()}
    if cfg.tie_embeddings:
        state["head.output.weight"] = state["embed.tok_embeddings.weight"]
    return state
