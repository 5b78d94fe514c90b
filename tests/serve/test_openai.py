"""The official `openai` client against a real server: what it sends is served, what the server sends it
parses, and every answer equals what the engine gives the same request in this process (greedy, fp32)."""

from __future__ import annotations

import openai
import pytest
import torch

from astrai_ds.inference.sampling import SamplingParams

CHAT = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "请用中文介绍一下北京。"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client, model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [model_dir.name]
    assert client.models.retrieve(model_dir.name).id == model_dir.name


def test_chat_equals_the_engine(client, engine, model_dir):
    r = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=24, temperature=0)
    expected = engine.generate(CHAT, SamplingParams(max_new_tokens=24, temperature=0))
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == {"length": "length", "stop": "stop"}[expected.finish_reason]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == model_dir.name


def test_a_chinese_stream_reassembles_exactly(client, model_dir):
    kwargs = dict(model=model_dir.name, messages=CHAT, max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == whole
    assert len(deltas) > 5  # streamed piece by piece, not in one chunk
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(c.choices[0].finish_reason is not None for c in chunks) == 1
    assert chunks[-1].choices[0].finish_reason is not None
    assert all(c.usage is None for c in chunks)  # no usage chunk without stream_options


def test_stream_usage_comes_last_with_no_choices(client, model_dir):
    chunks = list(client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.usage.total_tokens == last.usage.prompt_tokens + 8
    assert all(c.usage is None and len(c.choices) == 1 for c in body)


def test_completions_echo_and_list_prompts(client, engine, model_dir):
    prompts = ["The capital of France is", "北京是"]
    r = client.completions.create(model=model_dir.name, prompt=prompts, max_tokens=10, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    for prompt, choice in zip(prompts, r.choices):
        expected = engine.generate(prompt, SamplingParams(max_new_tokens=10, temperature=0))
        assert choice.text == prompt + expected.text
    ids = engine.encode("Hello")  # token ids are a prompt too
    r = client.completions.create(model=model_dir.name, prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == engine.generate(ids, SamplingParams(max_new_tokens=5, temperature=0)).text
    assert r.usage.prompt_tokens == len(ids)


def test_completion_default_max_tokens_is_16(client, engine, model_dir):
    r = client.completions.create(model=model_dir.name, prompt="Once upon a time", temperature=0)
    expected = engine.generate("Once upon a time", SamplingParams(max_new_tokens=16, temperature=0))
    assert (r.choices[0].text, r.usage.completion_tokens) == (expected.text, expected.completion_tokens)


def test_n_choices_have_their_index_and_a_seed_reproduces(client, model_dir):
    kwargs = dict(model=model_dir.name, messages=CHAT, max_tokens=12, temperature=1.0, n=3, seed=1234)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # the choices are different samples
    assert 3 <= a.usage.completion_tokens <= 36  # the three choices' tokens
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in a.choices]
    assert sum(c.finish_reason is not None for chunk in streamed for c in chunk.choices) == 3


def test_stop_strings_cut_the_text_and_are_not_returned(client, engine, model_dir):
    greedy = engine.generate(CHAT, SamplingParams(max_new_tokens=30, temperature=0)).text
    stop = greedy[8:10]
    assert stop.strip(), greedy
    r = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].message.content == greedy[:greedy.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=30, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy[:greedy.index(stop)]


def test_logprobs(client, engine, model_dir):
    r = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    expected = engine.generate(CHAT, SamplingParams(max_new_tokens=6, temperature=0, logprobs=3))
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e["logprob"] for e in expected.logprobs], abs=1e-5)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", errors="replace") == \
        r.choices[0].message.content
    # completions: each token's text, log-prob, top alternatives and character offset, as the engine has them
    for prompt in ("Hello", "天气很好"):
        r = client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
        lp = r.choices[0].logprobs
        params = SamplingParams(max_new_tokens=8, temperature=0, logprobs=2)
        outs = list(engine.stream(prompt, params))
        entries = [e for o in outs for e in o.logprobs or []]

        def text(token_id):
            return engine.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

        assert lp.tokens == [text(e["token_id"]) for e in entries]
        assert lp.token_logprobs == pytest.approx([e["logprob"] for e in entries], abs=1e-5)
        assert [list(t) for t in lp.top_logprobs] == [[text(i) for i, _ in e["top_logprobs"]] for e in entries]
        assert [list(t.values()) for t in lp.top_logprobs] == [
            pytest.approx([v for _, v in e["top_logprobs"]], abs=1e-5) for e in entries]
        offsets, pos = [], 0
        for o in outs:  # one token per output: its offset is the length of the text before its output
            offsets += [pos] * len(o.token_ids)
            pos += len(o.text)
        assert lp.text_offset == offsets and r.choices[0].text == "".join(o.text for o in outs)


def _full_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, vocab): row i is the in-process full forward's log-softmax that predicts ids[i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(engine.model(torch.tensor([ids]))[0, :-1].float(), dim=-1)


