"""A compiled decode step: a step in which every scheduled sequence decodes one token runs as one `torch.compile`d
graph (inductor: C++/OpenMP kernels on a CPU, Triton on a GPU) instead of a few hundred eager operations.

Shapes are static by batch-size bucket. A step of b decoding sequences is padded to the next bucket (1, 2, 4, ...,
up to the engine's max_num_seqs), so one graph serves every step of that size: it is compiled on its first use and
kept (inductor caches its kernels on disk, `extensions.use_compile_cache`). A padding row writes its key and value
into a scratch slot that no sequence owns, attends to that slot alone, and its logits are dropped. The context
length and the size of the KV pool are dynamic dimensions: one graph for every length, and for every engine over
the same model (GRPO builds an engine per rollout). Steps that prefill run eager: they are few, and bound by matmuls.

With `frozen` weights (an engine whose model never changes: generate, chat, serve, eval) the graph is compiled with
inductor's freezing: the weights become constants of the graph, which on a CPU lowers the linear layers to oneDNN
with prepacked weights (`mkldnn::_linear_pointwise`), and dynamo guards on the parameters' identity, so another
model gets its own graphs. A model updated in place between runs (GRPO's rollout copy) must not be frozen, as its
graph would keep the old weights: there they stay inputs of the graph (tested both ways). Where inductor cannot
compile (a CPU without a C++ compiler, an error), the engine says so in one line and decodes eager.
"""

from __future__ import annotations

import sys

import torch

from astrai_ds.model.kv_cache import AttnGroup, CacheBatch, KVCache


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch itself: the batch sizes graphs are compiled for."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


def _decode(model, cache: KVCache, input_ids, position_ids, write_slots, read_slots, mask) -> torch.Tensor:
    """One decode step of b sequences over the paged cache -> float32 logits (b, vocab). input_ids, position_ids:
    (1, b); write_slots (b,); read_slots (b, L); mask (b, 1, 1, L)."""
    b = write_slots.shape[0]
    tokens = torch.arange(b, device=write_slots.device).unsqueeze(1)  # (b, 1): query i is the step's token i
    batch = CacheBatch(cache, write_slots, [AttnGroup(tokens, read_slots, mask)])
    h = model.hidden(input_ids, position_ids, cache=batch)  # (1, b, dim)
    return model.head(h).float()[0]  # (b, vocab)


def _decode_frozen(model, cache, *args):
    return _decode(model, cache, *args)


def _decode_live(model, cache, *args):
    return _decode(model, cache, *args)


_COMPILED: dict[bool, object] = {}  # frozen -> the torch.compile wrapper (two functions, so two caches of graphs)


def _compiled(frozen: bool):
    if frozen not in _COMPILED:
        import torch._dynamo

        # every bucket of every model in the process is one entry of a wrapper's cache
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[frozen] = torch.compile(_decode_frozen if frozen else _decode_live, fullgraph=True)
    return _COMPILED[frozen]


class CompiledDecode:
    """The decode graphs of one engine; `run` returns None for a step it does not take (a prefill in it, or
    compilation off after a failure), and the caller runs that step eager."""

    def __init__(self, runner, max_batch: int, scratch_slot: int, frozen: bool = True):
        self.runner = runner
        self.buckets = batch_buckets(max_batch)
        self.scratch_slot = scratch_slot  # a slot of the pool's extra block: padding rows write and read it
        self.frozen = frozen
        self.fn = _compiled(frozen)
        self.steps = 0  # steps taken compiled (tests and benchmarks read it)
        self.seen: set[int] = set()  # buckets run at least once (the first run of each compiles)
        self.failed: str | None = None

    def bucket(self, b: int) -> int:
        return next(x for x in self.buckets if x >= b)

    def run(self, scheduled) -> torch.Tensor | None:
        """Float32 logits (b, vocab) of a step whose sequences all decode one token, or None."""
        if self.failed is not None or not scheduled or any(s.num_new != 1 for s in scheduled):
            return None
        runner, b = self.runner, len(scheduled)
        B = self.bucket(b)
        group = runner._group([(s, i) for i, s in enumerate(scheduled)])
        L = group.read_slots.shape[1]
        read = torch.full((B, L), self.scratch_slot, dtype=torch.long, device=runner.device)
        read[:b] = group.read_slots
        mask = torch.zeros((B, 1, 1, L), dtype=torch.bool, device=runner.device)
        mask[:b] = group.mask
        mask[b:, ..., 0] = True  # a padding row attends to its scratch slot only (no row without a key)
        ids = [s.seq.token_ids[s.seq.num_computed] for s in scheduled] + [0] * (B - b)
        positions = [s.seq.num_computed for s in scheduled] + [0] * (B - b)
        slots = [runner._slots(s.seq.block_table, p, p + 1)[0] for s, p in zip(scheduled, positions)]
        args = (torch.tensor([ids], dtype=torch.long, device=runner.device),
                torch.tensor([positions], dtype=torch.long, device=runner.device),
                torch.tensor(slots + [self.scratch_slot] * (B - b), dtype=torch.long, device=runner.device), read, mask)
        for pool in runner.cache.k + runner.cache.v:
            torch._dynamo.mark_dynamic(pool, 0)  # the pool's size: one graph for engines of any cache size
        torch._dynamo.mark_dynamic(read, 1)  # the context length
        torch._dynamo.mark_dynamic(mask, 3)
        if B in self.seen:
            logits = self._call(args)
        else:  # this bucket's first step compiles its graph (or finds it compiled by an earlier engine)
            try:
                logits = self._call(args)
            except Exception as e:  # noqa: BLE001 (inductor's errors are many: no compiler, an unsupported op, ...)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self.failed = f"{type(e).__name__}: {first}"[:300]
                print(f"compile: the decode step could not be compiled ({self.failed}); decoding eager",
                      file=sys.stderr, flush=True)
                return None
            self.seen.add(B)
        self.steps += 1
        return logits[:b]

    def _call(self, args) -> torch.Tensor:
        import torch._inductor.config

        with torch._inductor.config.patch(freezing=self.frozen):  # read when a graph compiles, inside the call
            return self.fn(self.runner.model, self.runner.cache, *args)
