"""Linear and embedding layers that draw their weights from N(0, std) in their own constructor.

Why not initialise from the parent module, or in a separate `reset_parameters` pass over the model?
Each layer owning its init keeps the init next to the weight it sets, and it is what a sharded build needs:
under DeepSpeed ZeRO-3's `zero.Init` (not used yet: today every rank builds the whole model before ZeRO-3
partitions it), a module's own parameters are partitioned as soon as its `__init__` returns, so a parent
that touched a child's weight afterwards would see an empty shard and its init would be silently lost.
"""

from __future__ import annotations

import math

from torch import nn

from astrai_ds.config.model import ModelConfig


def residual_std(cfg: ModelConfig) -> float:
    """Std for projections that write into the residual stream (`wo`, `w2`).

    Each block adds two such outputs to the stream; scaling by 1/sqrt(2 n_layers) keeps the stream's
    variance at init independent of depth (GPT-2's scheme).
    """
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


class NormalLinear(nn.Linear):
    """`nn.Linear`, weight ~ N(0, std), without bias unless asked (then zeros)."""

    def __init__(self, in_features: int, out_features: int, std: float, bias: bool = False):
        # Set before nn.Linear.__init__, which calls reset_parameters() (ours) while constructing.
        self.std = std
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class NormalEmbedding(nn.Embedding):
    """`nn.Embedding`, weight ~ N(0, std) (no padding row: any id may be a real token)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float):
        self.std = std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
