"""The HTTP server: one FastAPI app over one AsyncEngine.

Routes: the OpenAI API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`), the Anthropic Messages API
(`/v1/messages`), `GET /health`, `GET /metrics` (Prometheus) and `GET /` (a chat page). Every error has the
shape of the protocol the route belongs to; FastAPI's own 422 and 404 bodies never reach a client.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from astrai_ds.errors import RequestError
from astrai_ds.serve import anthropic_api, openai_api
from astrai_ds.serve.jobs import now
from astrai_ds.serve.requests import ApiError, validation_message

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
                503: "server_unavailable"}
DEFAULT_MAX_BODY = 8 << 20
RETRY_AFTER_S = 1  # what an overloaded server's Retry-After says
INLINE_ENCODE_CHARS = 4096  # a larger input is tokenised on a worker thread, off the event loop
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class ServerState:
    """What the routes share: the engine, the tokenizer, the served name, the draining flag."""

    def __init__(self, engine, served_name: str, metrics=None, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY, rag_index=None, allowed_hosts: list[str] | None = None,
                 open_metrics: bool = False, allow_origins: list[str] | None = None):
        self.engine = engine  # serve.async_engine.AsyncEngine
        self.tokenizer = engine.engine.tokenizer
        self.max_context = engine.engine.max_context
        self.served_name = served_name
        self.metrics = metrics
        self.api_key = api_key
        self.open_metrics = open_metrics  # /metrics without the API key (a Prometheus scraper)
        self.allowed_hosts = allowed_hosts  # Host header names accepted (None: any)
        self.allow_origins = allow_origins or []  # web origins whose pages may call the API (CORS); none by default
        self.max_body_bytes = max_body_bytes
        self.created = now()
        self.rag_index = rag_index  # rag.index.Index: chat completions of `rag_name` answer from it
        self.rag_name = f"{served_name}-rag" if rag_index is not None else None
        self.pooling = rag_index.meta["pooling"] if rag_index is not None else "mean"
        self.draining = False
        self.active = 0  # HTTP requests in progress (responses still streaming included)

    @property
    def model_names(self) -> list[str]:
        return [self.served_name] + ([self.rag_name] if self.rag_name else [])

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves "
                                f"{' and '.join(map(repr, self.model_names))} (GET /v1/models lists them)",
                           param="model", code="model_not_found")

    def check_ready(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests", code="draining")
        if not self.engine.alive:
            raise ApiError(500, f"the engine stopped: {self.engine.error!r}", code="engine_failed")

    async def encode(self, prompt, param: str) -> list[int]:
        return (await self.encode_all([prompt], param))[0]

    async def encode_all(self, prompts: list, param: str) -> list[list[int]]:
        """Token ids of each prompt (text, chat messages or ids); a bad one is a 400 naming `param`. A large
        input is tokenised on a worker thread, so that it does not hold up the other clients' streams."""
        def encode():
            try:
                return [self.engine.engine.encode(p) for p in prompts]
            except RequestError as e:
                raise ApiError(400, str(e), param=param) from None

        if sum(map(_size, prompts)) <= INLINE_ENCODE_CHARS:
            return encode()
        return await asyncio.to_thread(encode)


def _size(prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m.get("content") or "") if isinstance(m, dict) else 1 for m in prompt)


def allowed_hosts(host: str, extra: list[str]) -> list[str] | None:
    """The Host header names a server bound to `host` accepts: the loopback names and the bound address, and
    `extra` (--allowed-host; "*" accepts any). A server bound to every address (0.0.0.0, ::) is reached by names
    it cannot know, so it accepts any Host unless --allowed-host names them. Checking Host closes the DNS-rebinding
    path from a web page to a server on 127.0.0.1."""
    if "*" in extra or (host in ("0.0.0.0", "::", "") and not extra):
        return None
    return [*LOOPBACK_HOSTS, host.strip("[]").lower(), *(h.lower() for h in extra)]


