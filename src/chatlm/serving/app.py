"""The HTTP endpoints of the OpenAI API on FastAPI: handlers turn JSON into engine requests and stream back what
the engine's worker produces through a per-request asyncio queue."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..generation.prefix_cache import DEFAULT_MAX_BYTES, PrefixCache
from . import anthropic_api, responses_api
from . import web_page as web_page_routes
from .chat_run import ChatRun
from .engine import Engine, SamplingParams
from .protocol import APIError, ChatRequest, CompletionRequest, new_id, parse_chat, parse_completion
from .server import (
    Job,
    Server,
    current_route,
    finish_reason,
    log_rejected,
    openai_tool_calls,
    sse,
    stream_chunk,
    usage,
)

MAX_BODY_BYTES = 4 * 1024 * 1024


# --------------------------------------------------------------------------------------------- chat completions


async def chat_completions(server: Server, http: Request) -> Any:
    server.authorize(http)
    req = parse_chat(await server.body(http), max_n=server.engine.max_batch)
    server.check_model(req.model)
    run = ChatRun(server, req)
    ident, created = new_id("chatcmpl"), int(time.time())
    if req.stream:
        return StreamingResponse(
            failing_openly(server, _chat_stream(server, req, run, ident, created)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    replies = await run.replies(http)
    choices = []
    for i, reply in enumerate(replies):
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.reasoning is not None:
            message["reasoning_content"] = reply.reasoning
        reason = finish_reason(reply.finish_reason)
        if reply.tool_calls:
            message["tool_calls"] = [
                {k: v for k, v in c.items() if k != "index"} for c in openai_tool_calls(reply.tool_calls)
            ]
            message["content"] = reply.content or None
            reason = "tool_calls" if reason == "stop" else reason
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": {"content": server.token_logprobs(reply.logprobs)}
                if req.params.logprobs is not None
                else None,
                "finish_reason": reason,
            }
        )
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": server.name,
        "system_fingerprint": server.fingerprint,
        "choices": choices,
        "usage": usage(
            run.prompt_tokens,
            sum(r.tokens for r in replies),
            run.cached_tokens,
            sum(r.reasoning_tokens for r in replies),
        ),
    }


async def failing_openly(server: Server, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An OpenAI stream that fails part way (a choice's generation failed) ends with an error event in OpenAI's
    shape and ``[DONE]``, as vLLM ends one, instead of a cut connection."""
    try:
        async for event in events:
            yield event
    except APIError as error:
        server.engine.metrics.reject(error.status)
        log_rejected(error.status, error.message)
        yield sse(error.body())
        yield "data: [DONE]\n\n"


