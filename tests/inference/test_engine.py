"""The generation engine: the paged cache's logits equal a full forward, greedy tokens do not depend on the
batch, prefixes are reused, a full pool preempts instead of failing, and bad requests are refused alone."""

from __future__ import annotations

import math

import pytest
import torch

from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import RequestError
from astrai_ds.inference.block_manager import BlockManager
from astrai_ds.inference.engine import EngineConfig, LLMEngine
from astrai_ds.inference.model_runner import ModelRunner
from astrai_ds.inference.sampling import SamplingParams
from astrai_ds.inference.scheduler import Scheduler
from astrai_ds.inference.sequence import Sequence
from astrai_ds.model import ModelConfig, Transformer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def tiny_model(vocab_size: int = 512, max_seq_len: int = 128, **over) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                      max_seq_len=max_seq_len, **over)
    # A large init makes a random model's argmax depend strongly on the context, so a cache bug changes
    # the tokens instead of hiding behind a near-constant prediction.
    cfg.init_std = 0.2
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer(workspace) -> Tokenizer:
    return Tokenizer.load(workspace / "tokenizer")


def random_ids(n: int, seed: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(16, vocab, (n,), generator=g).tolist()


def teacher_forced_logits(model, sequences: list[tuple[list[int], list[int]]], budget: int, block_size: int = 8,
                          num_blocks: int = 64, staggered: bool = False) -> tuple[list[list[torch.Tensor]], list]:
    """Run (prompt, continuation) pairs through scheduler + runner, feeding the continuation instead of sampling;
    returns each sequence's logits at every sampled position, and the sequences. With `staggered`, each
    sequence joins only after the previous one finished its prompt (so it can hit the prefix cache)."""
    blocks = BlockManager(num_blocks, block_size)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=budget)
    runner = ModelRunner(model, num_blocks, block_size)
    seqs = [Sequence(f"s{i}", p, SamplingParams(max_new_tokens=len(c) + 1), frozenset(), 10_000)
            for i, (p, c) in enumerate(sequences)]
    queue = list(seqs)
    logits: dict[str, list[torch.Tensor]] = {s.request_id: [] for s in seqs}
    scheduler.add(queue.pop(0))
    while scheduler.has_unfinished() or queue:
        if queue and (not staggered or not scheduler.waiting and all(s.num_computed >= len(s.prompt_ids)
                                                                      for s in scheduler.running)):
            scheduler.add(queue.pop(0))
        scheduled = scheduler.schedule()
        out = runner.run(scheduled)
        scheduler.advance(scheduled)
        for s, row in zip([s for s in scheduled if s.samples], out):
            seq = s.seq
            logits[seq.request_id].append(row)
            continuation = sequences[int(seq.request_id[1:])][1]
            if len(seq.output_ids) == len(continuation):
                scheduler.finish(seq, "length")
            else:
                seq.output_ids.append(continuation[len(seq.output_ids)])
    return [logits[s.request_id] for s in seqs], seqs


