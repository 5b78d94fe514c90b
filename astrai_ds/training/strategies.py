"""Training strategies: each turns a batch into a loss. The engine owns backward, step, accumulation
and clipping; a strategy only computes `compute_loss(model, batch) -> (loss, metrics)`."""

from __future__ import annotations

import torch

from astrai_ds.training.losses import token_cross_entropy


class PretrainStrategy:
    """Causal language modelling on fixed windows of the token stream."""

    name = "pt"

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(batch["input_ids"])  # (B, T, V)
        loss = token_cross_entropy(logits, batch["labels"])
        return loss, {"loss": loss.detach()}


STRATEGIES = {"pt": PretrainStrategy}
