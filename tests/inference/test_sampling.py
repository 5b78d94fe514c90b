"""The sampler: each transform against a hand computation, per-request seeds, log-probs, validation."""

import json
import math

import pytest
import torch

from astrai_ds.errors import RequestError
from astrai_ds.inference.sampling import (SamplingParams, apply_penalties, filter_logits, make_generator,
                                          sample)

PROBS = [0.05, 0.5, 0.15, 0.3]  # token 1 > 3 > 2 > 0, deliberately not in id order
LOGITS = torch.tensor(PROBS).log()


def draw(logits: torch.Tensor, p: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """n draws from one row of logits, as n rows sharing one generator."""
    g = make_generator(seed)
    rows = logits.expand(n, -1)
    return [r.token_id for r in sample(rows, [p] * n, [g] * n, [[]] * n, [[]] * n)]


def kept(p: SamplingParams, logits: torch.Tensor = LOGITS) -> set[int]:
    x, order = filter_logits(logits / p.temperature, p)
    return set(order[x.isfinite()].tolist())


def test_greedy_is_argmax_of_the_logits():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [SamplingParams(temperature=0.0)] * 5, [None] * 5, [[]] * 5, [[]] * 5)
    assert [r.token_id for r in out] == logits.argmax(-1).tolist()
    assert all(r.logprob is None and r.top_logprobs is None for r in out)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_follow_the_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    tokens = draw(logits, SamplingParams(temperature=temperature), 4000)
    freq = torch.bincount(torch.tensor(tokens), minlength=5).float() / len(tokens)
    want = (logits / temperature).softmax(-1)
    assert (freq - want).abs().max() < 0.025, (freq, want)


def test_top_k_keeps_exactly_k():
    assert kept(SamplingParams(top_k=2)) == {1, 3}
    assert kept(SamplingParams(top_k=1)) == {1}
    assert kept(SamplingParams(top_k=10)) == {0, 1, 2, 3}
    x, _ = filter_logits(torch.zeros(8), SamplingParams(top_k=3))  # all tied: still exactly 3
    assert x.isfinite().sum() == 3
    assert set(draw(LOGITS, SamplingParams(top_k=2), 500)) == {1, 3}


@pytest.mark.parametrize("top_p, want", [(0.4, {1}), (0.75, {1, 3}), (0.85, {1, 3, 2}), (0.99, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_with_enough_mass(top_p, want):
    assert kept(SamplingParams(top_p=top_p)) == want
    assert set(draw(LOGITS, SamplingParams(top_p=top_p), 500)) == want


def test_top_p_sees_the_top_k_survivors_renormalised():
    # After top-k=2 the mass is {1: 0.625, 3: 0.375}; 0.625 alone reaches 0.6 (of the raw probs it would not).
    assert kept(SamplingParams(top_k=2, top_p=0.6)) == {1}
    assert kept(SamplingParams(top_p=0.6)) == {1, 3}


@pytest.mark.parametrize("min_p, want", [(0.05, {0, 1, 2, 3}), (0.25, {1, 2, 3}), (0.5, {1, 3}), (1.0, {1})])
def test_min_p_drops_tokens_below_a_fraction_of_the_best(min_p, want):
    assert kept(SamplingParams(min_p=min_p)) == want
    assert set(draw(LOGITS, SamplingParams(min_p=min_p), 500)) == want


def test_temperature_applies_before_the_filters():
    # At temperature 2 the probs flatten to sqrt(p) renormalised: token 3 alone no longer reaches 0.75 with 1.
    flat = torch.tensor(PROBS).sqrt() / torch.tensor(PROBS).sqrt().sum()
    assert flat[1] + flat[3] < 0.75 < flat[1] + flat[3] + flat[2]
    assert kept(SamplingParams(temperature=2.0, top_p=0.75)) == {1, 2, 3}


LOGITS10 = torch.tensor([1.5, -2.0, 0.7, -0.3, 2.2, -0.9, 0.0, 3.0, -0.6, 0.4])  # touched ids: both signs
PROMPT, OUTPUT = [1, 2, 2, 9], [2, 3, 3, 3, 5]


def hand_penalised(rep=1.0, presence=0.0, frequency=0.0) -> list[float]:
    x = LOGITS10.tolist()
    for t in set(PROMPT) | set(OUTPUT):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(OUTPUT):
        x[t] -= frequency * OUTPUT.count(t) + presence
    return x


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.3), dict(repetition_penalty=0.8),
                                dict(presence_penalty=0.5), dict(frequency_penalty=-0.7),
                                dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)])
