"""The OpenAI-compatible routes, as one FastAPI app over a shared SDK client.

Bodies are read with a size cap and decoded with msgspec against ``schemas``; the
OpenAPI document declares those schemas (``openapi_extra``) so it describes what the
routes really accept. Every error, ours or the framework's, leaves as an OpenAI-style
error body.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse

from ..chat.reasoning import reasoning_parser
from ..config import HttpConfig
from ..sdk import AsyncClient
from ..sdk.errors import XllmError
from . import sse
from .errors import ApiError, ClientGone, decode_body, from_sdk
from .formats import ChatFormat, CompletionFormat, Format
from .generation import Generation
from .metrics import Metrics
from .params import Choice, chat_choices, chat_messages, completion_choices, completion_prompts
from .schemas import BODIES, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .tools import tool_plan

log = logging.getLogger(__name__)
T = TypeVar("T")
PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
         "/tokenize", "/detokenize", "/openapi.json")


@dataclass
class ShimState:
    """What every route shares: the SDK client, the served model, limits, metrics."""

    client: AsyncClient
    cfg: HttpConfig
    model: str  # the served model's name
    max_model_len: int
    metrics: Metrics
    generations: set[Generation] = field(default_factory=set)  # requests being answered

    def shut_down(self) -> None:
        """End every answer in progress (503), so the server can stop without waiting."""
        for gen in list(self.generations):
            gen.interrupt(ApiError(503, "the server is shutting down", "shutting_down"))


def build_app(state: ShimState) -> FastAPI:
    """The ASGI app of the shim."""
    app = FastAPI(title="xllm", summary="OpenAI-compatible API of an xllm deployment",
                  version="0.1.0", docs_url=None, redoc_url=None)
    if state.cfg.api_key:
        app.add_middleware(RequireKey, key=state.cfg.api_key)
    app.add_middleware(CountResponses, metrics=state.metrics)  # outermost: counts the 401s too
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        req = await read_body(request, CompletionRequest, state.cfg.max_body_bytes)
        check_model(state, req.model)
        choices = completion_choices(req)
        echo = await _echo_texts(state, req) if req.echo else None
        fmt = CompletionFormat(state.model, choices, req.logprobs, _usage_asked(req), echo, req.return_token_ids)
        return await generate(request, state, fmt, choices, req.stream)

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatRequest))
    async def chat_completions(request: Request) -> Response:
        req = await read_body(request, ChatRequest, state.cfg.max_body_bytes)
        check_model(state, req.model)
        plan = tool_plan(req, state.cfg.tool_call_parser)
        choices = chat_choices(req, plan)
        top_k = (req.top_logprobs or 0) if req.logprobs else None
        reasoning = reasoning_parser(state.cfg.reasoning_parser) if state.cfg.reasoning_parser else None
        fmt = ChatFormat(state.model, choices, top_k, _usage_asked(req), req.return_token_ids,
                         plan.parser, reasoning)
        return await generate(request, state, fmt, choices, req.stream)

    card = {"id": state.model, "object": "model", "created": int(time.time()), "owned_by": "xllm",
            "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> Response:
        try:
            await state.client.call("health", timeout=2.0)
        except XllmError as exc:
            raise ApiError(503, f"the engine is not serving: {exc.message}", "engine_unavailable")
        return _json({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            state.metrics.set_stats(await state.client.call("stats", timeout=2.0))
        except XllmError as exc:
            log.warning("no scheduler stats for /metrics: %s", exc)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", openapi_extra=_body(TokenizeRequest))
    async def tokenize(request: Request) -> Response:
        req = await read_body(request, TokenizeRequest, state.cfg.max_body_bytes)
        if req.model is not None:
            check_model(state, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of prompt or messages", "invalid_value", "prompt")
        args = ({"prompt": req.prompt, "add_special_tokens": req.add_special_tokens}
                if req.prompt is not None else {"messages": chat_messages(req.messages),
                                                "tools": [msgspec.to_builtins(t) for t in req.tools or []]})
        return _json(await _call(state, "tokenize", **args))

    @app.post("/detokenize", openapi_extra=_body(DetokenizeRequest))
    async def detokenize(request: Request) -> Response:
        req = await read_body(request, DetokenizeRequest, state.cfg.max_body_bytes)
        if req.model is not None:
            check_model(state, req.model)
        return _json(await _call(state, "detokenize", tokens=req.tokens))

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def generate(request: Request, state: ShimState, fmt: Format, choices: list[Choice],
                   stream: bool) -> Response:
    """Run the choices; answer with one JSON body, or an SSE stream once the first delta came
    (so a request the engine refuses still gets a plain 4xx)."""
    cap = state.cfg.max_concurrent_requests
    if cap and len(state.generations) >= cap:
        raise ApiError(429, f"too many requests in flight (at most {cap})", "too_many_requests")
    gen = Generation(state.client, choices, state.metrics, state.cfg.request_timeout_s,
                     lambda: state.generations.discard(gen))
    state.generations.add(gen)
    gen.watch(request)
    streaming = False
    try:
        deltas = gen.deltas()
        if stream:
            first = await deltas.__anext__()
            gen.unwatch()
            body = sse.events(gen, fmt, first, deltas)
            streaming = True

            async def close() -> None:  # the body may never start (the client left first)
                gen.cancel()

            return StreamingResponse(body, media_type="text/event-stream", headers=sse.HEADERS,
                                     background=BackgroundTask(close))
        async for index, delta in deltas:
            fmt.feed(index, delta)
        return _json(fmt.response())
    except ClientGone:
        return Response(status_code=499)
    finally:
        if not streaming:
            gen.cancel()


async def read_body(request: Request, cls: type[T], limit: int) -> T:
    """The body decoded as ``cls``: 413 past ``limit`` bytes, 400 when it does not fit."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", "body_too_large")
    return decode_body(bytes(body), cls)


