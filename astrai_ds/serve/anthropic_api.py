"""The Anthropic Messages API: `POST /v1/messages`, plain and streamed (its named events), and
`POST /v1/messages/count_tokens`."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from astrai_ds.serve.jobs import Choice, ClientGone, Job, engine_error, event_stream, new_id, sse
from astrai_ds.serve.requests import ApiError, RequestBody, Strict, sampling_params

router = APIRouter()

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               529: "overloaded_error"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


class TextBlock(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]


class Metadata(Strict):
    user_id: str | None = None


class MessagesRequest(RequestBody):
    model: str
    max_tokens: int
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: Metadata | None = None


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


def _stop_reason(c: Choice) -> str | None:
    if c.finish_reason == "length":
        return "max_tokens"
    if c.finish_reason == "stop":
        return "stop_sequence" if c.stop_string is not None else "end_turn"
    return None


class CountTokensRequest(RequestBody):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None


async def _prompt_ids(server, body: MessagesRequest | CountTokensRequest) -> list[int]:
    """The prompt's token ids: the system text and the messages, in the model's chat template."""
    server.check_model(body.model)
    if body.model == server.rag_name:
        raise ApiError(400, f"'{server.rag_name}' answers on /v1/chat/completions (with its sources); "
                            f"/v1/messages serves '{server.served_name}'", param="model")
    if body.messages[-1].role != "user":
        raise ApiError(400, "the last message must have role 'user' (continuing an assistant message is not "
                            "supported)", param="messages")
    chat = ([{"role": "system", "content": _text(body.system)}] if body.system else [])
    chat += [{"role": m.role, "content": _text(m.content)} for m in body.messages]
    return await server.encode(chat, "messages")


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    """The number of input tokens `/v1/messages` would read for these messages (what Anthropic's clients ask
    before sending a long conversation)."""
    return {"input_tokens": len(await _prompt_ids(request.app.state.server, body))}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    server = request.app.state.server
    server.check_ready()
    ids = await _prompt_ids(server, body)
    params = sampling_params(max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                             top_k=body.top_k, stop=list(body.stop_sequences or []),
                             _names={"max_new_tokens": "max_tokens", "stop": "stop_sequences"})
    job = await Job.start(server, [ids], [params], "messages")
    message_id = new_id("msg_")
    head = {"id": message_id, "type": "message", "role": "assistant", "model": server.served_name}

    if not body.stream:
        try:
            (c,) = await job.collect(request)
        except ClientGone:
            return JSONResponse({}, status_code=499)
        except Exception as e:
            raise engine_error(e) from e
        return {**head, "content": [{"type": "text", "text": "".join(c.text)}], "stop_reason": _stop_reason(c),
                "stop_sequence": c.stop_string, "usage": {"input_tokens": len(ids),
                                                          "output_tokens": c.completion_tokens}}

    async def events():
        start = {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": len(ids), "output_tokens": 0}}
        yield sse({"type": "message_start", "message": start}, "message_start")
        yield sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  "content_block_start")
        c = Choice()
        try:
            async for out in job.outputs():
                c.add(out)
                if out.text:
                    yield sse({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": out.text}}, "content_block_delta")
        except Exception as e:
            err = engine_error(e)
            yield sse(error_body(err.status, err.message), "error")
            return
        yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        yield sse({"type": "message_delta", "delta": {"stop_reason": _stop_reason(c), "stop_sequence": c.stop_string},
                   "usage": {"output_tokens": c.completion_tokens}}, "message_delta")
        yield sse({"type": "message_stop"}, "message_stop")

    return event_stream(events(), job)