def full_logits(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        return model(ids)[0, len(prompt) - 1:].float()  # (len(continuation) + 1, vocab)


@pytest.mark.parametrize("case", ["single", "batch", "same_length", "chunk_beside_prompt", "chunked", "prefix"])
def test_cache_logits_equal_full_forward(model, case):
    if case == "single":
        sequences, budget = [(random_ids(21, 1), random_ids(6, 2))], 512
    elif case == "batch":
        sequences, budget = [(random_ids(n, n), random_ids(5, n + 100)) for n in (3, 30, 17, 1, 44)], 512
    elif case == "same_length":  # prompts of one length attend as one group (a GRPO group's copies)
        sequences, budget = [(random_ids(12, n), random_ids(5, n + 100)) for n in range(4)], 512
    elif case == "chunk_beside_prompt":  # step 2: the first's last 8 (8 cached) and the second's 8 in one group
        sequences, budget = [(random_ids(24, 1), random_ids(4, 101)), (random_ids(8, 2), random_ids(4, 102))], 16
    elif case == "chunked":  # long prompts prefilled 7 tokens per step, beside decodes
        sequences, budget = [(random_ids(n, n), random_ids(4, n + 100)) for n in (50, 9, 33)], 7
    else:  # the second and third share the first one's first 40 tokens
        shared = random_ids(40, 7)
        sequences = [(shared + random_ids(5, 8), random_ids(4, 9)), (shared + random_ids(9, 10), random_ids(4, 11)),
                     (shared, random_ids(4, 12))]
        budget = 512
    got, seqs = teacher_forced_logits(model, sequences, budget, staggered=case == "prefix")
    for (prompt, continuation), rows in zip(sequences, got):
        want = full_logits(model, prompt, continuation)
        assert len(rows) == len(want)
        torch.testing.assert_close(torch.stack(rows), want, rtol=0, atol=1e-5)
    if case == "prefix":
        assert [s.num_cached for s in seqs] == [0, 40, 32]  # 5 blocks of 8; the whole prompt is never reused


def test_greedy_tokens_alone_equal_inside_a_mixed_batch(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_batched_tokens=24, block_size=8))
    prompts = [random_ids(n, n) for n in (5, 37, 12, 60, 2)]
    alone = [engine.generate(p, GREEDY).token_ids for p in prompts]
    # The same prompts among sampled requests of other lengths, chunked prefills and a 24-token step budget.
    mixed = prompts[:2] + [random_ids(25, 99)] + prompts[2:] + [random_ids(9, 98)]
    params = [GREEDY, GREEDY, SamplingParams(temperature=1.0, max_new_tokens=20, seed=3)] + [GREEDY] * 3 + \
             [SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, seed=4)]
    together = engine.generate_batch(mixed, params)
    assert [c.token_ids for i, c in enumerate(together) if i not in (2, 6)] == alone
    assert sum(len(ids) for ids in alone) >= 40 and len({tuple(ids) for ids in alone}) == len(alone), alone


def uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: a full forward over the whole sequence for every new token, argmax of the last position."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_engine_equals_the_uncached_forward(model, tokenizer):
    engine = LLMEngine(model, tokenizer)
    prompts = [random_ids(n, n + 50) for n in (4, 19, 33)]
    reference = [uncached_greedy(model, p, 10) for p in prompts]
    assert [c.token_ids for c in engine.generate_batch(prompts, SamplingParams(temperature=0, max_new_tokens=10))] \
        == reference
    assert not any(t in engine.stop_ids for ids in reference for t in ids)  # all 10 tokens were really compared


def test_sequence_logprob_equals_manual(model):
    from astrai_ds.inference.evaluate import sequence_logprob

    prompt, completion = [5, 17, 42], [7, 99, 3]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + completion])).float()[0], dim=-1)
    manual = sum(float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(completion))
    assert sequence_logprob(model, prompt, completion) == pytest.approx(manual, abs=1e-5)
    assert sequence_logprob(model, prompt, []) == 0.0
    with pytest.raises(ValueError):
        sequence_logprob(model, [], [1])


def test_seeded_sampling_does_not_depend_on_the_batch(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=15, seed=1234)
    alone = engine.generate(random_ids(10, 5), params).token_ids
    batch = engine.generate_batch([random_ids(30, 6), random_ids(10, 5), random_ids(3, 7)],
                                  [SamplingParams(temperature=1.0, max_new_tokens=9), params,
                                   SamplingParams(temperature=0.5, max_new_tokens=20, seed=1)])
    assert batch[1].token_ids == alone
    assert engine.generate(random_ids(10, 5), SamplingParams(temperature=1.0, top_k=50, max_new_tokens=15,
                                                              seed=99)).token_ids != alone


def test_prefix_reuse_skips_the_shared_prefill(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=16))
    system = random_ids(100, 21)
    first = engine.generate(system + random_ids(7, 22), GREEDY)
    second = engine.generate(system + random_ids(7, 23), GREEDY)
    again = engine.generate(system + random_ids(7, 22), GREEDY)
    assert first.cached_tokens == 0 and second.cached_tokens == 96 and again.cached_tokens == 96
    assert again.token_ids == first.token_ids