def host_name(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def given_key(headers: dict[str, str]) -> str:
    """The API key a request brings: `x-api-key: KEY`, or `Authorization: Bearer KEY` (any case of the scheme)."""
    if headers.get("x-api-key"):
        return headers["x-api-key"].strip()
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _is_anthropic(path: str) -> bool:
    return path.rstrip("/") in ("/v1/messages", "/v1/messages/count_tokens")


def error_response(path: str, status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """An error in the shape of the protocol `path` belongs to (Anthropic for /v1/messages, else OpenAI). An
    overloaded server's 429 is Anthropic's 529 `overloaded_error`; both say when to retry."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    if _is_anthropic(path):
        status = 529 if status == 429 else status
        return JSONResponse(anthropic_api.error_body(status, message), status_code=status, headers=headers)
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the Host header, the API key on /v1 routes (and /metrics), the body size limit (413), a
    JSON body sent without its Content-Type, and the count of requests in progress that the drain waits for."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, path = self.state, scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if state.allowed_hosts is not None and host_name(headers.get("host", "")) not in state.allowed_hosts:
            message = (f"the Host header {headers.get('host', '')!r} is not one this server answers to: start it "
                       f"with --allowed-host NAME to accept that name")
            return await error_response(path, 400, message, code="invalid_host")(scope, receive, send)
        guarded = path.startswith("/v1") or (path == "/metrics" and not state.open_metrics)
        if state.api_key and guarded:
            given = given_key(headers)
            if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                what = "no API key" if not given else "a wrong API key"
                message = f"the request has {what}: send 'Authorization: Bearer KEY' (or 'x-api-key: KEY')"
                return await error_response(path, 401, message, code="invalid_api_key")(scope, receive, send)
        if scope["method"] == "POST" and "content-type" not in headers:  # a JSON body sent without its type
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        limit = state.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await self._too_large(path, scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        state.active += 1
        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._too_large(path, scope, receive, send)
        finally:
            state.active -= 1

    async def _too_large(self, path, scope, receive, send):
        await error_response(path, 413, _too_large_message(self.state))(scope, receive, send)


def _too_large_message(state: ServerState) -> str:
    return f"the request body is larger than the server's limit of {state.max_body_bytes} bytes"



def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="astrai_ds", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.include_router(openai_api.router)
    app.include_router(anthropic_api.router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        param, message = validation_message(errors) if errors else ("", "invalid request")
        return error_response(request.url.path, 400, message, param or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if isinstance(e.__cause__, _TooLarge):  # FastAPI turns an error while reading the body into a 400
            return error_response(request.url.path, 413, _too_large_message(state))
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(request.url.path, e.status_code, message)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        return error_response(request.url.path, 500, f"internal error: {e!r}")

    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return JSONResponse({"status": "failed", "error": repr(state.engine.error)}, status_code=500)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "model": state.served_name}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render() if state.metrics else b"", media_type="text/plain; version=0.0.4")

    static = resources.files("astrai_ds.serve").joinpath("static")
    page = static.joinpath("chat.html").read_text(encoding="utf-8")
    # The page's own files: its script and style, and the libraries it renders answers with (no CDN: the server
    # may have no internet access).
    page_files = {name: (static.joinpath(name).read_bytes(), media_type) for name, media_type in (
        ("chat.js", "text/javascript"), ("chat.css", "text/css"), ("vendor/marked.umd.js", "text/javascript"),
        ("vendor/purify.min.js", "text/javascript"))}
    # The page holds the API key: it runs only its own scripts and talks only to this server, whatever HTML an
    # answer might smuggle past the sanitiser.
    page_policy = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
                   "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        name = state.served_name
        config = json.dumps({"model": name, "context": state.max_context}).replace("<", "\\u003c")
        return HTMLResponse(page.replace("{{CONFIG_JSON}}", config).replace("{{MODEL}}", html.escape(name)),
                            headers={"Content-Security-Policy": page_policy})

    @app.get("/static/{name:path}")
    async def chat_page_file(name: str):
        if name not in page_files:
            raise HTTPException(404)
        body, media_type = page_files[name]
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    app.add_middleware(Guard, state=state)
    if state.allow_origins:  # outside the Guard: a browser's preflight carries no API key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=state.allow_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-api-key", "anthropic-version",
                                          "anthropic-beta", "openai-organization", "openai-project"],
                           expose_headers=["retry-after"], max_age=600)
    return app
