"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns next-token logits.

The step's new tokens (prefill chunks and decode tokens alike) are flattened into one row, so every linear
layer runs once over all of them; attention is grouped: all one-token sequences together, each longer chunk
alone (see `model.kv_cache`). Logits are computed only at the positions that are sampled from.
"""

from __future__ import annotations

import torch

from astrai_ds.inference.scheduler import Scheduled
from astrai_ds.model.kv_cache import AttnGroup, CacheBatch, KVCache


def local_kv_heads(model) -> int:
    """Key/value heads this rank holds: read from wk's shape, so a tensor-parallel shard is sized right."""
    attention = model.layers[0].attention
    return attention.wk.weight.shape[0] // attention.head_dim


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = model.cfg
        self.cache = KVCache(cfg.n_layers, num_blocks, block_size, local_kv_heads(model), cfg.head_size,
                             dtype=self.dtype, device=self.device)

    def _slots(self, block_table: list[int], start: int, stop: int) -> torch.Tensor:
        """Cache slots of token positions start..stop-1 of a sequence with this block table: (stop - start,) long."""
        pos = torch.arange(start, stop)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _group(self, items: list[tuple[Scheduled, torch.Tensor]]) -> AttnGroup:
        """One attention group of sequences with the same number of new tokens t; items: (s, token indices (t,))."""
        t = items[0][1].numel()
        lengths = [s.seq.num_computed + s.num_new for s, _ in items]
        L = max(lengths)
        read = torch.zeros(len(items), L, dtype=torch.long)  # padding reads slot 0, masked out below
        mask = torch.zeros(len(items), 1, t, L, dtype=torch.bool)
        keys = torch.arange(L)
        for row, (s, _) in enumerate(items):
            read[row, :lengths[row]] = self._slots(s.seq.block_table, 0, lengths[row])
            query_pos = torch.arange(s.seq.num_computed, lengths[row])  # (t,)
            mask[row, 0] = keys[None, :] <= query_pos[:, None]  # causal; keys past the sequence are later still
        tokens = torch.stack([idx for _, idx in items])  # (b, t)
        return AttnGroup(tokens.to(self.device), read.to(self.device), mask.to(self.device))

    @torch.inference_mode()
    def run(self, scheduled: list[Scheduled]) -> torch.Tensor:
        """Compute the scheduled tokens' keys and values; return float32 logits (S, vocab) for the sequences
        whose step reaches their last token (`Scheduled.samples`), in the order of `scheduled`."""
        ids, positions, slots, decode, groups, last = [], [], [], [], [], []
        offset = 0
        for s in scheduled:
            start, stop = s.seq.num_computed, s.seq.num_computed + s.num_new
            ids += s.seq.token_ids[start:stop]
            positions += range(start, stop)
            slots.append(self._slots(s.seq.block_table, start, stop))
            idx = torch.arange(offset, offset + s.num_new)
            (decode.append((s, idx)) if s.num_new == 1 else groups.append(self._group([(s, idx)])))
            if s.samples:
                last.append(offset + s.num_new - 1)
            offset += s.num_new
        if decode:
            groups.append(self._group(decode))
        batch = CacheBatch(self.cache, torch.cat(slots).to(self.device), groups)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, N)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)  # (1, N)
        h = self.model.hidden(input_ids, position_ids, cache=batch)  # (1, N, dim)
        return self.model.head(h[:, last]).float()[0]  # (S, vocab)
