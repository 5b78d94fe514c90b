"""`serve --rag-index`: `/v1/embeddings` gives the in-process embeddings, and the `<name>-rag` model answers
from retrieved chunks (the same prompt and answer as `rag ask`'s code in this process) and returns them as
`sources`."""

from __future__ import annotations

import json

import base64

import httpx2 as httpx
import numpy as np
import openai
import pytest
import torch

from astrai_ds.cli.main import main
from astrai_ds.inference.embed import Embedder
from astrai_ds.inference.engine import LLMEngine
from astrai_ds.inference.sampling import SamplingParams
from astrai_ds.model.io import load_model_folder
from astrai_ds.rag.answer import fit_prompt

QUESTION = "What is the capital of Vela?"


@pytest.fixture(scope="module")
def model_dir(long_model_dir):
    """A 512-token context: room for the chunks in the prompt."""
    return long_model_dir


@pytest.fixture(scope="module")
def engine(long_model_dir):
    model, tokenizer = load_model_folder(long_model_dir, dtype=torch.float32)
    return LLMEngine(model, tokenizer)


@pytest.fixture(scope="module")
def client(rag_server):
    return openai.OpenAI(base_url=f"{rag_server[0].url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_rag_model(client, model_dir):
    assert [m.id for m in client.models.list().data] == [model_dir.name, f"{model_dir.name}-rag"]


def test_embeddings_equal_the_in_process_ones(client, model_dir):
    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    texts = ["Vela exports glass.", "银湾市"]
    expected = Embedder(model, tokenizer)(texts)
    r = client.embeddings.create(model=model_dir.name, input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == sum(
        len(Embedder(model, tokenizer).encode(t)) for t in texts)
    raw = client.embeddings.create(model=model_dir.name, input="Vela exports glass.", encoding_format="float")
    np.testing.assert_allclose(raw.data[0].embedding, expected[0], atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="unsupported field 'dimensions'"):
        client.embeddings.create(model=model_dir.name, input="x", dimensions=8)
    # base64 on the wire: little-endian float32, decoded here rather than by the client
    r = httpx.post(f"{client.base_url}embeddings", json={"input": texts, "encoding_format": "base64"}, timeout=60)
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
    np.testing.assert_allclose(decoded, expected, atol=1e-5)


def test_a_large_embeddings_request_beside_a_stream(client, rag_server, model_dir):
    """500 inputs while a stream generates: the vectors equal the in-process ones, and the stream goes on. Prints
    the longest pause of the stream meanwhile (measured, not asserted; tests/inference/test_engine.py checks that
    the slices run between engine steps)."""
    import threading
    import time

    texts = [f"Vela exports glass, item {i}." for i in range(500)]
    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    expected = Embedder(model, tokenizer)(texts)
    stamps, span = [], []
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0}

    def stream():
        with httpx.stream("POST", f"{client.base_url}completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())

    reader = threading.Thread(target=stream)
    reader.start()
    while len(stamps) < 5:
        time.sleep(0.01)
    span.append(time.perf_counter())
    r = client.embeddings.create(model=model_dir.name, input=texts, encoding_format="float")
    span.append(time.perf_counter())
    reader.join()
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), expected, atol=1e-5)
    assert len(stamps) > 100  # every token (bar a character's continuation bytes) came
    during = [t for t in stamps if span[0] < t < span[1]]
    gaps = np.diff([span[0], *during, span[1]])
    print(f"embeddings of 500 inputs: {span[1] - span[0]:.2f} s, {len(during)} stream chunks meanwhile, "
          f"longest gap between them {gaps.max():.3f} s")


def test_the_rag_model_keeps_the_conversation(client, rag_server, engine, model_dir):
    """A multi-turn request to the RAG model: the earlier turns are in the prompt with the retrieved chunks (they
    were once added after the chunks were fitted to the question alone), and a conversation too long for all of
    it keeps the best chunk and drops its oldest turns first."""
    from astrai_ds.rag.answer import grounded_chat

    _, index = rag_server
    turns = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi! Ask me about Vela."},
             {"role": "user", "content": QUESTION}]
    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    hits = index.search(QUESTION, Embedder(model, tokenizer), tokenizer, 5, "hybrid")
    messages, used = grounded_chat(engine, turns, [h.chunk for h in hits], 64)
    assert [m["content"] for m in messages[1:3]] == [t["content"] for t in turns[:2]]
    r = client.chat.completions.create(model=f"{model_dir.name}-rag", temperature=0, max_tokens=64, messages=turns)
    assert r.usage.prompt_tokens == len(engine.encode(messages))
    assert [s["text"] for s in r.model_extra["sources"]] == [c["text"] for c in used]
    assert r.choices[0].message.content == engine.generate(messages, SamplingParams(max_new_tokens=64,
                                                                                    temperature=0)).text
    # 40 earlier turns cannot all fit in 512 tokens: the best chunk stays, the oldest turns go
    long = [{"role": r_, "content": f"Turn {i}: tell me more about the world."} for i in range(40)
            for r_ in ("user", "assistant")] + [turns[-1]]
    r = client.chat.completions.create(model=f"{model_dir.name}-rag", temperature=0, max_tokens=64, messages=long)
    assert r.usage.prompt_tokens + 64 <= 512 and r.model_extra["sources"], r.usage
    prompt, kept = grounded_chat(engine, long, [h.chunk for h in hits], 64)
    assert len(kept) == 1 and prompt[1]["role"] == "user" and "Turn 39" in prompt[-2]["content"]
    assert "Turn 0:" not in json.dumps(prompt) and r.usage.prompt_tokens == len(engine.encode(prompt))
    # a one-word question with nearly the whole context asked for the answer names max_tokens, not the question
    with pytest.raises(openai.BadRequestError, match="lower max_tokens to at most"):
        client.chat.completions.create(model=f"{model_dir.name}-rag", max_tokens=500,
                                       messages=[{"role": "user", "content": "Vela?"}])


