"""Text embeddings from our own language model, as the seed does: the final-norm hidden states of
`Transformer.hidden()`, pooled (mean over the tokens, or the last token), L2-normalised.

Texts are encoded as the engine encodes a text prompt (`<bos>` first), cut to the model's context, sorted by
length and batched up to a token budget; right padding needs no mask, since a causal model's positions never
see the padding that follows them."""

from __future__ import annotations

import numpy as np
import torch

POOLINGS = ("mean", "last")


class Embedder:
    def __init__(self, model, tokenizer, pooling: str = "mean", batch_tokens: int = 8192):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.model, self.tokenizer, self.pooling = model.eval(), tokenizer, pooling
        self.batch_tokens = batch_tokens
        self.device = next(model.parameters()).device
        self.dim = model.cfg.dim

    def encode(self, text: str) -> list[int]:
        return (self.tokenizer.prefix_ids + self.tokenizer.encode(text))[:self.model.cfg.max_seq_len]

    def __call__(self, texts: list[str], progress=None) -> np.ndarray:
        """(len(texts), dim) float32, unit rows. `progress`: called with the number of texts done per batch."""
        return self.embed_ids([self.encode(t) for t in texts], progress)

    @torch.inference_mode()
    def embed_ids(self, ids: list[list[int]], progress=None) -> np.ndarray:
        """As `__call__`, for token sequences (cut to the model's context)."""
        ids = [list(x)[:self.model.cfg.max_seq_len] for x in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        start = 0
        while start < len(order):
            longest = len(ids[order[start]])
            stop = start + 1
            while stop < len(order) and len(ids[order[stop]]) * (stop - start + 1) <= self.batch_tokens:
                stop += 1  # sorted: the newest is the longest
            batch = [ids[i] for i in order[start:stop]]
            longest = max(len(x) for x in batch)
            tokens = torch.full((len(batch), longest), self.tokenizer.pad_id, dtype=torch.long)
            for row, x in enumerate(batch):
                tokens[row, :len(x)] = torch.tensor(x)
            h = self.model.head.norm(self.model.hidden(tokens.to(self.device))).float()  # (b, T, dim)
            lengths = torch.tensor([len(x) for x in batch], device=h.device)
            if self.pooling == "mean":
                valid = (torch.arange(longest, device=h.device)[None, :] < lengths[:, None]).unsqueeze(-1)
                pooled = (h * valid).sum(1) / lengths[:, None]
            else:
                pooled = h[torch.arange(len(batch), device=h.device), lengths - 1]
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[order[start:stop]] = pooled.cpu().numpy()
            if progress is not None:
                progress(stop - start)
            start = stop
        return out
