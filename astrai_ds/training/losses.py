"""Loss functions as plain tensor functions (strategies and evaluation share them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that takes no part in the loss (padding, masked prompt tokens)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not IGNORE_INDEX.

    logits: (B, T, V) in any dtype (upcast to float32: a bf16 log-softmax over a large vocabulary loses bits);
    labels: (B, T), already shifted so that labels[:, t] is the target of position t.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