def test_copies_of_a_prompt_added_together_prefill_its_blocks_once(model, tokenizer):
    """A GRPO group or a request's n choices: the first copy computes the shared full blocks, the others wait one
    step and start after them from the prefix cache; another prompt is not held back; greedy tokens are those of
    the prompt alone."""
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    prompt, other = random_ids(30, 21), random_ids(30, 22)
    ids = [engine.add_request(prompt, GREEDY) for _ in range(4)] + [engine.add_request(other, GREEDY)]
    first = engine.scheduler.schedule()
    assert [(s.seq.request_id, s.num_new) for s in first] == [(ids[0], 30), (ids[4], 30)]
    engine.runner.run(first)
    engine.scheduler.advance(first)
    for s in first:  # as step() would: the sampled token, so that the next schedule decodes
        s.seq.output_ids.append(7)
    second = engine.scheduler.schedule()
    assert sorted((s.seq.request_id, s.num_new) for s in second) == sorted(
        [(ids[0], 1), (ids[4], 1)] + [(i, 30 - 24) for i in ids[1:4]])  # 3 blocks of 8 cached, 6 tokens to go
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    out = engine.generate_batch([prompt] * 4 + [other], GREEDY)
    assert [c.cached_tokens for c in out] == [0, 24, 24, 24, 0]
    alone = LLMEngine(model, tokenizer).generate(prompt, GREEDY).token_ids
    assert all(c.token_ids == alone for c in out[:4])


def test_a_full_pool_preempts_and_still_finishes_every_request(model, tokenizer):
    prompts = [random_ids(n, n + 7) for n in (30, 41, 25, 50, 12, 36)]
    params = SamplingParams(temperature=0, max_new_tokens=30)
    roomy = LLMEngine(model, tokenizer).generate_batch(prompts, params)
    tight = LLMEngine(model, tokenizer, EngineConfig(block_size=8, kv_cache_tokens=128))  # one context's worth
    assert [c.token_ids for c in tight.generate_batch(prompts, params)] == [c.token_ids for c in roomy]
    assert tight.scheduler.num_preemptions > 0
    assert tight.blocks.num_free_blocks == tight.blocks.num_blocks


def test_a_full_pool_counts_each_request_once_in_the_metrics(model, tokenizer):
    """While the pool is full the head of the queue is looked up again every step; the prefix hit rate counts
    it once, when it is admitted, and preemptions are a Prometheus counter."""
    from prometheus_client.parser import text_string_to_metric_families

    from astrai_ds.serve.metrics import ServeMetrics

    prompts = [random_ids(n, n + 7) for n in (30, 41, 25, 50, 12, 36)]
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, kv_cache_tokens=128))
    metrics = ServeMetrics()
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=30))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        metrics.observe_engine(engine)
        steps += 1
    admissions = len(prompts) + engine.scheduler.num_preemptions  # a preempted request is admitted again
    assert engine.scheduler.num_preemptions > 0 and steps > admissions
    assert engine.blocks.stats["prefix_query_tokens"] < sum(map(len, prompts)) + 30 * admissions
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples["astrai_preemptions_total"] == engine.scheduler.num_preemptions


def test_stream_and_generate_batch_have_the_engine_to_themselves(model, tokenizer):
    """stream() and generate_batch() read every output of each step: with another caller's request unfinished
    they would swallow its outputs, so they refuse to start; a request of theirs aborted meanwhile ends them."""
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    other = engine.add_request(random_ids(10, 1), GREEDY)
    with pytest.raises(RequestError, match="use add_request"):
        list(engine.stream(random_ids(10, 2), GREEDY))
    with pytest.raises(RequestError, match="use add_request"):
        engine.generate_batch([random_ids(10, 2)], GREEDY)
    engine.abort(other)
    stream = engine.stream(random_ids(10, 2), SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))
    next(stream)
    engine.abort(engine.unfinished_ids()[0])  # from elsewhere (a signal handler): the loop ends, not spins
    assert list(stream) == [] and not engine.has_unfinished()


