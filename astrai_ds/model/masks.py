"""Attention masks for packed sequences (several SFT conversations sharing one row of a batch)."""

from __future__ import annotations

import torch


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask for the model's `attn_mask` (True = may attend).

    doc_ids: (B, T) int, the segment each position belongs to (padding: -1, its own segment).
    Returns bool (B, 1, T, T): query t attends to key s when s <= t and both lie in the same segment. The
    diagonal is always True, so no row is empty (an all-False row would make softmax NaN), and with
    positions restarting per segment each packed sequence sees exactly what it would see alone.
    """
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal).unsqueeze(1)  # (B, 1, T, T)
