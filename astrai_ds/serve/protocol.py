"""What the OpenAI and Anthropic adapters share: errors, sampling parameters, starting the engine requests of
one HTTP request and gathering their outputs, and the server-sent event framing (FastAPI's)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ConfigDict, model_validator

from astrai_ds.data.sources import lone_surrogate
from astrai_ds.errors import RequestError
from astrai_ds.inference.engine import RequestOutput
from astrai_ds.inference.sampling import SamplingParams


MAX_GENERATIONS = 128  # engine requests one HTTP request may start (prompts x n)


class ApiError(Exception):
    """An HTTP error with a message for the client; each protocol renders it in its own shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Strict(BaseModel):
    """A request object: a field the server does not implement is refused, never silently ignored, and a value of
    the wrong JSON type ("2" for an integer, "yes" for a boolean) is refused, never converted."""

    model_config = ConfigDict(extra="forbid", strict=True)


class RequestBody(Strict):
    """A route's whole body: a text with a lone surrogate anywhere in it is a 400 naming its field. Checked once,
    on the raw body before any field is parsed (the objects nested in it are plain `Strict`)."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data):
        path = lone_surrogate(data)
        if path is not None:  # an ApiError passes through pydantic to the app's handler, with the field named
            raise ApiError(400, f"'{path}' holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is "
                                f"not text: send valid UTF-16 pairs or UTF-8", param=path)
        return data


BRANCHES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
            "list[str]": "a list of strings", "list[int]": "a list of token ids", "list[list[int]]":
            "a list of token-id lists", "list[TextPart]": "a list of text parts", "list[TextBlock]":
            "a list of text blocks"}


def _is_branch(part) -> bool:
    """A location part that names a union's branch (pydantic's 'str', 'list[TextPart]'), not a field."""
    return isinstance(part, str) and (part in BRANCHES or "[" in part or part[:1].isupper() or "-" in part)


def validation_message(errors: list[dict]) -> tuple[str, str]:
    """(param, message) of a request body's pydantic errors: the first problem, named by the field the client
    wrote (a union's branches are pydantic's, not the client's), and how many more there are."""
    def param_of(error):
        return ".".join(str(x) for x in error.get("loc", ()) if x != "body" and not _is_branch(x))

    first = errors[0]
    param = param_of(first)
    same = [e for e in errors if param_of(e) == param]
    branched = [e for e in same if any(_is_branch(x) for x in e.get("loc", ()))]
    if len(branched) > 1:  # every branch of a union refused the value itself: say what the field may be
        kinds = [BRANCHES.get(next(x for x in e["loc"] if _is_branch(x)), "") for e in branched]
        message = f"'{param}' must be {' or '.join(k for k in dict.fromkeys(kinds) if k)}"
    else:
        deeper = [e for e in errors if any(_is_branch(x) for x in e.get("loc", ())) and param_of(e) != param and
                  param_of(e).startswith(param + ".")] if branched else []
        first = deeper[0] if deeper else first  # the value had a branch's shape: its own problem inside it
        param, message = _one_message(param_of(first), first)
    more = len({param_of(e) for e in errors} - {param})
    return param, message + (f" (and {more} more problem(s))" if more else "")


def _one_message(param: str, error: dict) -> tuple[str, str]:
    kind = error.get("type", "")
    if kind == "json_invalid":
        return "", f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    if kind == "extra_forbidden":
        return param, f"unsupported field '{param}': this server does not implement it; remove it from the request"
    if kind == "missing" and not param:
        return "", "the request body is empty: send a JSON object (Content-Type: application/json)"
    if kind == "missing":
        return param, f"'{param}' is required"
    if kind == "model_attributes_type" and not param:
        return "", "the request body must be a JSON object"
    return param, f"'{param}': {error.get('msg', 'invalid value')}" if param else error.get("msg", "invalid request")


def sampling_params(**fields) -> SamplingParams:
    """SamplingParams from a request's values (None: the default); a bad value is a 400 naming the field.
    `fields` keys are SamplingParams names; `_names` maps them to the request's own field names."""
    names = fields.pop("_names", {})
    given = {k: v for k, v in fields.items() if v is not None}
    try:
        return SamplingParams(**given)
    except RequestError as e:
        field_ = str(e).split(" ", 1)[0]
        public = names.get(field_, field_)
        raise ApiError(400, str(e).replace(field_, f"'{public}'", 1), param=public) from None


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(stops):
        raise ApiError(400, "'stop': stop strings must not be empty", param="stop")
    return stops


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

    def add(self, out: RequestOutput) -> None:
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
        if len(prompts) > MAX_GENERATIONS:
            raise ApiError(400, f"the request asks for {len(prompts)} generations (prompts x n), and the server takes "
                                f"at most {MAX_GENERATIONS} in one request: split it into several", param=param)
        job = cls(server, [server.engine.new_id("req") for _ in prompts], asyncio.Queue())
        try:
            await server.engine.add(list(zip(job.request_ids, prompts, params)), job.queue)
        except RequestError as e:
            raise ApiError(400, str(e), param=param) from None
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