def test_abort_frees_the_blocks_at_once(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    ids = [engine.add_request(random_ids(40, i), SamplingParams(temperature=0, max_new_tokens=50)) for i in range(3)]
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    for request_id in ids:
        engine.abort(request_id)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.has_unfinished()


def test_stream_yields_the_same_text_as_generate(model, tokenizer):
    engine = LLMEngine(model, tokenizer)
    params = SamplingParams(temperature=0, max_new_tokens=20)
    pieces = list(engine.stream("12 + 30 = ", params))
    whole = engine.generate("12 + 30 = ", params)
    assert "".join(p.text for p in pieces) == whole.text
    assert pieces[-1].finished and pieces[-1].finish_reason == whole.finish_reason == "length"
    assert sum(len(p.token_ids) for p in pieces) == whole.completion_tokens == 20


def test_context_end_stops_with_length(tokenizer):
    engine = LLMEngine(tiny_model(max_seq_len=32), tokenizer)
    out = engine.generate(random_ids(28, 3), SamplingParams(temperature=0, max_new_tokens=100))
    assert out.finish_reason == "length" and out.prompt_tokens + out.completion_tokens == 32


def test_bad_requests_are_refused_alone(model, tokenizer):
    engine = LLMEngine(model, tokenizer)
    with pytest.raises(RequestError, match="the prompt is 200 tokens.*context is 128"):
        engine.add_request(random_ids(200, 1), GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request([5, 9999], GREEDY)
    with pytest.raises(RequestError, match="prompt must be"):
        engine.add_request([], GREEDY)
    out = engine.generate_batch([random_ids(5, 1), random_ids(500, 2), random_ids(6, 3)], GREEDY)
    assert out[1].error and "500 tokens" in out[1].error and not out[1].token_ids
    assert out[0].token_ids == engine.generate(random_ids(5, 1), GREEDY).token_ids and len(out[2].token_ids) == 12
    assert not engine.has_unfinished()


def _failing_params() -> SamplingParams:
    """Parameters whose sampling raises (torch.multinomial on NaN probabilities): validation cannot catch
    every failure, so the engine must survive one."""
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1)
    params.temperature = math.nan
    return params


def test_a_request_whose_sampling_fails_ends_alone_and_the_engine_goes_on(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    alone = engine.generate(random_ids(12, 5), GREEDY)
    out = engine.generate_batch([random_ids(20, 4), random_ids(12, 5)], [_failing_params(), GREEDY])
    assert out[0].finish_reason == "error" and "sampling failed" in out[0].error and not out[0].token_ids
    assert out[1].error is None and out[1].token_ids == alone.token_ids  # its neighbour is untouched
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.has_unfinished()
    assert engine.generate(random_ids(12, 5), GREEDY).token_ids == alone.token_ids


def test_the_cli_names_a_failed_request_in_one_line(model, tokenizer):
    """`generate --prompt`, `chat` and `rag ask` stream through stream_to: a failed request is a UserError (one
    line; chat goes on to its next turn), and the engine serves the next prompt."""
    from astrai_ds.cli.model_commands import stream_to
    from astrai_ds.errors import UserError

    engine = LLMEngine(model, tokenizer)
    with pytest.raises(UserError, match="the generation failed: sampling failed"):
        stream_to(None, engine, random_ids(12, 5), _failing_params())
    assert stream_to(None, engine, random_ids(12, 5), GREEDY)["finish_reason"] in ("stop", "length")


def test_the_server_thread_survives_a_failing_request(model, tokenizer):
    """The server's engine thread: the failing request's caller gets RequestFailed, its neighbour its tokens,
    and the engine stays alive for the next request."""
    import asyncio

    from astrai_ds.serve.async_engine import AsyncEngine, RequestFailed

    engine = AsyncEngine(LLMEngine(model, tokenizer, EngineConfig(block_size=8)))
    engine.start()

    async def run(request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
        queue = asyncio.Queue()
        await engine.add([(request_id, prompt, params)], queue)
        return [t async for out in engine.outputs(queue, [request_id]) for t in out.token_ids]

    async def main():
        return await asyncio.gather(run("bad", random_ids(20, 4), _failing_params()),
                                    run("good", random_ids(12, 5), GREEDY), return_exceptions=True)

    try:
        bad, good = asyncio.run(main())
        assert isinstance(bad, RequestFailed) and "sampling failed" in str(bad)
        alone = LLMEngine(model, tokenizer).generate(random_ids(12, 5), GREEDY).token_ids
        assert good == alone and engine.alive
        assert asyncio.run(run("next", random_ids(12, 5), GREEDY)) == alone
    finally:
        engine.stop(30)


def test_the_choices_of_one_request_reach_the_engine_together(model, tokenizer, monkeypatch):
    """The n choices of one HTTP request are one command batch: the engine takes them in the same iteration, so
    they start in the same step, even when the engine thread takes commands while they are being queued (a slow
    queue here; they were once queued one by one and could be split)."""
    import asyncio
    import queue
    import time

    from astrai_ds.serve import async_engine
    from astrai_ds.serve.async_engine import AsyncEngine, _Add

    class SlowQueue(queue.Queue):
        def put(self, item, *args, **kwargs):
            super().put(item, *args, **kwargs)
            time.sleep(0.05)  # the engine thread takes what is there meanwhile

    batches = []
    apply = async_engine.apply_commands
    monkeypatch.setattr(async_engine, "apply_commands", lambda engine, commands, *a: (
        batches.append([c.request_id for c in commands if isinstance(c, _Add)]), apply(engine, commands, *a))[1])
    server = AsyncEngine(LLMEngine(model, tokenizer, EngineConfig(block_size=8)))
    server._commands = SlowQueue()
    server.start()
    ids = [f"choice-{i}" for i in range(4)]

    async def main():
        outputs = asyncio.Queue()
        await server.add([(i, random_ids(12, 5), GREEDY) for i in ids], outputs)
        return [out async for out in server.outputs(outputs, ids)]

    try:
        asyncio.run(main())
    finally:
        server.stop(30)
    assert [b for b in batches if b] == [ids]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread's own error
def test_a_request_queued_while_the_engine_dies_is_refused_not_left_waiting(model, tokenizer, monkeypatch):
    """The race between queuing a command and the engine's death: a request queued while the model step is
    failing (the thread is alive, so the check passes) gets EngineDead once the thread ends, instead of waiting
    for an engine that will never take it; the running request gets EngineDead too, and a request after the
    death is refused at once. The step is held on an event, so the order is fixed, not left to timing."""
    import asyncio
    import threading

    from astrai_ds.serve.async_engine import AsyncEngine, EngineDead

    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    in_step, release = threading.Event(), threading.Event()

    def failing_step():
        in_step.set()
        release.wait(30)
        raise RuntimeError("the model step failed")

    monkeypatch.setattr(engine, "step", failing_step)
    server = AsyncEngine(engine)
    server.start()

    async def main():
        running = asyncio.Queue()
        await server.add([("running", random_ids(12, 5), GREEDY)], running)
        await asyncio.to_thread(in_step.wait, 30)
        assert server.alive  # the thread is inside its failing step: the check before queuing passes
        late = asyncio.ensure_future(server.add([("late", random_ids(12, 6), GREEDY)], asyncio.Queue()))
        await asyncio.sleep(0.1)
        assert not late.done()  # queued, waiting for the engine to take it
        release.set()
        with pytest.raises(EngineDead, match="the engine failed"):
            await asyncio.wait_for(late, 30)
        with pytest.raises(EngineDead, match="the engine failed"):
            await asyncio.wait_for(anext(server.outputs(running, ["running"])), 30)
        assert not server.alive
        with pytest.raises(EngineDead, match="the engine stopped"):
            await server.add([("after", random_ids(12, 7), GREEDY)], asyncio.Queue())

    try:
        asyncio.run(main())
    finally:
        release.set()
        server.stop(30)


def test_a_newcomer_is_prefilled_in_the_next_step_beside_the_running_decodes():
    """The step budget goes to the running decodes (one token each) and then to waiting prompts: a request that
    arrives while others decode starts its prefill in the very next step, its long prompt cut into chunks that
    share each step with the decodes, which never pause; requests beyond the budget wait for the next step."""
    blocks = BlockManager(64, 8)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=32)

    def seq(name: str, n: int) -> Sequence:  # prompts with nothing in common: no prefix-cache hits
        return Sequence(name, random_ids(n, sum(map(ord, name))), SamplingParams(max_new_tokens=50), frozenset(),
                        10_000)

    def step() -> dict[str, int]:
        scheduled = scheduler.schedule()
        scheduler.advance(scheduled)
        for s in scheduled:
            if s.samples:
                s.seq.output_ids.append(7)
        return {s.seq.request_id: s.num_new for s in scheduled}

    for name in ("a", "b", "c"):
        scheduler.add(seq(name, 8))
    assert step() == {"a": 8, "b": 8, "c": 8}
    assert step() == {"a": 1, "b": 1, "c": 1}  # decoding
    scheduler.add(seq("long", 70))
    scheduler.add(seq("next", 10))
    assert step() == {"a": 1, "b": 1, "c": 1, "long": 29}  # at once, beside the decodes, cut to the budget
    assert step() == {"a": 1, "b": 1, "c": 1, "long": 29}
    assert step() == {"a": 1, "b": 1, "c": 1, "long": 12, "next": 10}  # the rest, and the next one joins
    assert step() == {"a": 1, "b": 1, "c": 1, "long": 1, "next": 1}


def test_a_large_embeddings_request_runs_in_slices_between_generation_steps(model, tokenizer, monkeypatch):
    """The server's engine thread embeds a large request a slice at a time, with generation steps in between, so
    that running streams are not stalled for the whole request; the slices' vectors equal one batch's."""
    import asyncio

    import numpy as np

    from astrai_ds.inference.embed import Embedder
    from astrai_ds.serve.async_engine import EMBED_SLICE_TOKENS, AsyncEngine, _slices

    events = []
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (events.append("step"), step())[1])
    embed_ids = Embedder.embed_ids
    monkeypatch.setattr(Embedder, "embed_ids", lambda self, ids, progress=None: (
        events.append("embed"), embed_ids(self, ids, progress))[1])
    inputs = [random_ids(20, seed) for seed in range(100)]  # 2,000 tokens: several slices
    server = AsyncEngine(engine)
    server.start()

    async def main():
        queue = asyncio.Queue()
        await server.add([("gen", random_ids(12, 5), SamplingParams(max_new_tokens=60, ignore_eos=True))], queue)
        vectors = await server.embed(inputs)
        tokens = [t async for out in server.outputs(queue, ["gen"]) for t in out.token_ids]
        return vectors, tokens

    try:
        vectors, tokens = asyncio.run(main())
    finally:
        server.stop(30)
    assert len(tokens) == 60
    embeds = [i for i, e in enumerate(events) if e == "embed"]
    assert len(embeds) == len(_slices(inputs, EMBED_SLICE_TOKENS)) > 2, events
    assert all("step" in events[a:b] for a, b in zip(embeds, embeds[1:])), events  # a step between two slices
    np.testing.assert_allclose(vectors, embed_ids(Embedder(model, tokenizer), inputs), atol=1e-5)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tokenizer):
    with pytest.raises(RequestError, match="tokenizer has 512 tokens but the model only 256"):
        LLMEngine(tiny_model(vocab_size=256), tokenizer)


