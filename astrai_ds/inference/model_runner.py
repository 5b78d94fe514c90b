"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns next-token logits.

The step's new tokens (prefill chunks and decode tokens alike) are flattened into one row, so every linear
layer runs once over all of them; attention is grouped by the number of new tokens: all one-token sequences
together, and prefill chunks of one length together (the copies of a GRPO group's prompt, say; see
`model.kv_cache`). Logits are computed only at the positions that are sampled from, and at the prompt positions of
a sequence that asks for its prompt's log-probs.
"""

from __future__ import annotations

import torch

from astrai_ds.inference.sampling import chosen_and_top
from astrai_ds.inference.scheduler import Scheduled
from astrai_ds.model.kv_cache import AttnGroup, CacheBatch, KVCache

PROMPT_LOGPROB_ROWS = 128  # prompt positions whose full-vocabulary log-probs are computed at once


def local_kv_heads(model) -> int:
    """Key/value heads this rank holds: read from wk's shape, so a tensor-parallel shard is sized right."""
    attention = model.layers[0].attention
    return attention.wk.weight.shape[0] // attention.head_dim


class ModelRunner:
    """compile: steps of decodes alone run through compiled graphs (`compiled_decode`); frozen_weights: the model's
    weights never change while the runner lives (see there)."""

    def __init__(self, model, num_blocks: int, block_size: int, compile: bool = False, frozen_weights: bool = True):
        self.model = model
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = model.cfg
        self.cache = KVCache(cfg.n_layers, num_blocks, block_size, local_kv_heads(model), cfg.head_size,
                             dtype=self.dtype, device=self.device)
        self.compiled = None
        if compile:
            from astrai_ds.inference.compiled_decode import CompiledDecode

            self.compiled = CompiledDecode(self, frozen_weights)

    def _slots(self, block_table: list[int], start: int, stop: int) -> list[int]:
        """Cache slots of token positions start..stop-1 of a sequence with this block table."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, stop)]

    def _group(self, items: list[tuple[Scheduled, int]]) -> AttnGroup:
        """One attention group of sequences with the same number of new tokens t; items: (s, the offset of its
        first new token among the step's tokens). Built with a few tensor operations for the whole group."""
        bs, t = self.block_size, items[0][0].num_new
        computed = [s.seq.num_computed for s, _ in items]
        L = max(computed) + t
        nb = -(-L // bs)  # blocks covering the longest; a shorter sequence's row is padded with block 0
        tables = torch.tensor([(s.seq.block_table[:nb] + [0] * nb)[:nb] for s, _ in items], dtype=torch.long)
        keys = torch.arange(L)
        read = tables[:, keys // bs] * bs + keys % bs  # (b, L); past a sequence's end: any valid slot, masked below
        query_pos = torch.tensor(computed)[:, None] + torch.arange(t)  # (b, t)
        mask = (keys[None, None, :] <= query_pos[:, :, None])[:, None]  # (b, 1, t, L): causal, and within it
        tokens = torch.tensor([offset for _, offset in items])[:, None] + torch.arange(t)  # (b, t)
        return AttnGroup(tokens.to(self.device), read.to(self.device), mask.to(self.device))

    @torch.inference_mode()
    def run(self, scheduled: list[Scheduled]) -> torch.Tensor:
        """Compute the scheduled tokens' keys and values; return float32 logits (S, vocab) for the sequences
        whose step reaches their last token (`Scheduled.samples`), in the order of `scheduled`. Sequences with
        the same number of new tokens attend as one group (all decodes; prefill chunks of one length). A step of
        decodes alone runs through a compiled graph where compilation is on."""
        if self.compiled is not None and (logits := self.compiled.run(scheduled)) is not None:
            return logits
        ids, positions, slots, last = [], [], [], []
        by_len: dict[int, list[tuple[Scheduled, int]]] = {}
        offset = 0
        for s in scheduled:
            start, stop = s.seq.num_computed, s.seq.num_computed + s.num_new
            ids += s.seq.token_ids[start:stop]
            positions += range(start, stop)
            slots += self._slots(s.seq.block_table, start, stop)
            by_len.setdefault(s.num_new, []).append((s, offset))
            if s.samples:
                last.append(offset + s.num_new - 1)
            offset += s.num_new
        groups = [self._group(items) for items in by_len.values()]
        batch = CacheBatch(self.cache, torch.tensor(slots, dtype=torch.long, device=self.device), groups)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, N)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)  # (1, N)
        h = self.model.hidden(input_ids, position_ids, cache=batch)  # (1, N, dim)
        offset = 0
        for s in scheduled:
            if s.seq.needs_prompt_logprobs:
                self._prompt_logprobs(s, h[0, offset:offset + s.num_new])
            offset += s.num_new
        return self.model.head(h[:, last]).float()[0]  # (S, vocab)

    def _prompt_logprobs(self, s: Scheduled, h: torch.Tensor) -> None:
        """Append to s.seq.prompt_logprobs the entries of the prompt tokens this step's positions predict (h: their
        hidden states, (num_new, dim)): each one's log-prob under the raw distribution, as sampling reports a
        generated token's, and the top-N. Positions computed again after a preemption are not scored twice."""
        seq, start = s.seq, s.seq.num_computed
        first = max(start, len(seq.prompt_logprobs) - 1)  # the position that predicts the first missing token
        stop = min(start + s.num_new, len(seq.prompt_ids) - 1)  # the last prompt token is predicted by nothing here
        top_n = seq.params.prompt_logprobs
        for a in range(first, stop, PROMPT_LOGPROB_ROWS):  # a chunk of rows at a time: (rows, vocab) float32 logits
            b = min(a + PROMPT_LOGPROB_ROWS, stop)
            lp = self.model.head(h[None, a - start:b - start]).float()[0].log_softmax(-1)
            targets = seq.prompt_ids[a + 1:b + 1]
            for token_id, (logprob, alternatives) in zip(targets, chosen_and_top(lp, targets, top_n)):
                seq.prompt_logprobs.append({"token_id": token_id, "logprob": logprob, "top_logprobs": alternatives})