def test_penalties_change_exactly_the_logits_they_should(kw):
    names = {"repetition_penalty": "rep", "presence_penalty": "presence", "frequency_penalty": "frequency"}
    want = torch.tensor(hand_penalised(**{names[k]: v for k, v in kw.items()}))
    logits = torch.stack([LOGITS10, LOGITS10])
    got = apply_penalties(logits, [SamplingParams(**kw), SamplingParams()], [PROMPT, PROMPT], [OUTPUT, OUTPUT])
    assert torch.allclose(got[0], want, atol=1e-6)
    changed = set((got[0] != LOGITS10).nonzero().flatten().tolist())
    touched = set(PROMPT + OUTPUT) if "repetition_penalty" in kw else set(OUTPUT)
    assert changed == touched
    assert torch.equal(got[1], LOGITS10)  # the other row's params are its own
    assert torch.equal(logits[0], LOGITS10)  # the input is not modified


def test_greedy_uses_the_penalised_logits():
    p = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    assert sample(LOGITS10[None], [p], [None], [[]], [[7]])[0].token_id == 4  # 7 (3.0 - 2) falls below 4 (2.2)


def rows_over_steps(params: list[SamplingParams], steps: int = 20) -> list[list[int]]:
    """Tokens of each row over `steps` calls; the logits of row i at step s depend only on (i's params, s)."""
    gens = [make_generator(p.seed) if not p.greedy else None for p in params]
    outputs = [[] for _ in params]
    for s in range(steps):
        logits = torch.stack([torch.randn(64, generator=torch.Generator().manual_seed(1000 * s + (p.seed or 0)))
                              for p in params])
        for out, r in zip(outputs, sample(logits, params, gens, [[1, 2]] * len(params), outputs)):
            out.append(r.token_id)
    return outputs


def test_same_seed_same_tokens_alone_or_in_any_batch():
    me = SamplingParams(temperature=0.9, top_p=0.9, frequency_penalty=0.3, seed=123)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=5, seed=7),
              SamplingParams(temperature=0.7, min_p=0.1, seed=99, logprobs=3)]
    alone = rows_over_steps([me])[0]
    assert rows_over_steps([others[0], me, others[1]])[1] == alone
    assert rows_over_steps(others + [me, me])[3:] == [alone, alone]  # two requests with one seed agree too
    assert rows_over_steps([SamplingParams(temperature=0.9, top_p=0.9, frequency_penalty=0.3, seed=124)])[0] \
        != alone


def test_make_generator_is_reproducible():
    a, b = make_generator(5), make_generator(5)
    assert torch.equal(torch.rand(10, generator=a), torch.rand(10, generator=b))
    c, d = make_generator(None), make_generator(None)  # fresh random seeds
    assert not torch.equal(torch.rand(10, generator=c), torch.rand(10, generator=d))


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=5),
              SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=0), SamplingParams()]
    out = sample(logits, params, [make_generator(0), None, make_generator(1)], [[1, 2, 3]] * 3, [[4, 5]] * 3)
    raw = logits.log_softmax(-1)
    for row in range(2):
        assert out[row].logprob == pytest.approx(float(raw[row, out[row].token_id]), abs=1e-6)
    top = raw[0].topk(5)
    assert [t for t, _ in out[0].top_logprobs] == top.indices.tolist()
    assert [v for _, v in out[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out[1].top_logprobs == []
    assert out[2].logprob is None and out[2].top_logprobs is None


@pytest.mark.parametrize("kw, field", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-1, prompt_logprobs=0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=math.nan), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=1e-300), "repetition_penalty"),
    (dict(repetition_penalty=1e300), "repetition_penalty"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(stop=[1]), "stop"), (dict(stop=[""]), "stop"),
    (dict(stop=None), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids="2"), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"), (dict(seed=-1), "seed"), (dict(seed=1.0), "seed"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(logprobs=False), "logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"), (dict(prompt_logprobs=1.0), "prompt_logprobs"),
])
def test_invalid_field_names_itself_and_the_value(kw, field):
    with pytest.raises(RequestError) as e:
        SamplingParams(**kw)
    msg = str(e.value)
    assert msg.startswith(f"{field} must be ") and repr(kw[field]) in msg, msg


