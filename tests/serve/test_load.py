"""Many clients at once: 16 concurrent streaming clients send 400 requests of random prompts and lengths, some
leaving early; every completed answer equals the same request sent alone (greedy, fp32: continuous batching
changes nothing), nothing fails, and no KV block stays in use. Then SIGTERM under load: the running requests
finish, new ones get 503, and the server exits 0."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time

import httpx2 as httpx
import pytest

from tests.serve.conftest import Server, wait_idle

PROMPTS = [f"Question {i}: {q}" for i, q in enumerate([
    "what is a dragon?", "写一首关于秋天的诗。", "How do rivers form?", "介绍一下长城。", "Count to ten.",
    "What is 3.5 plus 2?", "北京和上海哪个大？", "Explain gravity simply.", "讲一个笑话。", "Why is the sky blue?",
    "列出三种水果。", "What is DeepSpeed?", "翻译：good morning", "Name a prime number.", "描述一只猫。",
    "What do bees make?", "为什么要学习？", "Define entropy.", "天气怎么样？", "Say hello in French.",
])]
LENGTHS = (1, 8, 24, 48)


def _body(prompt: str, max_tokens: int, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


async def _stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, leave_after: int | None):
    """(text, finish_reason) of a streamed chat completion; None when the client left after `leave_after` events."""
    text, finish = [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=_body(prompt, max_tokens, True)) as r:
        assert r.status_code == 200, await r.aread()
        events = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if leave_after is not None and events > leave_after:
                return None
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


@pytest.mark.multiproc  # slow: 400 requests from 16 clients
def test_sixteen_clients_four_hundred_requests(server):
    alone = {}
    for prompt in PROMPTS:
        for n in LENGTHS:
            r = httpx.post(f"{server.url}/v1/chat/completions", json=_body(prompt, n, False), timeout=60).json()
            alone[prompt, n] = (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"])

    rng = random.Random(0)
    jobs = [(rng.choice(PROMPTS), rng.choice(LENGTHS), rng.randrange(1, 6) if rng.random() < 0.15 else None)
            for _ in range(400)]

    async def run():
        queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        results = []

        async def client_loop():
            async with httpx.AsyncClient(timeout=120) as client:
                while not queue.empty():
                    prompt, n, leave = queue.get_nowait()
                    results.append(((prompt, n, leave), await _stream(client, server.url, prompt, n, leave)))

        await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(16))), timeout=600)
        return results

    results = asyncio.run(run())
    assert len(results) == 400
    completed = [(key, got) for key, got in results if got is not None]
    assert len(completed) >= 300
    mismatched = [(key, got, alone[key[:2]]) for key, got in completed if got != alone[key[:2]]]
    assert not mismatched, mismatched[:3]
    m = wait_idle(server)
    assert m["astrai_kv_cache_blocks_used"] == 0 and m["astrai_requests_running"] == 0, m
    assert m["astrai_prefix_cache_hit_rate"] > 0  # the same prompts came back: their blocks were reused


def test_sigterm_finishes_running_requests_refuses_new_ones_and_exits_0(model_dir, tmp_path):
    s = Server(model_dir, tmp_path / "server.log", "--drain-timeout", "60")
    try:
        # ignore_eos: each request runs its 90 tokens, so the drain lasts past the late request below (a request
        # that stopped at an early end-of-text let a fast machine finish draining first, and refuse the connection)
        streams = [httpx.stream("POST", f"{s.url}/v1/completions", timeout=60,
                                json={"prompt": p, "max_tokens": 90, "ignore_eos": True, "temperature": 0,
                                      "stream": True})
                   for p in PROMPTS[:4]]
        responses = [cm.__enter__() for cm in streams]
        lines = [r.iter_lines() for r in responses]
        for it in lines:
            assert next(it).startswith("data: ")  # every request is running
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(f"{s.url}/health").status_code != 503:  # draining: the readers above hold it open
            assert time.monotonic() < deadline, s.log()
            time.sleep(0.05)
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "late", "max_tokens": 3})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        for it, cm in zip(lines, streams):
            rest = [line for line in it if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] in ("length", "stop")
            cm.__exit__(None, None, None)
        assert s.proc.wait(60) == 0, s.log()
        assert "SIGTERM: draining" in s.log()
    finally:
        s.stop(signal.SIGKILL)


def test_a_request_cut_by_the_drain_timeout_ends_its_stream_with_an_error_event(model_dir, tmp_path):
    s = Server(model_dir, tmp_path / "server.log", "--drain-timeout", "0")
    try:
        with httpx.stream("POST", f"{s.url}/v1/completions", timeout=60,
                          json={"prompt": "Once", "max_tokens": 120, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            s.proc.send_signal(signal.SIGTERM)  # no time to drain: the running request is aborted
            events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        error = json.loads(events[-1])["error"]
        assert "shutting down" in error["message"] and error["code"] == "aborted", events[-3:]
        assert "[DONE]" not in events
        assert s.proc.wait(60) == 0, s.log()
    finally:
        s.stop(signal.SIGKILL)
