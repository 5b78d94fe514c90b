"""Compiled decode steps (`EngineConfig.compile`): greedy tokens and log-probs equal the eager engine's in both
graphs, one sequence and a batch of any size (fp32), another model gets its own graphs, a model updated in place is read
as it is now where its weights are not frozen, and a step that cannot compile runs eager after one line (in GRPO's
rollouts, one line for the run, not one per rollout)."""

from __future__ import annotations

import types

import pytest
import torch

from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.inference import compiled_decode
from astrai_ds.inference.engine import EngineConfig, LLMEngine
from astrai_ds.inference.sampling import SamplingParams
from tests.inference.test_engine import random_ids, tiny_model


@pytest.fixture(scope="module")
def tokenizer(workspace) -> Tokenizer:
    return Tokenizer.load(workspace / "tokenizer")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True, logprobs=2)


def run(model, tokenizer, prompts, params, **config) -> tuple[list, LLMEngine]:
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, max_num_seqs=4, **config))
    return engine.generate_batch(prompts, params), engine


def assert_same(compiled, eager):
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    for c, e in zip(compiled, eager):
        assert [t["token_id"] for t in c.logprobs] == [t["token_id"] for t in e.logprobs]
        torch.testing.assert_close(torch.tensor([t["logprob"] for t in c.logprobs]),
                                   torch.tensor([t["logprob"] for t in e.logprobs]), rtol=0, atol=1e-4)


def test_compiled_steps_give_the_eager_tokens_and_logprobs_for_one_sequence_and_for_batches(tokenizer):
    model = tiny_model()
    # Three requests that end at different steps: decode batches of 3 and 2 (one graph), then 1 (the other).
    prompts = [random_ids(5, 1), random_ids(17, 2), random_ids(30, 3)]
    params = [greedy(20), greedy(12), greedy(6)]
    eager, _ = run(model, tokenizer, prompts, params)
    compiled, engine = run(model, tokenizer, prompts, params, compile=True)
    assert engine.runner.compiled.failed is None
    assert engine.runner.compiled.seen == {"batch", "one"}
    assert engine.runner.compiled.steps == 19  # every step after the one that prefilled all three
    assert_same(compiled, eager)
    assert len({tuple(c.token_ids) for c in eager}) == 3


def test_each_model_gets_its_own_frozen_graphs(tokenizer):
    prompt, params = [random_ids(9, 4)], [greedy(10)]
    first, second = tiny_model(), tiny_model()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    run(first, tokenizer, prompt, params, compile=True)  # its graph for one sequence exists now
    compiled, engine = run(second, tokenizer, prompt, params, compile=True)
    eager, _ = run(second, tokenizer, prompt, params)
    assert engine.runner.compiled.steps == 9
    assert_same(compiled, eager)
    assert compiled[0].token_ids != run(first, tokenizer, prompt, params)[0][0].token_ids