async def _chat_stream(
    server: Server, req: ChatRequest, run: ChatRun, ident: str, created: int
) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], **extra) -> str:
        return stream_chunk("chat.completion.chunk", ident, created, server, req, choices, **extra)

    def choice(index: int, delta: dict[str, Any], logprobs=None, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    calls = [0] * req.n
    generated = reasoning = 0
    for i in range(req.n):
        yield chunk([choice(i, {"role": "assistant", "content": ""})])
    async for step in run.steps():
        generated += step.tokens
        reasoning += step.reasoning_tokens
        i = step.index
        logprobs = {"content": server.token_logprobs(step.logprobs)} if step.logprobs else None
        pieces: list[dict[str, Any]] = []
        for piece in step.pieces:
            if piece.content:
                pieces.append({"content": piece.content})
            if piece.reasoning_content:
                pieces.append({"reasoning_content": piece.reasoning_content})
            if piece.tool_call:
                pieces.append({"tool_calls": openai_tool_calls([piece.tool_call], start=calls[i])})
                calls[i] += 1
        for k, piece in enumerate(pieces):
            yield chunk([choice(i, piece, logprobs if k == 0 else None)])
        if logprobs and not pieces:
            yield chunk([choice(i, {}, logprobs)])
        if step.finish_reason:
            reason = finish_reason(step.finish_reason)
            if reason == "stop" and calls[i]:
                reason = "tool_calls"
            yield chunk([choice(i, {}, None, reason)])
    if req.include_usage:
        yield chunk([], usage=usage(run.prompt_tokens, generated, run.cached_tokens, reasoning))
    yield "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------- text completions


async def completions(server: Server, http: Request) -> Any:
    server.authorize(http)
    req = parse_completion(await server.body(http), max_n=server.engine.max_batch)
    server.check_model(req.model)
    tok = server.tokenizer
    prompts = [p if isinstance(p, list) else tok(p)["input_ids"] for p in req.prompts]
    for p in prompts:
        if not p:
            raise APIError(400, "a prompt is empty: give at least one token", param="prompt")
        if any(not isinstance(t, int) or not 0 <= t < server.model.config.vocab_size for t in p):
            raise APIError(400, "a prompt token id is outside the vocabulary", param="prompt")
    params = []
    for p in prompts:
        own = SamplingParams(**vars(req.params))
        server.fit(own, req.max_tokens_given, len(p))
        params.append(own)
    jobs: list[Job] = []
    try:
        for p, own in zip(prompts, params):
            jobs.append(Job(server.engine, p, own, req.n, skip_special=True))
    except APIError:  # the queue filled up part way: the prompts already in line go too
        for job in jobs:
            server.engine.cancel(job.request)
        raise
    ident, created = new_id("cmpl"), int(time.time())
    texts = {}
    if req.echo:
        texts = {
            (j, i): tok.decode(p, skip_special_tokens=False)
            if isinstance(req.prompts[j], list)
            else req.prompts[j]
            for j, p in enumerate(prompts)
            for i in range(req.n)
        }
    if req.stream:
        return StreamingResponse(
            failing_openly(server, _completion_stream(server, req, jobs, ident, created, prompts, texts)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    outputs = {
        (j, i): {"text": texts.get((j, i), ""), "logprobs": [], "reason": None, "tokens": 0}
        for j in range(len(jobs))
        for i in range(req.n)
    }
    for j, job in enumerate(jobs):
        async for delta in job.deltas(http):
            out = outputs[j, delta.index]
            out["text"] += delta.text
            out["tokens"] += len(delta.token_ids)
            out["logprobs"] += delta.logprobs or []
            out["reason"] = delta.finish_reason or out["reason"]
    choices = []
    for (j, i), out in outputs.items():
        choices.append(
            {
                "index": j * req.n + i,
                "text": out["text"],
                "logprobs": _legacy_logprobs(server, out["logprobs"])
                if req.params.logprobs is not None
                else None,
                "finish_reason": finish_reason(out["reason"]),
            }
        )
    generated = sum(out["tokens"] for out in outputs.values())
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": server.name,
        "system_fingerprint": server.fingerprint,
        "choices": choices,
        "usage": usage(sum(len(p) for p in prompts) * req.n, generated, _cached(jobs) * req.n),
    }


def _cached(jobs: list[Job]) -> int:
    return sum(job.request.cached_tokens for job in jobs)


def _legacy_logprobs(server: Server, logprobs) -> dict[str, Any]:
    decode = server.tokenizer.decode
    tokens = [decode([lp.token_id], skip_special_tokens=False) for lp in logprobs]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{decode([t], skip_special_tokens=False): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


async def _completion_stream(
    server, req: CompletionRequest, jobs: list[Job], ident: str, created: int, prompts, texts
) -> AsyncIterator[str]:
    def chunk(choices, **extra) -> str:
        return stream_chunk("text_completion", ident, created, server, req, choices, **extra)

    generated = 0
    for (j, i), text in texts.items():
        yield chunk([{"index": j * req.n + i, "text": text, "logprobs": None, "finish_reason": None}])
    try:
        for j, job in enumerate(jobs):
            async for delta in job.deltas():
                generated += len(delta.token_ids)
                logprobs = _legacy_logprobs(server, delta.logprobs) if delta.logprobs else None
                reason = finish_reason(delta.finish_reason)
                yield chunk(
                    [
                        {
                            "index": j * req.n + delta.index,
                            "text": delta.text,
                            "logprobs": logprobs,
                            "finish_reason": reason,
                        }
                    ]
                )
    finally:
        for job in jobs:
            if job.open:
                server.engine.cancel(job.request)
    if req.include_usage:
        yield chunk([], usage=usage(sum(len(p) for p in prompts) * req.n, generated, _cached(jobs) * req.n))
    yield "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------- the application


def create_app(
    model,
    tokenizer,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_body: int = MAX_BODY_BYTES,
    engine_thread: bool = True,
    side=None,
    cache_ram: int = DEFAULT_MAX_BYTES,
    cors_origins: tuple[str, ...] = (),
    web_page: bool = True,
) -> FastAPI:
    """The OpenAI-compatible app around one model. Its engine's thread starts here (``engine_thread=False``:
    the caller runs ``app.state.server.engine.run()`` itself) and stops with the app's lifespan. ``side``: how
    the engine reaches the model (`model_side`; tensor parallelism passes rank 0's broadcasting one, with its
    own prefix cache). ``cache_ram``: bytes of keys and values kept for prompts that start as earlier ones did
    (0: off). ``cors_origins``: the web origins whose pages may call the API from a browser (CORS; none by
    default, "*" for any). ``web_page``: the chat page at ``/``."""
    engine = Engine(
        model,
        tokenizer,
        max_batch=max_batch,
        max_queue=max_queue,
        start=engine_thread,
        side=side,
        prefix_cache=PrefixCache(cache_ram) if cache_ram else None,
    )
    server = Server(model, tokenizer, model_name, api_key, engine, max_body)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="chatlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if cors_origins:  # off by default: a page elsewhere must not drive a local model unasked
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            allow_credentials="*" not in cors_origins,
        )

    @app.middleware("http")
    async def route_of_the_request(request: Request, call_next):
        current_route.set(f"{request.method} {request.url.path}")  # for the request's log line
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        engine.metrics.reject(error.status)
        log_rejected(error.status, error.message)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        engine.metrics.reject(error.status_code)
        log_rejected(error.status_code, str(error.detail))
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = APIError(
            error.status_code, f"{request.method} {request.url.path}: {error.detail}", kind
        ).body()
        return JSONResponse(body, status_code=error.status_code)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await chat_completions(server, request)

    @app.post("/v1/completions")
    async def complete(request: Request):
        return await completions(server, request)

    # the other APIs over the same chat runs: each module adds its own routes
    anthropic_api.add_routes(app, server)
    responses_api.add_routes(app, server)
    if web_page:
        web_page_routes.add_routes(app)

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        server.authorize(request)
        server.check_model(name)
        return _model_card(server)

    @app.get("/health")
    async def health():
        if engine.error is not None or not engine.alive:
            return JSONResponse({"status": "error", "detail": repr(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _model_card(server: Server) -> dict[str, Any]:
    return {
        "id": server.name,
        "object": "model",
        "created": server.created,
        "owned_by": "chatlm",
        "max_model_len": server.context,
    }