def test_logprobs_are_the_full_forwards_log_softmax(model, tokenizer):
    engine = LLMEngine(model, tokenizer)
    prompt = random_ids(13, 4)
    out = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=6, logprobs=3, ignore_eos=True))
    logp = torch.log_softmax(full_logits(model, prompt, out.token_ids)[:-1], dim=-1)  # (6, vocab)
    assert [e["token_id"] for e in out.logprobs] == out.token_ids
    for row, entry in zip(logp, out.logprobs):
        assert entry["logprob"] == pytest.approx(float(row[entry["token_id"]]), abs=1e-5)
        top = row.topk(3)
        assert [t for t, _ in entry["top_logprobs"]] == top.indices.tolist()
        assert [lp for _, lp in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_prompt_logprobs_are_the_full_forwards_log_softmax_in_chunks_and_past_the_prefix_cache(model, tokenizer):
    """Every prompt token after the first gets its log-prob given the tokens before it and the top-N there, from a
    prefill cut into chunks and batched with another prompt, although the prompt's blocks are in the prefix cache."""
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, max_num_batched_tokens=16))
    prompt = random_ids(40, 6)
    assert engine.generate(prompt, GREEDY).completion_tokens > 0  # the prompt's blocks are cached now
    params = SamplingParams(temperature=0, max_new_tokens=3, prompt_logprobs=3, ignore_eos=True)
    prompts = [prompt, prompt[:30]]
    outs = engine.generate_batch(prompts, params)
    for p, out in zip(prompts, outs):
        assert out.cached_tokens == 0 and len(out.prompt_logprobs) == len(p) and out.prompt_logprobs[0] is None
        logp = torch.log_softmax(full_logits(model, p[:1], p[1:])[:-1], dim=-1)  # row i predicts p[i + 1]
        for row, token, entry in zip(logp, p[1:], out.prompt_logprobs[1:]):
            assert entry["token_id"] == token
            assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-5)
            top = row.topk(3)
            assert [t for t, _ in entry["top_logprobs"]] == top.indices.tolist()
            assert [lp for _, lp in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    alone = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    assert alone.token_ids == outs[0].token_ids and alone.cached_tokens == 32 and alone.prompt_logprobs is None
    zero = engine.generate(prompt, SamplingParams(max_new_tokens=1, prompt_logprobs=0)).prompt_logprobs
    assert [e["logprob"] for e in zero[1:]] == [e["logprob"] for e in outs[0].prompt_logprobs[1:]]
    assert all(e["top_logprobs"] == [] for e in zero[1:])


def test_a_request_for_its_prompt_alone_scores_it_and_generates_nothing(model, tokenizer):
    """max_new_tokens 0 (what /v1/completions' max_tokens 0 asks): the prompt's log-probs, as a generating request gets
    them, and no token sampled ("length", nothing in the output), in a batch whose other request generates what it
    generates alone; a prompt as long as the whole context fits, as no token follows it."""
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, max_num_batched_tokens=16))
    prompts = [random_ids(40, 6), random_ids(17, 9)]
    scored = engine.generate_batch(prompts, SamplingParams(max_new_tokens=1, prompt_logprobs=2))
    greedy = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    alone, other = engine.generate_batch(prompts, [SamplingParams(max_new_tokens=0, prompt_logprobs=2), greedy])
    assert alone.prompt_logprobs == scored[0].prompt_logprobs and len(alone.prompt_logprobs) == 40
    assert (alone.token_ids, alone.text, alone.finish_reason, alone.completion_tokens) == ([], "", "length", 0)
    assert other.token_ids == engine.generate(prompts[1], greedy).token_ids
    whole = random_ids(engine.max_context, 3)
    out = engine.generate(whole, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    assert len(out.prompt_logprobs) == engine.max_context and out.token_ids == []
    with pytest.raises(RequestError, match=f"at most {engine.max_context - 1} tokens"):
        engine.add_request(whole, SamplingParams(max_new_tokens=1))


def test_a_preempted_prompt_is_scored_once(model, tokenizer):
    """A pool too small for both requests preempts the second in the middle of its prompt (24 of its 100 tokens
    scored); its log-probs still have one entry per prompt token, equal to the full forward's."""
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, kv_cache_tokens=128, max_num_batched_tokens=64))
    prompts = [random_ids(40, 7), random_ids(100, 8)]
    outs = engine.generate_batch(prompts, SamplingParams(temperature=0, max_new_tokens=8, prompt_logprobs=1,
                                                         ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    for p, out in zip(prompts, outs):
        logp = torch.log_softmax(full_logits(model, p[:1], p[1:])[:-1], dim=-1)
        assert [e["token_id"] for e in out.prompt_logprobs[1:]] == p[1:]
        assert [e["logprob"] for e in out.prompt_logprobs[1:]] == pytest.approx(
            logp.gather(1, torch.tensor(p[1:])[:, None])[:, 0].tolist(), abs=1e-5)


def test_the_stop_token_that_ends_a_request_is_listed_in_its_logprobs(model, tokenizer):
    engine = LLMEngine(model, tokenizer)
    prompt = random_ids(9, 5)
    free = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True,
                                                  logprobs=2))
    engine.stop_ids = frozenset({free.token_ids[5]})  # as if the sixth greedy token were <eos>
    stopped = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12, logprobs=2))
    assert stopped.token_ids == free.token_ids[:5] and stopped.stop_token_id == free.token_ids[5]
    assert stopped.logprobs == free.logprobs[:6]  # the five tokens, then the stop token's entry


def test_ignore_eos_keeps_going_past_the_stop_tokens(model, tokenizer):
    engine = LLMEngine(model, tokenizer)
    prompt = random_ids(9, 5)
    free = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)).token_ids
    engine.stop_ids = frozenset({free[5]})  # as if the sixth greedy token were <eos>
    stopped = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12))
    assert stopped.token_ids == free[:free.index(free[5])] and stopped.finish_reason == "stop"
    kept = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    assert kept.token_ids == free and len(free) == 12 and kept.finish_reason == "length"
    extra = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True,
                                                   stop_token_ids=[free[3]]))
    assert extra.token_ids == free[:free.index(free[3])]  # a request's own stop ids still count