def test_a_model_updated_in_place_is_read_as_it_is_now_when_not_frozen(tokenizer):
    """GRPO's rollout copy: one model object, its weights overwritten between engines."""
    model = tiny_model()
    prompt, params = [random_ids(12, 5)], [greedy(10)]
    before, _ = run(model, tokenizer, prompt, params, compile=True, frozen_weights=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    after, engine = run(model, tokenizer, prompt, params, compile=True, frozen_weights=False)
    eager, _ = run(model, tokenizer, prompt, params)
    assert engine.runner.compiled.steps == 9
    assert_same(after, eager)
    assert after[0].token_ids != before[0].token_ids


def test_a_step_that_cannot_compile_decodes_eager_after_one_line(tokenizer, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("inductor found no C++ compiler\nand more lines")

    monkeypatch.setitem(compiled_decode._COMPILED, True, broken)
    model = tiny_model()
    prompts, params = [random_ids(7, 6), random_ids(3, 7)], [greedy(8), greedy(5)]
    got, engine = run(model, tokenizer, prompts, params, compile=True)
    eager, _ = run(model, tokenizer, prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in eager]
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "compile: the decode step could not be compiled (RuntimeError: inductor found no C++ compiler); " \
           "decoding eager" in err
    assert engine.runner.compiled.steps == 0


@pytest.mark.parametrize("templates_only", [False, True])
def test_one_sequence_that_cannot_compile_says_so_in_one_line(tokenizer, monkeypatch, capsys, templates_only):
    """The one-sequence graph is compiled with GEMM templates first: when only they fail, it is compiled without
    them (one line), and when compiling fails anyway, the engine decodes eager (one line too)."""
    import torch._inductor.config

    real = compiled_decode._compiled(True)

    def failing(*args):
        if torch._inductor.config.max_autotune or not templates_only:
            raise RuntimeError("no template for this CPU\nand more lines")
        return real(*args)

    monkeypatch.setitem(compiled_decode._COMPILED, True, failing)
    model = tiny_model()
    got, engine = run(model, tokenizer, [random_ids(7, 6)], [greedy(6)], compile=True)
    eager, _ = run(model, tokenizer, [random_ids(7, 6)], [greedy(6)])
    assert [c.token_ids for c in got] == [c.token_ids for c in eager]
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    if templates_only:
        assert "could not be compiled with GEMM templates (RuntimeError: no template for this CPU); compiled " \
               "without them" in err and engine.runner.compiled.steps > 0
    else:
        assert "decoding eager" in err and engine.runner.compiled.steps == 0


def test_the_compile_option_falls_back_to_eager_in_one_line(monkeypatch, capsys):
    import astrai_ds.extensions as extensions
    from astrai_ds.cli.model_commands import compile_decode

    assert compile_decode(types.SimpleNamespace(compile=False)) is False
    assert compile_decode(types.SimpleNamespace(compile=True), tp=2) is False
    assert "compile: not with --tp" in capsys.readouterr().err
    monkeypatch.setattr(extensions, "missing_cpp_compiler", lambda: "RuntimeError")
    assert compile_decode(types.SimpleNamespace(compile=True)) is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no C++ compiler for torch.compile on this CPU (RuntimeError); decoding eager" in err
    monkeypatch.setattr(extensions, "missing_cpp_compiler", lambda: None)
    assert compile_decode(types.SimpleNamespace(compile=True)) is True
    assert "compile on their first use" in capsys.readouterr().err


def test_warm_up_compiles_both_graphs_and_leaves_the_engine_as_it_was(tokenizer):
    model = tiny_model()
    sampled = SamplingParams(temperature=1.0, max_new_tokens=6)  # no seed: the engine's seeds draw it
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, compile=True, seed=3))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine.warm_up()
    assert engine.runner.compiled.seen == {"one", "batch"} and engine.runner.compiled.failed is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2  # no graph for a 1-token context
    assert not engine.has_unfinished() and engine.blocks.num_free_blocks == engine.blocks.num_blocks
    cold = LLMEngine(model, tokenizer, EngineConfig(block_size=8, seed=3))
    prompt = random_ids(10, 8)
    assert engine.generate(prompt, sampled).token_ids == cold.generate(prompt, sampled).token_ids


@pytest.mark.parametrize("why", ["graph", "no compiler"])
def test_grpo_rollouts_that_cannot_compile_say_so_once_and_stop_trying(tokenizer, monkeypatch, capsys, why):
    """GRPO builds an engine per rollout: a graph that failed to compile in one rollout is not tried again in the
    next (one line in all), and a CPU without a C++ compiler is said once, before the first rollout."""
    import astrai_ds.extensions as extensions
    from astrai_ds.config.train import GRPOConfig, LoraConfig
    from astrai_ds.training.distributed import DistInfo
    from astrai_ds.training.rollout import RolloutBatches

    tries = []

    def broken(*args):
        tries.append(1)
        raise RuntimeError("inductor found no C++ compiler\nand more lines")

    monkeypatch.setitem(compiled_decode._COMPILED, False, broken)
    monkeypatch.setattr(extensions, "missing_cpp_compiler", lambda: "CalledProcessError" if why == "no compiler"
                        else None)
    grpo = GRPOConfig(group_size=2, max_new_tokens=4, compile_rollouts=True)
    cfg = types.SimpleNamespace(grpo=grpo, seed=0, data=types.SimpleNamespace(seq_len=64, shuffle=False),
                                lora=LoraConfig(), fused_loss=True)
    prompts = [random_ids(5, seed) for seed in range(4)]
    batches = RolloutBatches(types.SimpleNamespace(device=torch.device("cpu")), None, tokenizer, [{}] * 4, prompts,
                             cfg, 4, 1, DistInfo(0, 1, 0, 1), [], "prompts.jsonl")
    model = tiny_model().requires_grad_(False)
    for rollout in range(2):
        batches.rollouts = rollout
        assert len(batches._generate(model, [0, 1])) == 4
    said = capsys.readouterr()
    lines = (said.out + said.err).strip().splitlines()
    assert len(lines) == 1, lines
    if why == "graph":
        assert "the decode step could not be compiled (RuntimeError: inductor found no C++ compiler)" in said.err
        assert len(tries) == 1
    else:
        assert "no C++ compiler for torch.compile on this CPU (CalledProcessError); rollouts decode eager" in said.out
        assert not tries
    assert batches.compile is False
