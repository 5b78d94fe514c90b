"""One request's state inside the engine: its tokens, how many of them are in the KV cache, its blocks."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from astrai_ds.inference.sampling import SamplingParams

_arrival = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: its blocks were taken back and it is recomputed later
    RUNNING = "running"  # holds blocks and is stepped
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]  # token ids that end the request (not part of its output)
    max_tokens: int  # prompt + output may not exceed this (the model's context, or less)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose keys and values are in the cache
    num_cached: int = 0  # of the prompt's tokens, how many came from the prefix cache (the first time)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    arrival: int = field(default_factory=lambda: next(_arrival))  # age order: preemption takes the youngest
    # Asked for (params.prompt_logprobs): one entry per prompt token, None for the first (nothing predicts it), then
    # {"token_id", "logprob", "top_logprobs"}, appended by the model runner as the prompt's positions are computed.
    prompt_logprobs: list[dict | None] | None = None

    def __post_init__(self):
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt log-probs are asked for and some are still missing: every prompt position must be computed."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token_id: int) -> str | None:
        """Record a sampled token; returns the finish reason when the request is done ("stop" for a stop token,
        which is not kept in the output; "length" at max_new_tokens or the end of the context)."""
        if token_id in self.stop_ids:
            return "stop"
        self.output_ids.append(token_id)
        if len(self.output_ids) >= self.params.max_new_tokens or self.num_tokens >= self.max_tokens:
            return "length"
        return None