def test_top_p_message():
    with pytest.raises(RequestError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)


def test_from_dict_and_to_dict():
    p = SamplingParams.from_dict({"temperature": 0, "top_p": 0.9, "stop": "\n\n", "seed": 3, "logprobs": 2})
    assert p.stop == ["\n\n"] and p.temperature == 0.0 and p.greedy
    assert SamplingParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(RequestError, match="unknown sampling parameter.*'top_q'.*'n'"):
        SamplingParams.from_dict({"top_q": 0.9, "n": 2})
    with pytest.raises(RequestError, match="must be an object"):
        SamplingParams.from_dict([("top_p", 0.9)])


def test_rows_must_line_up():
    with pytest.raises(ValueError, match="2 rows of logits but 1 params"):
        sample(torch.zeros(2, 4), [SamplingParams()], [None, None], [[], []], [[], []])


@pytest.mark.parametrize("kw", [dict(top_p=1e-300), dict(top_p=1e-300, top_k=3), dict(min_p=1.0),
                                dict(repetition_penalty=0.01), dict(repetition_penalty=100.0)])
def test_edge_values_still_sample_a_token(kw):
    """A top_p below float32's range (it rounds to 0) keeps the most likely token instead of none, and the
    repetition penalty's bounds keep the logits finite: every edge draws a token instead of raising."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 20
    params = SamplingParams(temperature=1.0, **kw)
    (result,) = sample(logits, [params], [make_generator(0)], [[1, 2, 3]], [[4]])
    if "top_p" in kw or "min_p" in kw:
        assert result.token_id == int(logits[0].argmax())  # only the most likely token is left
    assert 0 <= result.token_id < 50


def test_a_failing_row_ends_alone_and_its_neighbours_draw_what_they_draw_alone():
    """A row whose probabilities are NaN (a NaN temperature) and a row whose penalties raise (a token id past
    the vocabulary: the batch is retried row by row) each fail alone; the rows beside them draw the tokens
    they draw without them, from the same generator states."""
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    nan = SamplingParams(temperature=1.0)
    nan.temperature = math.nan  # past validation, as a bug elsewhere could leave it
    good = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.0, top_p=0.9, seed=2)]
    alone = [sample(logits[i:i + 1], [p], [make_generator(p.seed)], [[1]], [[2]])[0].token_id
             for i, p in zip((0, 2), good)]
    for bad, prompt in ((nan, [1]), (SamplingParams(temperature=1.0, repetition_penalty=1.2), [10**6])):
        out = sample(logits[:3], [good[0], bad, good[1]], [make_generator(1), make_generator(9), make_generator(2)],
                     [[1], prompt, [1]], [[2], [2], [2]])
        assert out[1].token_id == -1 and out[1].error.startswith("sampling failed")
        assert [out[0].token_id, out[2].token_id] == alone and out[0].error is None is out[2].error


def test_tokens_without_probability_are_never_drawn():
    """The inverse CDF lands on a token with probability: -inf logits (and top-k's cut) are never picked, even
    by draws that round up to the distribution's total."""
    logits = torch.tensor([[0.0, 1.0, -math.inf, 2.0, -math.inf, -math.inf]]).expand(3000, -1)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=5.0, top_k=2)] * 1500
    tokens = torch.tensor([r.token_id for r in sample(logits, params, [make_generator(0)] * 3000, [[]] * 3000,
                                                       [[]] * 3000)])
    assert set(tokens[0::2].tolist()) == {0, 1, 3} and set(tokens[1::2].tolist()) == {1, 3}
    from astrai_ds.inference.sampling import _inverse_cdf

    cdf, total, finite, last = _inverse_cdf(logits[:1])
    assert last.tolist() == [3] and finite.all() and cdf[0, 3] == total[0]
