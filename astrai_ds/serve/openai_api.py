"""The OpenAI API: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

Request fields are the ones OpenAI defines that this server implements (plus `top_k`, `min_p`,
`repetition_penalty` and `ignore_eos`, as vLLM accepts them); any other field is a 400 naming it."""

from __future__ import annotations

import asyncio
import codecs
import json
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from astrai_ds.errors import UserError
from astrai_ds.inference.sampling import MAX_LOGPROBS
from astrai_ds.serve.jobs import Choice, ClientGone, Job, engine_error, event_stream, new_id, now, sse
from astrai_ds.serve.requests import MAX_GENERATIONS, ApiError, RequestBody, Strict, sampling_params, stop_list

router = APIRouter()


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(RequestBody):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None  # generate max_tokens tokens whatever the model says (benchmarks)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


# ---------------------------------------------------------------- shared by both endpoints


def _check_common(server, body: SamplingFields) -> None:
    server.check_model(body.model)
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")


def _params(body: SamplingFields, max_tokens: int | None, logprobs: int | None, n_index: int,
            prompt_logprobs: int | None = None, max_name: str = "max_tokens"):
    seed = None if body.seed is None else body.seed + n_index  # the choices of `n` differ, reproducibly
    return sampling_params(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                           top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                           presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                           stop=stop_list(body.stop), seed=seed, logprobs=logprobs, ignore_eos=body.ignore_eos,
                           prompt_logprobs=prompt_logprobs, _names={"max_new_tokens": max_name})


def _usage(choices: list[Choice], prompt_tokens: int) -> dict:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def _chat_logprobs(tokenizer, entries: list[dict]) -> dict:
    def item(token_id, logprob):
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**item(e["token_id"], e["logprob"]),
                         "top_logprobs": [item(t, lp) for t, lp in e["top_logprobs"]]} for e in entries]}


def _completion_logprobs(tokenizer, entries: list[dict], offsets: list[int], prompt: list[int] | None = None) -> dict:
    """The completions API's logprobs object. `prompt`: the echoed prompt's ids, whose entries (all but the first
    token's) start `entries`; the first token is listed with null, as OpenAI and vLLM list it."""
    first = [] if prompt is None else [_token_text(tokenizer, prompt[0])]
    return {"tokens": first + [_token_text(tokenizer, e["token_id"]) for e in entries],
            "token_logprobs": [None] * len(first) + [e["logprob"] for e in entries],
            "top_logprobs": [None] * len(first) + [{_token_text(tokenizer, t): lp for t, lp in e["top_logprobs"]}
                                                   for e in entries],
            "text_offset": offsets}


async def _respond(request: Request, server, job: Job, body: SamplingFields, prompt_tokens: int, make_chunk,
                   make_choice, first_chunks, object_name: str, response_id: str, extra: dict | None = None):
    """The JSON response or the event stream of `job`; make_* build the protocol's choice objects. `extra`
    (top-level fields, such as a RAG answer's sources) goes into the response, or into the first chunk."""
    model = body.model or server.served_name
    extra = extra or {}
    if not body.stream:
        try:
            choices = await job.collect(request)
        except ClientGone:
            return JSONResponse({}, status_code=499)
        except Exception as e:
            raise engine_error(e) from e
        return {"id": response_id, "object": object_name, "created": now(), "model": model,
                "choices": [make_choice(i, c) for i, c in enumerate(choices)],
                "usage": _usage(choices, prompt_tokens), **extra}

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    created = now()
    index = {request_id: i for i, request_id in enumerate(job.request_ids)}

    def chunk(choices: list[dict], first: bool = False) -> bytes:
        data = {"id": response_id, "object": f"{object_name}.chunk", "created": created, "model": model,
                "choices": choices}
        if include_usage:
            data["usage"] = None
        return sse({**data, **extra} if first else data)

    async def events():
        states = [Choice() for _ in job.request_ids]
        try:
            for i in range(len(job.request_ids)):
                for first in first_chunks(i):
                    yield chunk([first], first=i == 0)
            async for out in job.outputs():
                i = index[out.request_id]
                offset = sum(map(len, states[i].text))
                states[i].add(out)
                if out.text or out.logprobs or out.finished:
                    yield chunk([make_chunk(i, out, offset)])
        except Exception as e:  # the engine failed or the server aborted: say so, end the stream
            err = engine_error(e)
            yield sse({"error": {"message": err.message, "type": "server_error", "param": None, "code": err.code}})
            return
        if include_usage:
            data = {"id": response_id, "object": f"{object_name}.chunk", "created": created, "model": model,
                    "choices": [], "usage": _usage(states, prompt_tokens)}
            yield sse(data)
        yield sse("[DONE]")

    return event_stream(events(), job)


# ---------------------------------------------------------------- routes


@router.get("/v1/models")
async def models(request: Request):
    server = request.app.state.server
    return {"object": "list", "data": [_model_card(server, name) for name in server.model_names]}


