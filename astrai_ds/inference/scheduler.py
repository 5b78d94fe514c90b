"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a budget of `max_num_batched_tokens` new tokens. Running sequences come first, in arrival
order: a decoding sequence needs one token, a sequence still in its prompt takes what is left of the
budget (long prompts are prefilled in chunks over several steps). Then waiting sequences join while the
budget, `max_num_seqs` and the KV pool allow, each starting after the longest prefix the cache already
holds. A waiting sequence whose next block another sequence starts computing in the same step waits one
step and then finds it cached: the copies of one prompt (a request's `n` choices, a GRPO group) prefill
their shared blocks once. When a running sequence needs a block and the pool is empty, the youngest running
sequence is preempted: its blocks go back to the pool and it waits to be recomputed (its full blocks stay in
the prefix cache, so recomputing is often cheap). A sequence that asks for its prompt's log-probs reads nothing from
the prefix cache until they are all computed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from astrai_ds.inference.block_manager import BlockManager
from astrai_ds.inference.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_new: int  # tokens computed this step, starting at seq.num_computed
    samples: bool = False  # the step reaches the sequence's last known token, whose logits give the next one
    prompt_done: bool = False  # the step completes the prompt of a sequence that generates nothing (max_new_tokens 0)

    def __post_init__(self):
        reaches_end = self.seq.num_computed + self.num_new == self.seq.num_tokens
        self.samples = reaches_end and self.seq.params.max_new_tokens > 0
        self.prompt_done = reaches_end and not self.samples


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (done or aborted) and give its blocks back at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)  # first in line again: it is older than everything that waits
        self.num_preemptions += 1

    def schedule(self) -> list[Scheduled]:
        budget, out = self.max_num_batched_tokens, []
        for seq in sorted(self.running, key=lambda s: s.arrival):  # oldest first
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.allocate(seq.block_table, seq.num_computed + n):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                out.append(Scheduled(seq, n))
                budget -= n
        out = [s for s in out if s.seq.status is Status.RUNNING]  # a later preemption may have taken one back

        computing: set[bytes] = set()  # the first uncached block of each sequence admitted in this step
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.needs_prompt_logprobs:  # its log-probs need every prompt position's logits: nothing from the cache
                prefix, cached, key = [], 0, None
            else:
                prefix, cached = self.blocks.match_prefix(seq.token_ids, count=False)
                key = self.blocks.next_block_key(seq.token_ids, prefix)
            if key is not None and key in computing:
                continue  # a sequence admitted in this step computes that block: the next step finds it cached
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.allocate(seq.block_table, cached + n, prefix):
                break  # the pool is full: wait for running sequences to finish (looked up again then)
            self.blocks.record_lookup(seq.num_tokens, cached)  # once per admission, not per step it waited
            self.waiting.remove(seq)
            if not seq.output_ids:  # the first admission (a recomputed one keeps its first count)
                seq.num_cached = cached
            seq.num_computed, seq.status = cached, Status.RUNNING
            self.running.append(seq)
            out.append(Scheduled(seq, n))
            budget -= n
            if key is not None:
                computing.add(key)
        return out

    def advance(self, scheduled: list[Scheduled]) -> None:
        """After the step ran: the computed tokens are in the cache, and their full blocks are hashed."""
        for s in scheduled:
            s.seq.num_computed += s.num_new
            self.blocks.cache_blocks(s.seq.block_table, s.seq.token_ids, s.seq.num_computed)
