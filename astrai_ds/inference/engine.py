"""The generation engine: requests in, tokens and text out, with continuous batching over a paged KV cache.

`add_request` / `step` / `abort` are the core: every `step` schedules the waiting and running requests
(scheduler), runs one forward over their new tokens (model runner), samples one token for each request that
reached its last token (sampling, each request with its own generator) and turns tokens into safe text
deltas (detokenizer). Several callers share an engine through `add_request` and `step` (the server's engine
thread reads every step's outputs and hands each to its caller). Streaming (`stream`), one request (`generate`)
and a list of requests (`generate_batch`) are loops over `step` for a caller that has the engine to itself: they
refuse to start while other requests are unfinished, whose outputs they would swallow.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from astrai_ds.errors import ContextTooLong, RequestError
from astrai_ds.inference.block_manager import BlockManager
from astrai_ds.inference.detokenizer import IncrementalDetokenizer
from astrai_ds.inference.model_runner import ModelRunner, local_kv_heads
from astrai_ds.inference.progress import Progress
from astrai_ds.inference.sampling import SamplingParams, make_generator, sample
from astrai_ds.inference.scheduler import Scheduler
from astrai_ds.inference.sequence import Sequence
from astrai_ds.model.kv_cache import KVCache

Prompt = str | list[int] | list[dict]  # text (a <bos> is put before it), token ids, or chat messages


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    text: str  # the new text: whole characters only, never (part of) a stop string
    token_ids: list[int]  # the new tokens
    # per new token, and for the stop token that ended the request (listed, though not in token_ids, as OpenAI and vLLM
    # list it): {"token_id", "logprob", "top_logprobs": [(id, logprob), ...]}
    logprobs: list[dict] | None
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error" once finished
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    stop_string: str | None = None  # the stop string that ended the request (finish_reason "stop")
    error: str | None = None  # why the request failed (finish_reason "error"); the engine goes on
    stop_token_id: int | None = None  # the stop token that ended the request (not in token_ids)
    # SamplingParams.prompt_logprobs asked: one entry per prompt token (None for the first), in the request's first
    # output that carries a token
    prompt_logprobs: list[dict | None] | None = None


@dataclass
class Completion:
    """A finished request (`generate`, `generate_batch`)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    logprobs: list[dict] | None = None
    stop_string: str | None = None  # the stop string that ended it (finish_reason "stop"); None for a stop token
    error: str | None = None  # set (and nothing generated) when the request was refused
    stop_token_id: int | None = None  # the stop token that ended it (not in token_ids): what a trainer appends
    prompt_logprobs: list[dict | None] | None = None  # see RequestOutput


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    prompt_logprobs_sent: bool = False


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV cache block
    kv_cache_tokens: int | None = None  # pool size in tokens; default: from kv_cache_memory
    kv_cache_memory: int = 1 << 30  # pool size in bytes when kv_cache_tokens is not given
    max_num_seqs: int = 64  # requests stepped together at most
    max_num_batched_tokens: int = 512  # new tokens per step (prefill chunks + decode tokens)
    seed: int = 0  # seeds the generators of requests that bring no seed (the same on every tensor-parallel rank)
    compile: bool = False  # decode steps through compiled graphs (`compiled_decode`)
    # The model's weights never change while the engine lives, so compiled graphs may fold them in. False for a model
    # updated in place between runs (GRPO's rollout copy).
    frozen_weights: bool = True

    def __post_init__(self):
        for key in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, key) < 1:
                raise RequestError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise RequestError(f"kv_cache_tokens must be at least block_size ({self.block_size}), "
                               f"got {self.kv_cache_tokens}")


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.cfg
        if tokenizer.vocab_size > cfg.vocab_size:
            raise RequestError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                               f"{cfg.vocab_size}: they do not belong together")
        dtype = next(model.parameters()).dtype
        tokens = config.kv_cache_tokens or config.kv_cache_memory // KVCache.bytes_per_token(
            cfg.n_layers, local_kv_heads(model), cfg.head_size, dtype)
        # Never more than every request at full context could use, never less than one full context.
        tokens = min(max(tokens, cfg.max_seq_len), config.max_num_seqs * cfg.max_seq_len)
        num_blocks = -(-tokens // config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, config.block_size,
                                  compile=config.compile,
                                  frozen_weights=config.frozen_weights)
        self.stop_ids = tokenizer.stop_ids
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._seeds = random.Random(config.seed)

    @property
    def max_context(self) -> int:
        return self.model.cfg.max_seq_len

    # ------------------------------------------------------------------ requests

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text gets a leading <bos> (where the model's tokenizer adds one); chat messages
        are rendered with the chat template (ours: ChatML) and the assistant's generation header."""
        from astrai_ds.data.chat import check_messages, render_chat

        if isinstance(prompt, str):
            return self.tokenizer.prefix_ids + self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            try:
                messages = check_messages(prompt, final=None)
            except ValueError as e:
                raise RequestError(f"messages: {e}") from None
            return render_chat(self.tokenizer, messages, add_generation_prompt=True)[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model.cfg.vocab_size
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
            return list(prompt)
        raise RequestError("prompt must be a non-empty string, a list of token ids or a list of chat messages")

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; it runs from the next `step`. Raises RequestError (and queues nothing) when the
        request cannot be served: the engine's other requests are never affected."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        room = self.max_context - (params.max_new_tokens > 0)  # a token to generate needs a position after the prompt
        if len(ids) > room:
            raise ContextTooLong(f"the prompt is {len(ids)} tokens, and the model's context is {self.max_context} "
                               f"tokens: shorten the prompt to at most {room} tokens")
        need = min(len(ids) + params.max_new_tokens, self.max_context)
        pool = self.blocks.num_blocks * self.blocks.block_size
        if need > pool:
            raise RequestError(f"the request needs up to {need} tokens of KV cache, more than the whole pool "
                               f"({pool} tokens): lower max_new_tokens or give the engine a larger kv cache")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else self._seeds.randrange(2**63)
        stop_ids = (frozenset() if params.ignore_eos else self.stop_ids) | frozenset(params.stop_token_ids)
        seq = Sequence(request_id, ids, params, stop_ids, self.max_context)
        generator = None if params.greedy else make_generator(seed)
        detok = IncrementalDetokenizer(self.tokenizer, stop=list(params.stop))
        self._requests[request_id] = _Request(seq, detok, generator)
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its cache blocks (a no-op for an unknown or finished one)."""
        request = self._requests.pop(request_id, None)
        if request is not None and not request.seq.finished:
            self.scheduler.finish(request.seq, "abort")

    def unfinished_ids(self) -> list[str]:
        """The ids of the requests added and not finished yet, oldest first."""
        return list(self._requests)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        """Run one forward for the scheduled requests and sample; returns what each request gained."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.has_unfinished():  # every request fits the pool alone (add_request checks), so never expected
                raise RuntimeError(f"the scheduler could not run any of {len(self.scheduler.waiting)} waiting "
                                   f"requests with {self.blocks.num_free_blocks} free KV blocks")
            return []
        logits = self.runner.run(scheduled)  # (S, vocab) for the requests that sample
        self.scheduler.advance(scheduled)
        sampling = [s.seq for s in scheduled if s.samples]
        requests = [self._requests[seq.request_id] for seq in sampling]
        results = sample(logits, [seq.params for seq in sampling], [r.generator for r in requests],
                         [seq.prompt_ids for seq in sampling], [seq.output_ids for seq in sampling])
        outputs = [self._prompt_done(s.seq) for s in scheduled if s.prompt_done]
        for seq, request, result in zip(sampling, requests, results):
            try:
                if result.error is not None:
                    raise RuntimeError(result.error)
                outputs.append(self._advance(seq, request, result))
            except Exception as e:  # this request's failure ends it (its blocks freed); the others go on
                outputs.append(self._fail(seq, e))
        return outputs

    def _prompt_done(self, seq: Sequence) -> RequestOutput:
        """A request that generates nothing (max_new_tokens 0) ends once its prompt is computed: "length", with its
        prompt log-probs."""
        self.scheduler.finish(seq, "length")
        del self._requests[seq.request_id]
        return RequestOutput(seq.request_id, "", [], None, True, "length", len(seq.prompt_ids), 0, seq.num_cached,
                             prompt_logprobs=seq.prompt_logprobs)

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        if seq.request_id in self._requests:
            self.scheduler.finish(seq, "error")
            del self._requests[seq.request_id]
        return RequestOutput(seq.request_id, "", [], None, True, "error", len(seq.prompt_ids), len(seq.output_ids),
                             seq.num_cached, error=str(error) or type(error).__name__)

    def _advance(self, seq: Sequence, request: _Request, result) -> RequestOutput:
        """Append a sampled token to its request: stop checks, detokenization, log-probs; its output."""
        reason = seq.append(result.token_id)
        new_ids = [] if reason == "stop" else [result.token_id]
        text = request.detok.add(result.token_id) if new_ids else ""
        if request.detok.stopped:
            reason = "stop"
        if reason is not None:
            text += "" if request.detok.stopped else request.detok.finish()
            self.scheduler.finish(seq, reason)
            del self._requests[seq.request_id]
        logprobs = None
        if seq.params.logprobs is not None:  # a stop token that ended the request included
            logprobs = [{"token_id": result.token_id, "logprob": result.logprob,
                         "top_logprobs": result.top_logprobs or []}]
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            prompt_logprobs, request.prompt_logprobs_sent = seq.prompt_logprobs, True
        return RequestOutput(seq.request_id, text, new_ids, logprobs, reason is not None, reason,
                             len(seq.prompt_ids), len(seq.output_ids), seq.num_cached, request.detok.matched_stop,
                             stop_token_id=result.token_id if reason == "stop" and not new_ids else None,
                             prompt_logprobs=prompt_logprobs)

    # ------------------------------------------------------------------ wrappers

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Generate one request and yield its outputs as they come (other queued requests step along).
        Closing the iterator early aborts the request. The engine must have no other unfinished request."""
        self._check_alone("stream")
        request_id = self.add_request(prompt, params)
        done = False
        try:
            while not done and request_id in self._requests:
                for out in self.step():
                    if out.request_id == request_id:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.abort(request_id)

    def warm_up(self) -> None:
        """With `compile`, compile the decode graphs now (one sequence, a batch) rather than in the first requests'
        steps: a request of one token id, then two, each decoding a token. Nothing stays behind in the cache."""
        if self.runner.compiled is None:
            return
        # a seed of its own, so the engine's seeds for requests without one stay as they would be
        params = SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True, seed=0)
        for n in (1, 2):
            self.generate_batch([[0]] * n, params)

    def _check_alone(self, name: str) -> None:
        if self._requests:
            raise RequestError(f"{name}() steps the engine alone, and {len(self._requests)} other requests are "
                               f"unfinished (their outputs would be lost): use add_request() and step() to share it")

    def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> Completion:
        return self.generate_batch([prompt], params)[0]

    def generate_batch(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                       progress: bool = False, desc: str = "generate") -> list[Completion]:
        """Completions of `prompts`, in their order, all stepped together. `params` is one for all or one per
        prompt. A request that is refused (RequestError) gets a Completion with `error` set; the rest run.
        `progress` shows a bar (a terminal) or a line per tenth (elsewhere) on stderr, named `desc`. The engine must
        have no other unfinished request."""
        self._check_alone("generate_batch")
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        results: list[Completion | None] = [None] * len(prompts)
        pending: dict[str, tuple[int, list[str], list[int], list[dict], list]] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                pending[self.add_request(prompt, p)] = (i, [], [], [], [None])
            except RequestError as e:
                results[i] = Completion(f"refused-{i}", "", [], None, 0, 0, error=str(e))
        bar = Progress(len(pending), desc, "request", progress)
        while pending and self.has_unfinished():
            for out in self.step():
                if out.request_id not in pending:
                    continue
                i, text, ids, logprobs, prompt_logprobs = pending[out.request_id]
                text.append(out.text)
                ids += out.token_ids
                logprobs += out.logprobs or []
                if out.prompt_logprobs is not None:
                    prompt_logprobs[0] = out.prompt_logprobs
                if out.finished:
                    del pending[out.request_id]
                    results[i] = Completion(out.request_id, "".join(text), ids, out.finish_reason, out.prompt_tokens,
                                            out.completion_tokens, out.cached_tokens,
                                            logprobs if params[i] and params[i].logprobs is not None else None,
                                            out.stop_string, out.error, out.stop_token_id, prompt_logprobs[0])
                    bar.update()
        bar.close()
        for request_id, (i, text, ids, _, _) in pending.items():  # aborted meanwhile (a signal handler, say)
            results[i] = Completion(request_id, "".join(text), ids, "abort", 0, len(ids))
        return results

