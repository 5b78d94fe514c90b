"""Token losses and log-probabilities of a causal LM's logits, shared by training, evaluation and inference.

Every loss here is a *sum* over what it counts; the caller divides once by the count of the whole batch it
means (torchtitan's rule), so that a loss does not depend on how a batch is split into micro-batches or
ranks. `token_cross_entropy` is the mean for a batch that is the whole of what is measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that takes no part in the loss (padding, masked prompt tokens)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labels that are not IGNORE_INDEX: a float32 0-dim tensor.

    logits: (B, T, V) in any dtype (upcast to float32: a bf16 log-softmax over a large vocabulary loses bits);
    labels: (B, T), already shifted so that labels[:, t] is the target of position t. No trained label gives 0.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def token_counts(labels: torch.Tensor) -> torch.Tensor:
    """labels: (N, T) -> (N,) int64, the number of labels per row that are not IGNORE_INDEX."""
    return (labels != IGNORE_INDEX).sum(-1)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over this batch's trained labels; 0 (with zero gradients) when there are
    none, where F.cross_entropy's own mean would give 0/0 = NaN. For a batch that is only part of what is
    measured, sum with `token_loss_sum` and divide by the whole count instead."""
    return token_loss_sum(logits, labels) / (labels != IGNORE_INDEX).sum().clamp(min=1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labels: (N, T, V), (N, T) -> float32 (N,).

    labels are already shifted (labels[:, t] is the target of position t); IGNORE_INDEX labels contribute 0.
    The log-softmax runs in float32 whatever the logits' dtype. For a length-normalised average (SimPO),
    divide by `token_counts(labels)`.
    """
    return token_logps(logits, labels).sum(-1)  # (N,)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The log-probability of each label: (N, T, V), (N, T) -> float32 (N, T), 0 where the label is IGNORE_INDEX.
    The log-softmax runs in float32 whatever the logits' dtype."""
    mask = labels != IGNORE_INDEX  # (N, T)
    safe = labels.masked_fill(~mask, 0)  # gather needs a valid index even where the label is ignored
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    per_token = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return torch.where(mask, per_token, 0.0)