def _model_card(server, name: str) -> dict:
    return {"id": name, "object": "model", "created": server.created, "owned_by": "astrai_ds",
            "max_model_len": server.max_context}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    server = request.app.state.server
    server.check_model(model_id)
    return _model_card(server, model_id)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    server = request.app.state.server
    server.check_ready()
    _check_common(server, body)
    if body.model is not None and body.model == server.rag_name:
        raise ApiError(400, f"'{server.rag_name}' answers chat completions (a question, with its sources); "
                            f"/v1/completions serves '{server.served_name}'", param="model")
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ApiError(400, "'prompt' must not be empty", param="prompt")
    scoring = body.echo and body.logprobs is not None  # prompt log-probs: what log-likelihood evaluations read
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "'max_tokens' 0 asks for nothing: it is for scoring a prompt, with 'echo': true (and "
                            "'logprobs' for its tokens' log-probs)", param="max_tokens")
    if body.stream and (scoring or body.max_tokens == 0):
        raise ApiError(400, "a prompt's log-probs ('echo' with 'logprobs') and 'max_tokens' 0 come in one response: "
                            "send the request without 'stream'", param="stream")
    if len(prompts) * body.n > MAX_GENERATIONS:
        raise ApiError(400, f"the request asks for {len(prompts) * body.n} generations ({len(prompts)} prompts x n "
                            f"{body.n}), and the server takes at most {MAX_GENERATIONS} in one request: split it into "
                            f"several", param="prompt")
    encoded = await server.encode_all(prompts, "prompt")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
    all_ids = [ids for ids in encoded for _ in range(body.n)]
    # the engine's prompt-alone request (max_tokens 0) computes the prompt's log-probs; only `logprobs` lists them
    prompt_logprobs = body.logprobs if scoring else 0 if max_tokens == 0 else None
    params = [_params(body, max_tokens, body.logprobs, j, prompt_logprobs=prompt_logprobs)
              for _ in encoded for j in range(body.n)]
    job = await Job.start(server, all_ids, params, "prompt")
    tok = server.tokenizer

    def echo(p, ids: list[int]) -> tuple[str, list[int]]:
        """(the echoed prompt, its tokens' offsets when they are scored): a text as it was sent; token ids as the text
        of their tokens, special ones included."""
        if not body.echo:
            return "", []
        if isinstance(p, str) and not scoring:
            return p, []
        text, offsets = _prompt_text(tok, ids, len(tok.prefix_ids) if isinstance(p, str) else 0)
        return (p if isinstance(p, str) else text), offsets

    echoed = [echo(p, ids) for p, ids in zip(prompts, encoded)]
    echo_text = [echoed[i // body.n][0] for i in range(len(all_ids))]

    def make_choice(i: int, c: Choice) -> dict:
        text, entries, offsets = "".join(c.text), c.logprobs, _token_offsets(c)
        logprobs = None
        if body.logprobs is not None:
            # each token's offset: where the text stood when it was generated (text arrives with the token
            # that completes a character, so a token inside a character has the offset of the next text)
            offsets = [len(echo_text[i]) + s for s in offsets]
            if scoring:  # the prompt's tokens first; the first one has no log-prob (nothing predicts it)
                entries = c.prompt_logprobs[1:] + entries
                offsets = echoed[i // body.n][1] + offsets
            logprobs = _completion_logprobs(tok, entries, offsets, all_ids[i] if scoring else None)
        return {"index": i, "text": echo_text[i] + text, "logprobs": logprobs,
                "finish_reason": _finish(c.finish_reason)}

    def first_chunks(i: int):
        if echo_text[i]:
            yield {"index": i, "text": echo_text[i], "logprobs": None, "finish_reason": None}

    def make_chunk(i: int, out, offset: int) -> dict:
        logprobs = None
        if body.logprobs is not None and out.logprobs:
            base = len(echo_text[i]) + offset  # a stop token that ended the choice: after this output's text
            logprobs = _completion_logprobs(tok, out.logprobs, [base if out.token_ids else base + len(out.text)])
        return {"index": i, "text": out.text, "logprobs": logprobs,
                "finish_reason": _finish(out.finish_reason) if out.finished else None}

    prompt_tokens = sum(len(ids) for ids in encoded)
    return await _respond(request, server, job, body, prompt_tokens, make_chunk, make_choice, first_chunks,
                          "text_completion", new_id("cmpl-"))


def _token_offsets(c: Choice) -> list[int]:
    """Character offset of each generated token in the choice's text (see make_choice)."""
    # The engine reports text per output, one token per output: the offset of token k is the length of the
    # text before the output that carried it. A stop token that ended the choice (listed, not in its tokens) is at
    # the end of the text.
    offsets, pos = [], 0
    for piece in c.text[:len(c.logprobs)]:
        offsets.append(pos)
        pos += len(piece)
    if len(c.logprobs) > len(c.token_ids):
        offsets[-1] = pos
    return offsets


def _prompt_text(tokenizer, ids: list[int], skip: int) -> tuple[str, list[int]]:
    """(the text of ids[skip:], each token's character offset in it): the tokens' bytes decoded in order, special
    tokens as their own text; the first `skip` tokens (the <bos> put before a text prompt) are at 0 and add no text."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, offsets = "", [0] * skip
    for token_id in ids[skip:]:
        offsets.append(len(text))
        text += decoder.decode(tokenizer.token_bytes(token_id))
    return text + decoder.decode(b"", final=True), offsets


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    server = request.app.state.server
    server.check_ready()
    _check_common(server, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ApiError(400, "give 'max_completion_tokens' or its older name 'max_tokens', not both",
                       param="max_tokens")
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in body.messages]
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    extra = None
    if body.model is not None and body.model == server.rag_name:
        if max_tokens is None:
            max_tokens = min(256, server.max_context // 4)
        messages, extra = await _with_context(server, messages, max_tokens)
    ids = await server.encode(messages, "messages")
    if max_tokens is None:
        max_tokens = max(server.max_context - len(ids), 1)  # as far as the context goes
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = [_params(body, max_tokens, logprobs, j, max_name=max_name) for j in range(body.n)]
    job = await Job.start(server, [ids] * body.n, params, "messages")
    tok = server.tokenizer

    # A chat's log-probs are those of its content's tokens: the stop token that ended it (which the engine lists) is not
    # part of the content, and OpenAI's chat API does not list it.
    def make_choice(i: int, c: Choice) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": _chat_logprobs(tok, c.logprobs[:len(c.token_ids)]) if body.logprobs else None,
                "finish_reason": _finish(c.finish_reason)}

    def first_chunks(i: int):
        yield {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def make_chunk(i: int, out, offset: int) -> dict:
        return {"index": i, "delta": {"content": out.text} if out.text else {},
                "logprobs": _chat_logprobs(tok, out.logprobs[:len(out.token_ids)])
                if body.logprobs and out.token_ids else None,
                "finish_reason": _finish(out.finish_reason) if out.finished else None}

    return await _respond(request, server, job, body, len(ids), make_chunk, make_choice, first_chunks,
                          "chat.completion", new_id("chatcmpl-"), extra)


RAG_K = 5
MAX_EMBEDDING_INPUTS = 2048  # as OpenAI's embeddings endpoint


async def _with_context(server, messages: list[dict], max_tokens: int) -> tuple[list[dict], dict]:
    """The chat grounded in retrieved chunks (rag.answer.grounded_chat: the whole conversation, as many chunks as
    fit), and the `sources` field the response carries. Search and prompt fitting run off the event loop."""
    from astrai_ds.rag.answer import grounded_chat

    if messages[-1]["role"] != "user":
        raise ApiError(400, f"the last message must be the user's question for '{server.rag_name}'", param="messages")
    question = messages[-1]["content"]
    query = await server.engine.embed([await server.encode(question, "messages")], server.pooling)
    hits = await asyncio.to_thread(server.rag_index.search, question, lambda texts: query, server.tokenizer, RAG_K,
                                   "hybrid")
    try:
        prompt, used = await asyncio.to_thread(grounded_chat, server.engine.engine, messages,
                                               [h.chunk for h in hits], max_tokens,
                                               {"question": "the question", "max_new_tokens": "max_tokens"})
    except UserError as e:
        raise ApiError(400, str(e), param="messages") from None
    scores = {h.chunk["id"]: h.score for h in hits}
    sources = [{"index": i, "source": c["source"], "headings": c["headings"], "start": c["start"], "end": c["end"],
                "score": scores[c["id"]], "text": c["text"]} for i, c in enumerate(used, 1)]
    return prompt, {"sources": sources}


class EmbeddingRequest(RequestBody):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    """OpenAI's embeddings: the model's pooled final-norm hidden states (inference.embed), unit length."""
    import base64

    server = request.app.state.server
    server.check_ready()
    server.check_model(body.model)
    given = body.input
    items = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else list(given)
    if not items or any(len(x) == 0 for x in items):
        raise ApiError(400, "'input' must not be empty (nor hold an empty string or list)", param="input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"'input' holds {len(items)} items, and the server takes at most {MAX_EMBEDDING_INPUTS} "
                            f"in one request: split it into several", param="input")
    texts = iter(await server.encode_all([x for x in items if isinstance(x, str)], "input"))
    ids = [next(texts) if isinstance(x, str) else list(x) for x in items]
    vocab = server.engine.engine.model.cfg.vocab_size
    for i, x in enumerate(ids):
        if len(x) > server.max_context:
            raise ApiError(400, f"input {i} is {len(x)} tokens, and the model's context is {server.max_context} "
                                f"tokens: shorten it", param="input")
        if any(not 0 <= t < vocab for t in x):
            raise ApiError(400, f"input {i} holds a token id outside the vocabulary [0, {vocab})", param="input")
    vectors = await server.engine.embed(ids, server.pooling)
    tokens = sum(len(x) for x in ids)

    def body_bytes() -> bytes:  # hundreds of thousands of floats: encoded off the event loop the streams share
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(v.astype("<f4").tobytes()).decode()
                               if body.encoding_format == "base64" else v.tolist())} for i, v in enumerate(vectors)]
        return json.dumps({"object": "list", "data": data, "model": body.model or server.served_name,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()

    return Response(await asyncio.to_thread(body_bytes), media_type="application/json")