def test_the_rag_model_answers_from_retrieved_chunks(client, rag_server, engine, model_dir):
    _, index = rag_server
    r = client.chat.completions.create(model=f"{model_dir.name}-rag", temperature=0,
                                       messages=[{"role": "user", "content": QUESTION}])
    sources = r.model_extra["sources"]
    assert sources and [s["index"] for s in sources] == list(range(1, len(sources) + 1))
    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    hits = index.search(QUESTION, Embedder(model, tokenizer), tokenizer, 5, "hybrid")
    messages, used = fit_prompt(engine, QUESTION, [h.chunk for h in hits], 512 // 4)
    assert [s["text"] for s in sources] == [c["text"] for c in used]
    expected = engine.generate(messages, SamplingParams(max_new_tokens=128, temperature=0))
    assert r.choices[0].message.content == expected.text and r.model == f"{model_dir.name}-rag"
    # a client's system message is kept, after the grounding instructions
    system = "Answer in one short sentence."
    r = client.chat.completions.create(model=f"{model_dir.name}-rag", temperature=0,
                                       messages=[{"role": "system", "content": system},
                                                 {"role": "user", "content": QUESTION}])
    merged = [{"role": "system", "content": f"{messages[0]['content']}\n\n{system}"}, *messages[1:]]
    assert r.usage.prompt_tokens == len(engine.encode(merged))
    assert r.choices[0].message.content == engine.generate(merged, SamplingParams(max_new_tokens=128,
                                                                                  temperature=0)).text
    chunks = list(client.chat.completions.create(model=f"{model_dir.name}-rag", temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": QUESTION}]))
    assert chunks[0].model_extra["sources"] == sources
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    import httpx2 as httpx

    r = httpx.post(f"{rag_server[0].url}/v1/messages", json={"model": f"{model_dir.name}-rag", "max_tokens": 5,
                                                              "messages": [{"role": "user", "content": QUESTION}]})
    assert r.status_code == 400 and "answers on /v1/chat/completions" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="answers chat completions"):
        client.completions.create(model=f"{model_dir.name}-rag", prompt=QUESTION)


def test_an_index_of_another_model_stops_serve(model_dir, tmp_path, capsys, workspace):
    from astrai_ds.data.tokenizer import Tokenizer
    from astrai_ds.model.io import save_model_folder
    from conftest import tiny_model

    other_dir = save_model_folder(tiny_model(workspace, 512, seed=7), Tokenizer.load(workspace / "tokenizer"),
                                  tmp_path / "other")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("Kiro is a river.\n")
    assert main(["rag", "index", "--docs", str(tmp_path / "d"), "--model", str(other_dir), "--out",
                 str(tmp_path / "i"), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main(["serve", "--model", str(model_dir), "--rag-index", str(tmp_path / "i"), "--port", "8999"]) == 2
    assert "was built with another model" in capsys.readouterr().err


def test_a_lone_surrogate_is_a_400_naming_its_field_on_every_route(rag_server, model_dir):
    """"\\ud800" in any text field (JSON allows the escape; no tokenizer can encode it) is a 400 naming the field,
    on every route and the -rag model, and the keep-alive connection serves the next request."""
    import httpx2 as httpx

    bad = "\ud800 hi"
    cases = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": bad}], "max_tokens": 2},
         "messages.0.content"),
        ("/v1/chat/completions", {"model": f"{model_dir.name}-rag", "max_tokens": 2,
                                  "messages": [{"role": "user", "content": bad}]}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": bad}]}]},
         "messages.0.content.0.text"),
        ("/v1/completions", {"prompt": bad, "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop": [bad], "max_tokens": 2}, "stop.0"),
        ("/v1/messages", {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": bad}]},
         "messages.0.content"),
        ("/v1/messages", {"model": "m", "max_tokens": 2, "system": bad, "messages": [{"role": "user", "content": "x"}]},
         "system"),
        ("/v1/embeddings", {"input": ["fine", bad]}, "input.1"),
    ]
    with httpx.Client(base_url=rag_server[0].url, timeout=60) as client:
        for route, body, field in cases:
            r = client.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400, (route, r.text)
            error = r.json()["error"]
            assert "lone surrogate" in error["message"] and f"'{field}'" in error["message"], (route, error)
            ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert ok.status_code == 200, ok.text  # the same connection goes on