def _text(engine, token_id: int) -> str:
    return engine.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def test_echo_with_logprobs_scores_the_prompt_as_log_likelihood_evaluations_ask(client, engine, model_dir):
    """lm-evaluation-harness's request: token ids, echo, logprobs 1, max_tokens 1. Every prompt token is listed
    (the first with null), each with its log-prob given the tokens before it, then the generated token."""
    ids = engine.encode(CHAT)  # special tokens and Chinese characters split across byte-level tokens
    r = client.completions.create(model=model_dir.name, prompt=ids, max_tokens=1, logprobs=1, echo=True,
                                  temperature=0, seed=1234)
    lp, choice = r.choices[0].logprobs, r.choices[0]
    expected = engine.generate(ids, SamplingParams(max_new_tokens=1, temperature=0, logprobs=1))
    full = _full_logprobs(engine, ids)
    n = len(ids)
    assert lp.tokens == [_text(engine, t) for t in ids + expected.token_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n] == pytest.approx(full.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(),
                                                   abs=1e-5)
    assert lp.token_logprobs[n] == pytest.approx(expected.logprobs[0]["logprob"], abs=1e-5)
    for row, top in zip(full, lp.top_logprobs[1:n]):  # the top-1 alternative at each position
        assert list(top) == [_text(engine, int(row.argmax()))] and list(top.values()) == pytest.approx(
            [float(row.max())], abs=1e-5)
    echo = b"".join(engine.tokenizer.token_bytes(t) for t in ids).decode("utf-8", errors="replace")
    assert "<|im_start|>" in echo and choice.text == echo + expected.text
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == len(echo)
    assert lp.text_offset == sorted(lp.text_offset)
    ascii_ = [k for k in range(n - 1) if lp.tokens[k].isascii() and lp.tokens[k + 1].isascii()]
    assert ascii_ and all(lp.text_offset[k + 1] - lp.text_offset[k] == len(lp.tokens[k]) for k in ascii_)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n, 1)

    # max_tokens 0 scores the prompt alone; a text prompt is echoed as sent, its <bos> listed first
    r0 = client.completions.create(model=model_dir.name, prompt=ids, max_tokens=0, logprobs=1, echo=True)
    assert r0.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n] and r0.choices[0].text == echo
    assert (r0.choices[0].finish_reason, r0.usage.completion_tokens) == ("length", 0)
    text = "The capital of France is"
    rt = client.completions.create(model=model_dir.name, prompt=text, max_tokens=0, logprobs=0, echo=True)
    bos = engine.encode(text)
    assert rt.choices[0].text == text and rt.choices[0].logprobs.tokens == [_text(engine, t) for t in bos]
    assert rt.choices[0].logprobs.text_offset[:2] == [0, 0] and rt.choices[0].logprobs.top_logprobs[1] == {}
    # a prompt as long as the whole context is scored too: no token is generated after it
    whole = (ids * (engine.max_context // n + 1))[:engine.max_context]
    rw = client.completions.create(model=model_dir.name, prompt=whole, max_tokens=0, logprobs=0, echo=True)
    assert len(rw.choices[0].logprobs.token_logprobs) == engine.max_context and rw.usage.completion_tokens == 0


def _prompt_whose_next_token_stops(engine) -> tuple[list[int], int]:
    """A prompt whose greedy next token is a stop token (<eos> or <|im_end|>), found among one-token extensions
    of short random prompts, and that stop token."""
    g = torch.Generator().manual_seed(0)
    stops = sorted(engine.stop_ids)
    vocab = engine.model.cfg.vocab_size
    for _ in range(20):
        head = torch.randint(16, vocab, (6,), generator=g)
        batch = torch.cat([head.expand(vocab, 6), torch.arange(vocab)[:, None]], dim=1)  # head + every token
        with torch.no_grad():
            nxt = engine.model(batch)[:, -1].argmax(-1)
        hits = torch.isin(nxt, torch.tensor(stops)).nonzero()
        if len(hits):
            row = int(hits[0])
            return batch[row].tolist(), int(nxt[row])
    raise AssertionError("no prompt found whose greedy next token is a stop token")


def test_a_stop_token_generated_is_listed_in_the_logprobs(client, engine, model_dir):
    """The one token lm-eval's request generates may be <|im_end|> or <eos>: it is listed all the same (its
    `[ctxlen:-1]` slice drops the last entry), at the end of the text, which does not hold it."""
    ids, stop = _prompt_whose_next_token_stops(engine)
    r = client.completions.create(model=model_dir.name, prompt=ids, max_tokens=1, logprobs=1, echo=True,
                                  temperature=0)
    lp, n = r.choices[0].logprobs, len(ids)
    assert len(lp.tokens) == n + 1 and lp.tokens[n] == _text(engine, stop)
    assert lp.token_logprobs[n] == pytest.approx(float(_full_logprobs(engine, ids + [stop])[-1, stop]), abs=1e-5)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 0
    assert lp.text_offset[n] == len(r.choices[0].text)
    plain = client.completions.create(model=model_dir.name, prompt=ids, max_tokens=4, logprobs=1, temperature=0)
    assert plain.choices[0].text == "" and plain.choices[0].logprobs.tokens == [_text(engine, stop)]
    chat = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=4, temperature=0,
                                          logprobs=True)  # a chat's logprobs stay its content's tokens
    assert "".join(c.token for c in chat.choices[0].logprobs.content) == chat.choices[0].message.content


def test_prompt_scoring_refusals(client, model_dir, server):
    ids = list(range(20, 40))
    cases = [(dict(prompt=ids, echo=True, logprobs=21, max_tokens=1), "logprobs"),
             (dict(prompt=list(range(20, 160)), echo=True, logprobs=1, max_tokens=1), "context is 128"),
             (dict(prompt=ids, max_tokens=0), "'max_tokens' 0"),
             (dict(prompt=ids, echo=True, logprobs=1, max_tokens=1, stream=True), "without 'stream'")]
    for kwargs, fragment in cases:
        with pytest.raises(openai.BadRequestError, match=fragment):
            client.completions.create(model=model_dir.name, **kwargs)
    r = client.completions.create(model=model_dir.name, prompt=ids, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens > 0  # nothing else affected


def test_errors_are_the_clients_exception_types(client, model_dir):
    with pytest.raises(openai.BadRequestError, match="unsupported field 'tools'"):
        client.chat.completions.create(model=model_dir.name, messages=CHAT,
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match=r"the prompt is \d+ tokens.*context is 128") as e:
        client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "hello " * 300}])
    assert e.value.code == "context_length_exceeded"  # OpenAI's code: what the chat page trims the turns on
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.chat.completions.create(model=model_dir.name, messages=CHAT, stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model_dir.name, messages=CHAT, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    try:
        client.chat.completions.create(model=model_dir.name, messages=CHAT, logit_bias={"1": 5})
    except openai.BadRequestError as e:
        assert e.body["param"] == "logit_bias" and e.body["type"] == "invalid_request_error"
    else:
        raise AssertionError("logit_bias was accepted")
