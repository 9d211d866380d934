"""The OpenAI-compatible ASGI app over an :class:`~.engine.Engine` (FastAPI; extra ``[serve]``).

``create_app(settings)`` loads the bundle in a background thread at startup (``/health``
answers 503 until the engine runs) and stops the engine at shutdown; ``create_app(engine)`` or
``create_app(engine, settings)`` (settings then guard the app: keys, CORS, body limit, model
name) leave the engine's lifecycle to the caller (an embedding process, a Ray Serve replica:
``serve/ray.py``). Handlers only encode, submit and stream: the engine's loop thread is the
only caller of the backend.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: invalid values
400, bad key 401, unknown model 404, body too large 413, queue full 429 + ``Retry-After``,
loading or draining 503. A client that disconnects (streamed or not) is cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llama_export.runtime.errors import InputError, LlamaExportError
from llama_export.runtime.sampling import SamplingOptions
from llama_export.runtime.serve import protocol as p
from llama_export.runtime.serve.engine import (
    Chunk,
    Engine,
    EngineOptions,
    EngineStoppedError,
    QueueFullError,
    RequestOptions,
    RequestStream,
)
from llama_export.runtime.serve.prometheus import metrics_text

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length",
          "cancelled": "abort", "error": "error"}
Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]],
                   Awaitable[None]]


@dataclass(frozen=True)
class ServeSettings:
    """What ``llama-export serve`` loads and how the app guards it."""

    bundle: str
    variant: str | None = None
    backend: str = "ort"
    provider: str = "cpu"
    threads: int | None = None
    spin: bool = True
    graph: str = "auto"
    engine: EngineOptions = field(default_factory=EngineOptions)
    model_name: str | None = None  # default: the bundle folder's name
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20


class _State:
    """The app's engine (None while loading) and what it was told."""

    def __init__(self, settings: ServeSettings | None, engine: Engine | None) -> None:
        self.settings, self.engine = settings, engine
        self.load_error: LlamaExportError | None = None
        self.created = int(time.time())
        self.model_name = (settings.model_name if settings and settings.model_name else None)
        self.on_ready: Callable[[str], None] = lambda note: None
        self.on_failure: Callable[[], None] = lambda: None

    def ready(self) -> Engine:
        if self.engine is None or not self.engine.running:
            raise EngineStoppedError("the model is still loading or the server is shutting "
                                     "down: retry shortly")
        return self.engine

    def load(self) -> None:
        from llama_export.runtime.bundle import load_bundle

        s = self.settings
        assert s is not None
        try:
            model = load_bundle(s.bundle, variant=s.variant, backend=s.backend,
                                provider=s.provider, threads=s.threads, spin=s.spin, graph=s.graph)
            self.engine = Engine(model, s.engine).start()
        except LlamaExportError as e:
            self.load_error = e
            self.on_failure()
            return
        self.on_ready(self.engine.describe())


def create_app(source: Engine | ServeSettings, settings: ServeSettings | None = None) -> FastAPI:
    """One app over one engine (see the module doc for who owns the engine's lifecycle).

    ``create_app(engine, settings)``: the caller owns ``engine`` (e.g. a Ray Serve replica) and
    ``settings`` only guard the app (API keys, CORS, body limit, model name); its bundle and
    engine fields are not loaded again."""
    if isinstance(source, ServeSettings):
        if settings is not None:
            raise TypeError("create_app(settings, settings): pass the settings once")
        engine, settings, bundle = None, source, source.bundle
    else:
        engine, bundle = source, str(source.model.path)
    state = _State(settings, engine)
    if state.model_name is None:
        state.model_name = bundle.rstrip("/").rsplit("/", 1)[-1] or "model"
    app = FastAPI(title="llama-export", lifespan=_lifespan(state) if engine is None else None,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    _install_errors(app)
    _routes(app, state)
    # Last added runs first: body limit, then CORS (so 401s carry its headers), then the key.
    if settings and settings.api_keys:
        app.add_middleware(_ApiKey, keys=settings.api_keys)
    if settings and settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes if settings else 1 << 20)
    return app


