"""The server at the HTTP level, as curl or any other client sees it: the event-stream framing, the error shapes
and codes (400 for every invalid request, 401, 404, 413), /health, /metrics, an API key, and a client that
disconnects freeing its KV blocks at once."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from tests.serve.conftest import Server, wait_idle

CHAT = {"messages": [{"role": "user", "content": "Tell me a long story about a dragon."}], "temperature": 0}


def _events(text: str) -> list[str]:
    """The data of each event of an event stream; every event must end with a blank line."""
    assert text.endswith("\n\n"), text[-200:]
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def test_an_event_stream_is_framed_for_every_client(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 6, "stream": True}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("length") == 1
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("body,param,fragment", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (json.dumps({"temperature": 0}).encode(), "messages", "'messages' is required"),
    (json.dumps({**CHAT, "n": 0}).encode(), "n", "'n'"),
    (json.dumps({**CHAT, "max_tokens": 0}).encode(), "max_tokens", "max_tokens"),
    (json.dumps({**CHAT, "top_logprobs": 2}).encode(), "top_logprobs", "needs 'logprobs'"),
    (json.dumps({**CHAT, "messages": [{"role": "tool", "content": "x"}]}).encode(), "messages.0.role", "role"),
    (json.dumps({**CHAT, "response_format": {"type": "json_object"}}).encode(), "response_format", "unsupported"),
    (json.dumps({**CHAT, "messages": [{"role": "user", "content": "x", "name": "bob"}]}).encode(), "messages.0.name",
     "unsupported"),
])
def test_every_invalid_request_is_a_400_in_the_openai_shape(server, body, param, fragment):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and fragment in error["message"], error


def test_not_found_too_large_and_anthropic_shape(server):
    r = httpx.get(f"{server.url}/v1/engines")
    assert r.status_code == 404 and "no route GET /v1/engines" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"x" * (9 << 20),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 8388608 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(9):
            yield b"x" * (1 << 20)

    r = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and "limit of 8388608 bytes" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{server.url}/v1/messages", json={"model": "x", "messages": [], "max_tokens": 5})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_health_and_metrics(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    before = server.metrics()
    httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 5}, timeout=60).raise_for_status()
    after = wait_idle(server)
    for name in ("astrai_requests_running", "astrai_requests_waiting", "astrai_kv_cache_blocks_used",
                 "astrai_kv_cache_blocks_free", "astrai_prefix_cache_hit_rate", "astrai_time_to_first_token_seconds_count",
                 "astrai_time_per_output_token_seconds_count"):
        assert name in after, name
    assert after["astrai_generated_tokens_total"] - before.get("astrai_generated_tokens_total", 0) == 5
    assert after["astrai_time_to_first_token_seconds_count"] == before["astrai_time_to_first_token_seconds_count"] + 1
    assert after["astrai_prompt_tokens_total"] > before["astrai_prompt_tokens_total"]


def test_a_client_that_disconnects_frees_its_blocks(server):
    before = server.metrics()
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "Once upon a time", "max_tokens": 100, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 4:
                break  # leaves the stream: the connection closes
    after = wait_idle(server)
    assert after["astrai_kv_cache_blocks_used"] == 0 and after["astrai_requests_running"] == 0
    aborted = "astrai_requests_finished_total{finish_reason=abort}"
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1


@pytest.mark.multiproc  # slow: a server process of its own, with the access and overload options
def test_access_rules_a_key_hosts_origins_and_overload(long_model_dir, tmp_path):
    """One guarded server: the API key (any case of the Bearer scheme) on /v1 and /metrics, the Host header
    (DNS rebinding), CORS only for the origin given, and --max-waiting's 429 (529 on /v1/messages)."""
    model_dir = long_model_dir  # a 512-token context: a long generation keeps the server full while it is probed
    s = Server(model_dir, tmp_path / "server.log", "--allow-origin", "http://page.test", "--max-running", "1",
               "--max-waiting", "1", extra_env={"ASTRAI_API_KEY": "s3cret"})
    key = {"Authorization": "Bearer s3cret"}
    try:
        r = httpx.get(f"{s.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "a wrong API key" in r.json()["error"]["message"]
        r = httpx.post(f"{s.url}/v1/messages", json={}, headers={"x-api-key": "nope"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 9110: the scheme is case-insensitive
            assert httpx.get(f"{s.url}/v1/models", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        assert httpx.get(f"{s.url}/health").status_code == 200  # outside /v1: no key
        assert httpx.get(f"{s.url}/metrics").status_code == 401  # the metrics need it too
        assert "astrai_requests_running" in httpx.get(f"{s.url}/metrics", headers=key).text
        import openai
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret").models.list().data

        # a page on another name that resolves to 127.0.0.1 (DNS rebinding) is refused; loopback names are not
        r = httpx.get(f"{s.url}/v1/models", headers={**key, "Host": "evil.test"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", r.text
        assert httpx.get(f"{s.url}/health", headers={"Host": "evil.test:80"}).status_code == 400
        for host in (f"localhost:{s.port}", f"127.0.0.1:{s.port}", "localhost"):
            assert httpx.get(f"{s.url}/health", headers={"Host": host}).status_code == 200, host

        # CORS: the preflight of the allowed origin is answered without a key, another origin's is not
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        r = httpx.options(f"{s.url}/v1/chat/completions", headers={**preflight, "Origin": "http://page.test"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://page.test", r.headers
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.options(f"{s.url}/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in r.headers
        r = httpx.get(f"{s.url}/v1/models", headers={**key, "Origin": "http://page.test"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://page.test"

        # overload: one request runs, one waits, the next is refused with Retry-After until they are done. The
        # two probes go at once, the moment one request is seen waiting, while the running one has hundreds of
        # tokens to go (at 100 the running one once finished first on a busy machine and the probe got in)
        long = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        probes = [("/v1/chat/completions", {**CHAT, "max_tokens": 2}),
                  ("/v1/messages", {"model": model_dir.name, "max_tokens": 2,
                                    "messages": [{"role": "user", "content": "hi"}]})]
        with httpx.stream("POST", f"{s.url}/v1/completions", json=long, headers=key, timeout=60) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it runs
            with httpx.stream("POST", f"{s.url}/v1/completions", json=long, headers=key, timeout=60) as waiting:
                assert waiting.status_code == 200
                while s.metrics_with(key)["astrai_requests_waiting"] < 1:
                    pass
                with ThreadPoolExecutor(2) as pool:
                    chat, messages = pool.map(lambda p: httpx.post(f"{s.url}{p[0]}", headers=key, json=p[1],
                                                                   timeout=60), probes)
                assert chat.status_code == 429 and chat.headers["retry-after"] == "1", chat.text
                assert chat.json()["error"]["code"] == "overloaded" and "try again" in chat.json()["error"]["message"]
                assert messages.status_code == 529, messages.text
                assert messages.json()["error"]["type"] == "overloaded_error"
                assert messages.headers["retry-after"] == "1"
                assert _completion_tokens(waiting.iter_lines()) == 480  # the waiting one ran in full
            assert _completion_tokens(lines) == 480
        r = httpx.post(f"{s.url}/v1/chat/completions", headers=key, json={**CHAT, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200  # served again once the queue emptied
    finally:
        assert s.stop() == 0, s.log()


def _completion_tokens(lines) -> int:
    """The completion tokens a streamed response's usage chunk reports."""
    usage = [json.loads(line[6:])["usage"] for line in lines if line.startswith("data: {")]
    return [u for u in usage if u][-1]["completion_tokens"]


def test_errors_name_the_field_the_client_wrote_and_types_are_strict(server):
    def post(body, path="/v1/chat/completions", headers=None):
        return httpx.post(f"{server.url}{path}", content=body if isinstance(body, bytes) else json.dumps(body),
                          headers=headers if headers is not None else {"content-type": "application/json"},
                          timeout=60)

    r = post(b"")
    assert r.status_code == 400 and "the request body is empty" in r.json()["error"]["message"], r.text
    r = post({**CHAT, "max_tokens": 2}, headers={})  # no Content-Type (curl --data-binary without -H): still JSON
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    r = post({**CHAT, "messages": [{"role": "user", "content": 5}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages.0.content", error
    assert error["message"] == "'messages.0.content' must be a string or a list of text parts", error
    r = post({**CHAT, "messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]})
    assert r.json()["error"]["param"] == "messages.0.content.0.type", r.text
    for field, value in (("n", "2"), ("ignore_eos", "yes"), ("max_tokens", "4"), ("temperature", "0"),
                         ("stream", 1), ("seed", 1.0)):
        r = post({**CHAT, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value, r.text)
    r = post({"prompt": ["a"] * 9, "n": 16, "max_tokens": 1}, "/v1/completions")
    assert r.status_code == 400 and "144 generations" in r.json()["error"]["message"], r.text
    r = post({"input": ["a"] * 2049}, "/v1/embeddings")
    assert r.status_code == 400 and "at most 2048" in r.json()["error"]["message"], r.text


def test_a_client_gone_before_its_first_chunk_aborts_its_request(model_dir):
    """A streamed request whose client is gone before the response starts (the ASGI server reports the disconnect
    first): the request is aborted, not generated to its end for nobody. In process, at the ASGI level, so that the
    disconnect surely comes before the first event."""
    import asyncio
    import time

    import torch

    from astrai_ds.inference.engine import LLMEngine
    from astrai_ds.model.io import load_model_folder
    from astrai_ds.serve.app import ServerState, build_app
    from astrai_ds.serve.async_engine import AsyncEngine
    from astrai_ds.serve.metrics import ServeMetrics

    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    metrics = ServeMetrics()
    engine = AsyncEngine(LLMEngine(model, tokenizer), metrics)
    app = build_app(ServerState(engine, "m", metrics))
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True, "stream": True}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json"), (b"host", b"127.0.0.1")],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
    messages = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0) if messages else await asyncio.Future()

    async def send(message):  # the response's start is slow to go out: the disconnect is seen first
        await asyncio.sleep(0.2)

    async def main():  # the event loop lives on after the response, as a server's does
        await app(scope, receive, send)
        deadline = time.monotonic() + 30
        while engine.num_unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    engine.start()
    try:
        asyncio.run(main())
        finished = {s.labels["finish_reason"]: s.value for family in metrics.registry.collect()
                    for s in family.samples if s.name == "astrai_requests_finished_total"}
        assert finished == {"abort": 1.0}, finished
    finally:
        engine.stop(timeout=30)


EDGES = [0, -1, 1e-300, -1e-300, 1e300, float("nan"), float("inf"), float("-inf"), "1", True, None, [1]]
SAMPLING = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
            "max_tokens", "seed", "n"]
ROUTES = {  # route: (a sampled request, its sampling fields, where its answer's finish reason is)
    "/v1/chat/completions": ({**CHAT, "temperature": 1, "seed": 3, "max_tokens": 2}, SAMPLING + ["top_logprobs"],
                             lambda r: r["choices"][0]["finish_reason"]),
    "/v1/completions": ({"prompt": "Once upon a time", "temperature": 1, "seed": 3, "max_tokens": 2},
                        SAMPLING + ["logprobs"], lambda r: r["choices"][0]["finish_reason"]),
    "/v1/messages": ({"model": "m", "messages": CHAT["messages"], "temperature": 1, "max_tokens": 2},
                     ["temperature", "top_p", "top_k", "max_tokens"], lambda r: r["stop_reason"]),
}


@pytest.mark.multiproc  # slow: about 300 requests against the server (the slow set, like the load test)
def test_sampling_fields_at_their_edges_never_take_the_engine_down(server):
    """Every sampling field of every generating route at its edges (zero, negative, tiny, huge, NaN, infinities,
    wrong types): a request either answers or is a 400 that names the field (or the JSON, for a literal JSON has
    no such number), and the engine stays healthy for the next request. 1e-300 as repetition_penalty once
    overflowed the logits to inf and killed the engine for every later request."""
    served = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    for path, (base, fields, finish) in ROUTES.items():
        base = {**base, "model": served} if "model" in base else base
        answered = 0
        for name in fields:
            for value in EDGES:
                body = {**base, name: value}
                if name == "top_logprobs":
                    body["logprobs"] = True
                r = httpx.post(f"{server.url}{path}", content=json.dumps(body).encode(),
                               headers={"content-type": "application/json"}, timeout=60)
                assert r.status_code in (200, 400), (path, name, value, r.status_code, r.text)
                if r.status_code == 400:
                    error = r.json()["error"]
                    named = error.get("param") == name or f"'{name}'" in error["message"]
                    assert named or "JSON" in error["message"], (path, name, value, error)
                else:
                    answered += 1
                    assert finish(r.json()) in ("stop", "length", "end_turn", "max_tokens"), (path, name, value)
                assert httpx.get(f"{server.url}/health").json()["status"] == "ok", (path, name, value)
        assert answered > 0, path
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def _hostile_cases(served: str) -> list[tuple[str, str, bytes | None, dict]]:
    """(method, path, body, headers) of bad requests: broken bodies, wrong types and values of every field, lone
    surrogates, unknown fields, models and routes, wrong methods and headers."""
    json_type = {"content-type": "application/json"}
    cases = []
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"prompt": "hi", "max_tokens": 2}
    message = {"model": served, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    routes = {"/v1/chat/completions": chat, "/v1/completions": completion, "/v1/messages": message,
              "/v1/embeddings": {"input": "hi"}, "/v1/messages/count_tokens": {"model": served, **{
                  k: v for k, v in message.items() if k == "messages"}}}
    for path, good in routes.items():
        for body in (b"", b"{", b"[]", b"null", b"1", b'"x"', b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000,
                     json.dumps({**good, "surprise": 1}).encode(), json.dumps({**good, "model": 5}).encode(),
                     json.dumps({**good, "model": "no-such-model"}).encode()):
            cases.append(("POST", path, body, json_type))
        cases.append(("GET", path, None, {}))
        cases.append(("POST", path, json.dumps(good).encode(), {"content-type": "text/plain"}))
    bad_fields = {
        "/v1/chat/completions": [("messages", []), ("messages", "hi"), ("messages", [{"role": "tool", "content": "x"}]),
                                 ("messages", [{"role": "user"}]), ("messages", [{"role": "user", "content": 5}]),
                                 ("messages", [{"role": "user", "content": [{"type": "image_url"}]}]),
                                 ("messages", [{"role": "user", "content": "\ud800"}]), ("n", 17), ("n", 0),
                                 ("max_tokens", -5), ("max_tokens", 1.5), ("stop", ""), ("stop", [""]),
                                 ("stop", [1]), ("logprobs", 3), ("top_logprobs", 21), ("seed", -1), ("seed", 2**64),
                                 ("temperature", "hot"), ("stream", "yes"), ("stream_options", {"x": 1}),
                                 ("response_format", {"type": "json_object"}), ("tools", []), ("user", 5)],
        "/v1/completions": [("prompt", ""), ("prompt", []), ("prompt", [[]]), ("prompt", [-1]), ("prompt", [10**9]),
                            ("prompt", [1.5]), ("prompt", {"a": 1}), ("prompt", "\udfff"), ("echo", "no"),
                            ("logprobs", 21), ("logprobs", True), ("n", 100), ("best_of", 2), ("suffix", "x"),
                            ("max_tokens", "4"), ("stop", [""])],
        "/v1/messages": [("max_tokens", 0), ("max_tokens", None), ("messages", []), ("system", 5),
                         ("messages", [{"role": "assistant", "content": "x"}]), ("temperature", 2),
                         ("stop_sequences", "x"), ("tools", []), ("metadata", {"x": 1}), ("top_k", "1"),
                         ("messages", [{"role": "user", "content": [{"type": "image"}]}]), ("system", "\ud800")],
        "/v1/embeddings": [("input", ""), ("input", []), ("input", [""]), ("input", [[]]), ("input", [-1]),
                           ("input", ["a"] * 2049), ("encoding_format", "hex"), ("dimensions", 8), ("input", 5)],
    }
    for path, fields in bad_fields.items():
        for name, value in fields:
            cases.append(("POST", path, json.dumps({**routes[path], name: value}).encode(), json_type))
    cases += [("GET", "/v1/engines", None, {}), ("DELETE", "/v1/models", None, {}),
              ("GET", "/v1/models/nope", None, {}), ("POST", "/v1/chat/completions", b"x" * (9 << 20), json_type),
              ("GET", "/health", None, {"host": "evil.test"}),
              ("POST", "/v1/chat/completions", json.dumps(chat).encode(), {**json_type, "host": "rebind.example"})]
    return cases


@pytest.mark.multiproc  # slow: about 150 requests against the server
def test_a_hostile_trial_leaves_the_server_healthy(server):
    """More than 120 bad requests on every route: each is a 4xx in its protocol's shape (Anthropic's on
    /v1/messages, OpenAI's elsewhere), never a 500 or a closed connection; /health stays ok and a normal request
    still answers afterwards."""
    served = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    cases = _hostile_cases(served)
    assert len(cases) >= 120
    with httpx.Client(base_url=server.url, timeout=60) as client:
        wrong = []
        for method, path, body, headers in cases:
            r = client.request(method, path, content=body, headers=headers)
            what = (method, path, (body or b"")[:60], r.status_code, r.text[:160])
            if not 400 <= r.status_code < 500 or "json" not in r.headers.get("content-type", ""):
                wrong.append(what)
                continue
            error = r.json()
            if path.startswith("/v1/messages"):
                shaped = error.get("type") == "error" and set(error["error"]) == {"type", "message"}
            else:
                shaped = set(error.get("error", {})) == {"message", "type", "param", "code"}
            if not shaped or not error["error"]["message"]:
                wrong.append(what)
        assert not wrong, "\n".join(map(str, wrong))
        assert client.get("/health").json()["status"] == "ok"
        r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
