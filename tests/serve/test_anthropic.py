"""The official `anthropic` client against `/v1/messages` of a real server: plain and streamed messages (the
client's own event parser and `get_final_message()`), stop sequences, max_tokens, and errors as its exception
types. Answers equal the engine's for the same chat (greedy, fp32)."""

from __future__ import annotations

import anthropic
import pytest

from astrai_ds.inference.sampling import SamplingParams

SYSTEM = "You are a helpful assistant."
MESSAGES = [{"role": "user", "content": "What is the capital of France? 请回答。"}]
CHAT = [{"role": "system", "content": SYSTEM}, *MESSAGES]
GREEDY = {"temperature": 0}  # the client has no sampling arguments any more; the API field is still served


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def test_a_message_equals_the_engine(client, engine, model_dir):
    m = client.messages.create(model=model_dir.name, system=SYSTEM, messages=MESSAGES, max_tokens=20,
                               extra_body=GREEDY)
    expected = engine.generate(CHAT, SamplingParams(max_new_tokens=20, temperature=0))
    assert m.content[0].type == "text" and m.content[0].text == expected.text
    assert m.role == "assistant" and m.model == model_dir.name and m.id.startswith("msg_")
    assert m.stop_reason == ("max_tokens" if expected.finish_reason == "length" else "end_turn")
    assert (m.usage.input_tokens, m.usage.output_tokens) == (expected.prompt_tokens, expected.completion_tokens)


def test_a_stream_parses_and_gives_the_same_message(client, model_dir):
    kwargs = dict(model=model_dir.name, system=[{"type": "text", "text": SYSTEM}], messages=MESSAGES,
                  max_tokens=30, extra_body=GREEDY)
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(deltas) == whole.content[0].text == final.content[0].text
    assert len(deltas) > 3
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    events = [e.type for e in client.messages.create(**kwargs, stream=True)]
    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[2:-3]) == {"content_block_delta"}


def test_stop_sequences_and_max_tokens(client, engine, model_dir):
    greedy = engine.generate(CHAT, SamplingParams(max_new_tokens=30, temperature=0)).text
    stop = greedy[6:8]
    assert stop.strip(), greedy
    m = client.messages.create(model=model_dir.name, system=SYSTEM, messages=MESSAGES, max_tokens=30,
                               extra_body=GREEDY,
                               stop_sequences=["never-generated-zzz", stop])
    assert m.content[0].text == greedy[:greedy.index(stop)]
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)
    with client.messages.stream(model=model_dir.name, system=SYSTEM, messages=MESSAGES, max_tokens=30,
                                extra_body=GREEDY, stop_sequences=[stop]) as s:
        final = s.get_final_message()
    assert (final.content[0].text, final.stop_reason, final.stop_sequence) == (greedy[:greedy.index(stop)],
                                                                                 "stop_sequence", stop)
    m = client.messages.create(model=model_dir.name, messages=MESSAGES, max_tokens=3, extra_body=GREEDY)
    assert (m.stop_reason, m.usage.output_tokens) == ("max_tokens", 3)


def test_errors_are_the_clients_exception_types(client, model_dir):
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model=model_dir.name, messages=MESSAGES, max_tokens=0)
    with pytest.raises(anthropic.BadRequestError, match="unsupported field 'tools'"):
        client.messages.create(model=model_dir.name, messages=MESSAGES, max_tokens=5,
                               tools=[{"name": "f", "input_schema": {"type": "object"}}])
    with pytest.raises(anthropic.BadRequestError, match=r"the prompt is \d+ tokens"):
        client.messages.create(model=model_dir.name, messages=[{"role": "user", "content": "hello " * 300}],
                               max_tokens=5)
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-model", messages=MESSAGES, max_tokens=5)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"


def test_count_tokens_equals_the_input_tokens_of_the_message(client, model_dir):
    system = "You are brief."
    count = client.messages.count_tokens(model=model_dir.name, messages=MESSAGES, system=system)
    m = client.messages.create(model=model_dir.name, messages=MESSAGES, system=system, max_tokens=1,
                               extra_body=GREEDY)
    assert count.input_tokens == m.usage.input_tokens > 0
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=MESSAGES)