def _lifespan(state: _State) -> Callable[[FastAPI], Any]:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="llama-export-load", daemon=True).start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop, False)

    return lifespan


# ---- errors ---------------------------------------------------------------------------------
def _error(status: int, message: str, type_: str = "invalid_request_error",
           param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(p.error_body(message, type_, param, code), status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON: send a JSON object")
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
        return _error(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}",
                      param=loc[0] if loc else None)

    @app.exception_handler(LlamaExportError)
    async def ours(_: Request, exc: LlamaExportError) -> JSONResponse:
        if isinstance(exc, QueueFullError):
            return _error(429, str(exc), "rate_limit_error", code="rate_limit_exceeded",
                          headers={"Retry-After": "1"})
        if isinstance(exc, EngineStoppedError):
            return _error(503, str(exc), "service_unavailable", headers={"Retry-After": "1"})
        if isinstance(exc, InputError):
            return _error(400, str(exc))
        return _error(500, str(exc), "server_error")

    @app.exception_handler(HTTPException)
    async def http(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONResponse:  # keep the body OpenAI-shaped
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


class _ApiKey:
    """``Authorization: Bearer KEY`` on ``/v1/*``; everything else (``/health``) stays open."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") \
                and scope.get("method") != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not any(hmac.compare_digest(token, k) for k in self.keys):
                await _error(401, "invalid or missing API key: send Authorization: Bearer KEY",
                             code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413), by header and while streaming in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = _error(413, f"request body exceeds {self.limit} bytes", code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await too_big(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


# ---- routes ---------------------------------------------------------------------------------
def _routes(app: FastAPI, state: _State) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": str(state.load_error)}, 503)
        engine = state.engine
        if engine is None or not engine.running:
            return JSONResponse({"status": "loading"}, 503)
        snap = engine.snapshot()
        return JSONResponse({"status": "ok", "model": state.model_name,
                             "layout": engine.layout_name, "slots": snap.slots,
                             "running": snap.running, "waiting": snap.waiting})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = metrics_text(state.engine)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=str(state.model_name), created=state.created)])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: p.ChatCompletionRequest, request: Request) -> Response:
        engine = _check(state, req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        prompt = await asyncio.to_thread(engine.model.encode_chat, messages)
        return await _respond(request, engine, state, req, [prompt], chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: p.CompletionRequest, request: Request) -> Response:
        engine = _check(state, req)
        return await _respond(request, engine, state, req, _prompts(engine, req.prompt),
                              chat=False)


def _check(state: _State, req: p._Request) -> Engine:
    engine = state.ready()
    if req.model not in (None, "", state.model_name):
        raise HTTPException(404, f"the model '{req.model}' does not exist: this server serves "
                                 f"'{state.model_name}' (GET /v1/models)")
    return engine


def _prompts(engine: Engine, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [engine.model.encode(prompt)]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return [engine.model.encode(x) if isinstance(x, str) else list(x) for x in prompt]


def request_options(req: p._Request, engine: Engine, prompt_len: int, index: int) -> RequestOptions:
    """One choice's engine options (choice ``i`` of a seeded request uses ``seed + i``)."""
    limit = req.token_limit  # type: ignore[attr-defined]
    engine.check_prompt(prompt_len, limit)
    seed = None if req.seed is None else req.seed + index
    sampling = SamplingOptions(temperature=req.temperature, top_p=req.top_p,
                               top_k=max(req.top_k, 0), min_p=req.min_p,
                               repetition_penalty=req.repetition_penalty, seed=seed)
    return RequestOptions(max_tokens=limit, sampling=sampling, stop=tuple(req.stop or ()),
                          ignore_eos=req.ignore_eos, min_tokens=req.min_tokens)


async def _respond(request: Request, engine: Engine, state: _State, req: p._Request,
                   prompts: list[list[int]], chat: bool) -> Response:
    jobs = [(prompt, request_options(req, engine, len(prompt), i))
            for prompt in prompts for i in range(req.n)]
    streams: list[RequestStream] = []
    try:
        for prompt, opts in jobs:
            streams.append(engine.submit(prompt, opts))
    except LlamaExportError:
        for s in streams:
            s.cancel()
        raise
    reply = _Reply(f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", int(time.time()),
                   str(state.model_name), chat, sum(len(x) for x in prompts))
    if req.stream:
        return StreamingResponse(reply.events(streams, req.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect_unless_gone(request, reply, streams)


async def _collect_unless_gone(request: Request, reply: _Reply, streams: list[RequestStream]
                               ) -> Response:
    work = asyncio.ensure_future(reply.collect(streams))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():  # the client left: free its slots, answer nobody
        work.cancel()
        for s in streams:
            s.cancel()
        return Response(status_code=499)
    return JSONResponse(work.result())


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Chunk]]:
    """Chunks of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    q: asyncio.Queue[tuple[int, Chunk]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        async for chunk in s:
            await q.put((i, chunk))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                i, chunk = await q.get()
                yield i, chunk
                if chunk.finish_reason is not None:
                    break
    finally:
        for t in tasks:
            t.cancel()


@dataclass
class _Reply:
    """Builds one response (streamed or whole) from the engine's chunks."""

    id: str
    created: int
    model: str
    chat: bool
    prompt_tokens: int

    def usage(self, completion: int) -> p.Usage:
        return p.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                       total_tokens=self.prompt_tokens + completion)

    async def collect(self, streams: list[RequestStream]) -> dict[str, Any]:
        texts, reasons, completion = [""] * len(streams), [""] * len(streams), 0
        async for i, chunk in _merged(streams):
            texts[i] += chunk.text
            if chunk.finish_reason is not None:
                if chunk.error:
                    raise LlamaExportError(chunk.error)
                reasons[i], completion = FINISH[chunk.finish_reason], completion + chunk.completion_tokens
        usage = self.usage(completion)
        if self.chat:
            return p.ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage,
                                    choices=[p.ChatChoice(index=i, finish_reason=reasons[i],
                                                          message=p.ChatChoiceMessage(content=t))
                                             for i, t in enumerate(texts)]).model_dump()
        return p.Completion(id=self.id, created=self.created, model=self.model, usage=usage,
                            choices=[p.CompletionChoice(index=i, text=t, finish_reason=reasons[i])
                                     for i, t in enumerate(texts)]).model_dump()

    def _event(self, index: int | None, text: str | None, finish: str | None = None,
               first: bool = False, usage: p.Usage | None = None) -> str:
        """One SSE event as OpenAI streams it (``index`` None: the closing usage chunk). Plain
        dicts, not pydantic: this runs once per token per stream."""
        choices: list[dict[str, Any]] = []
        if index is not None and self.chat:
            delta = {"role": "assistant", "content": ""} if first else \
                ({} if text is None else {"content": text})
            choices.append({"index": index, "delta": delta, "logprobs": None,
                            "finish_reason": finish})
        elif index is not None:
            choices.append({"index": index, "text": text or "", "logprobs": None,
                            "finish_reason": finish})
        data: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.chat
                                else "text_completion", "created": self.created,
                                "model": self.model, "choices": choices}
        if usage is not None:
            data["usage"] = usage.model_dump()
        return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

    async def events(self, streams: list[RequestStream], include_usage: bool
                     ) -> AsyncIterator[str]:
        completion = 0
        try:
            if self.chat:  # the role comes first, once per choice
                for i in range(len(streams)):
                    yield self._event(i, "", first=True)
            async for i, chunk in _merged(streams):
                if chunk.error:
                    yield f"data: {json.dumps(p.error_body(chunk.error, 'server_error'))}\n\n"
                    return
                if chunk.text:
                    yield self._event(i, chunk.text)
                if chunk.finish_reason is not None:
                    completion += chunk.completion_tokens
                    yield self._event(i, None if self.chat else "", FINISH[chunk.finish_reason])
            if include_usage:
                yield self._event(None, None, usage=self.usage(completion))
            yield "data: [DONE]\n\n"
        finally:  # also on disconnect (the response task is cancelled): free the slots
            for s in streams:
                s.cancel()