def check_model(state: ShimState, name: str) -> None:
    """404 unless ``name`` is the served model."""
    if name != state.model:
        raise ApiError(404, f"the model `{name}` does not exist; this server serves `{state.model}`",
                       "model_not_found", "model")


class RequireKey:
    """ASGI middleware: every route but ``/health`` needs ``Authorization: Bearer <key>``
    (as vLLM's ``--api-key``); anything else gets 401 with an OpenAI-style body. Keys are
    compared in constant time."""

    OPEN = ("/health",)

    def __init__(self, app, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        why = "a wrong API key" if given else "no API key (send Authorization: Bearer KEY)"
        err = ApiError(401, f"the request has {why}", "invalid_api_key")
        await err.response()(scope, receive, send)


class CountResponses:
    """ASGI middleware counting responses by path and status (``xllm:http_requests_total``)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in PATHS else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_http(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


# -- helpers --------------------------------------------------------------------------------
async def _call(state: ShimState, method: str, **args) -> dict:
    try:
        return await state.client.call(method, timeout=30.0, **args)
    except XllmError as exc:
        raise from_sdk(exc) from None


async def _echo_texts(state: ShimState, req: CompletionRequest) -> list[str]:
    prompts = completion_prompts(req)
    return [p if isinstance(p, str) else (await _call(state, "detokenize", tokens=p))["prompt"]
            for p in prompts]


def _usage_asked(req: CompletionRequest | ChatRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _json(obj: dict, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def _body(cls: type) -> dict:
    ref = {"$ref": f"#/components/schemas/{cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        _, components = msgspec.json.schema_components(BODIES, ref_template="#/components/schemas/{name}")
        doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
        app.openapi_schema = doc
    return app.openapi_schema


async def _api_error(_request: Request, exc: ApiError) -> Response:
    return exc.response()


async def _http_error(_request: Request, exc: HTTPException) -> Response:
    code = "not_found" if exc.status_code == 404 else None
    return ApiError(exc.status_code, str(exc.detail), code).response()


async def _internal_error(_request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in the HTTP shim: %s", exc)
    return ApiError(500, "internal error", "internal_error").response()
