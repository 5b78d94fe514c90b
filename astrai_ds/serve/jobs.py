"""Running a request: the engine requests of one HTTP request (`Job`), what each produced (`Choice`), the
server-sent event framing, and the HTTP error for a request that failed while it ran. Shared by the OpenAI and
Anthropic adapters."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event

from astrai_ds.errors import ContextTooLong, RequestError
from astrai_ds.inference.engine import RequestOutput
from astrai_ds.inference.sampling import SamplingParams
from astrai_ds.serve.requests import ApiError

def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class _EventStream(StreamingResponse):
    """A StreamingResponse that runs `on_close` however the response ends: a client that goes away before the
    first event is sent never starts `events`, so the generator's own cleanup would not run."""

    def __init__(self, events, on_close, **kwargs):
        super().__init__(events, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def event_stream(events, job: "Job") -> StreamingResponse:
    """A server-sent event stream of `events` (an async iterator of `sse(...)` bytes), never buffered by a proxy;
    when it ends, for whatever reason, `job`'s unfinished requests are aborted."""
    return _EventStream(events, job.close, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(data, event: str | None = None) -> bytes:
    """One server-sent event: `data` as JSON (a str is sent as it is, e.g. "[DONE]")."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return format_sse_event(data_str=text, event=event)


@dataclass
class Choice:
    """What one engine request produced so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_string: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[dict | None] | None = None

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text.append(out.text)
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
        if out.finished:
            self.finish_reason, self.stop_string = out.finish_reason, out.stop_string


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


@dataclass
class Job:
    """The engine requests of one HTTP request (`n` choices, or one per prompt), feeding one queue."""

    server: object  # serve.app.ServerState
    request_ids: list[str]
    queue: asyncio.Queue
    done: set[str] = field(default_factory=set)  # the requests that finished

    @classmethod
    async def start(cls, server, prompts: list[list[int]], params: list[SamplingParams], param: str) -> "Job":
        """Add every request; if the engine refuses one, abort the others and raise a 400 naming `param`."""
        job = cls(server, [server.engine.new_id("req") for _ in prompts], asyncio.Queue())
        try:
            await server.engine.add(list(zip(job.request_ids, prompts, params)), job.queue)
        except RequestError as e:
            code = "context_length_exceeded" if isinstance(e, ContextTooLong) else None
            raise ApiError(400, str(e), param=param, code=code) from None
        except Exception as e:  # the engine could not prepare one (RequestFailed), or it stopped
            raise engine_error(e) from e
        return job

    async def outputs(self):
        async for out in self.server.engine.outputs(self.queue, self.request_ids):
            if out.finished:
                self.done.add(out.request_id)
            yield out

    def close(self) -> None:
        """Abort the requests that have not finished (their client is gone): their blocks are freed."""
        for request_id in self.request_ids:
            if request_id not in self.done:
                self.server.engine.abort(request_id)
                self.done.add(request_id)

    async def collect(self, request: Request) -> list[Choice]:
        """Every request's finished Choice, in order. A client that disconnects meanwhile aborts them."""
        choices = {request_id: Choice() for request_id in self.request_ids}
        watch = asyncio.ensure_future(_watch_disconnect(request, self.queue))
        try:
            async for out in self.outputs():
                choices[out.request_id].add(out)
        finally:
            watch.cancel()
        return list(choices.values())


async def _watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    queue.put_nowait(ClientGone())


def engine_error(e: BaseException) -> ApiError:
    """The ApiError for an exception raised while a request was running."""
    from astrai_ds.serve.async_engine import EngineDead, Overloaded, RequestAborted, RequestFailed

    if isinstance(e, Overloaded):
        return ApiError(429, str(e), code="overloaded")
    if isinstance(e, RequestAborted):
        return ApiError(503, str(e), code="aborted")
    if isinstance(e, RequestFailed):
        return ApiError(500, str(e), code="request_failed")
    if isinstance(e, EngineDead):
        return ApiError(500, str(e), code="engine_failed")
    return ApiError(500, f"internal error: {e!r}")
