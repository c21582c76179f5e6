"""The HTTP endpoints of the OpenAI API on FastAPI: handlers turn JSON into engine requests and stream back what
the engine's worker produces through a per-request asyncio queue."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import importlib.metadata
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..chat_turn import ChatTurn, UnsupportedToolChoice
from ..generation import grammar
from ..generation.prefix_cache import DEFAULT_MAX_BYTES, PrefixCache
from . import engine as engine_module
from .engine import Delta, Engine, EngineStopped, QueueFull, SamplingParams
from .json_mode import JsonConstraint
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    bad,
    new_id,
    parse_chat,
    parse_completion,
    parse_json,
)

MAX_BODY_BYTES = 4 * 1024 * 1024


class Job:
    """One engine request seen from the event loop: its deltas arrive on an asyncio queue."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, n: int, skip_special: bool):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.request = engine_module.Request(prompt, params, self._sink, n, skip_special_tokens=skip_special)
        self.open = n
        try:
            engine.submit(self.request)
        except QueueFull as e:
            raise APIError(
                429,
                f"the server is busy: {e}; retry shortly",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from e
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from e

    def _sink(self, delta: Delta) -> None:  # called on the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)

    async def deltas(self, http: Request | None = None) -> AsyncIterator[Delta]:
        """Deltas until every choice has finished. With ``http`` (a non-streaming request), a client that went
        away cancels the generation."""
        try:
            while self.open:
                if http is None:
                    delta = await self.queue.get()
                else:
                    try:
                        delta = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            return
                        continue
                if delta.finish_reason is not None:
                    self.open -= 1
                yield delta
        finally:
            if self.open:
                self.engine.cancel(self.request)


def system_fingerprint(model, name: str) -> str:
    """OpenAI's ``system_fingerprint``: what, besides the request, decides the replies (chatlm's version, the
    model, its dtype and quantization); a change of any changes the fingerprint."""
    quantization = getattr(model, "quantization_config", None)
    described = f"chatlm {importlib.metadata.version('chatlm')} {name} {model.config.model_type} {model.dtype} {quantization!r}"
    return "fp_" + hashlib.sha256(described.encode()).hexdigest()[:12]


class Server:
    """The state behind the endpoints: the model, its tokenizer, the engine and the options."""

    def __init__(self, model, tokenizer, model_name: str, api_key: str | None, engine: Engine, max_body: int):
        self.model, self.tokenizer, self.name = model, tokenizer, model_name
        self.api_key, self.engine, self.max_body = api_key, engine, max_body
        self.context = model.config.max_position_embeddings
        self.created = int(time.time())
        self.fingerprint = system_fingerprint(model, model_name)

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            message = "no API key given" if not token else "the API key is not valid"
            raise APIError(
                401,
                f"{message}: send 'Authorization: Bearer KEY'",
                "authentication_error",
                code="invalid_api_key",
            )

    async def body(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large(int(declared))
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body:
                raise self._too_large(len(raw))
        return parse_json(bytes(raw))

    def _too_large(self, size: int) -> APIError:
        return APIError(
            413,
            f"the request body ({size} bytes or more) is over the limit of {self.max_body} bytes",
            code="request_too_large",
        )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.name}'",
                param="model",
                code="model_not_found",
            )

    def fit(self, params: SamplingParams, given: bool, prompt_tokens: int) -> None:
        """Fill in max_tokens, or refuse a prompt that, with it, would not fit the context window (and a
        logit_bias outside the vocabulary)."""
        vocab = self.model.config.vocab_size
        outside = [token for token, _ in params.logit_bias if token >= vocab]
        if outside:
            raise bad(
                "logit_bias", f"'logit_bias' names token {outside[0]}, outside the vocabulary of {vocab}"
            )
        room = self.context - prompt_tokens
        if given and params.max_tokens > room:
            over = params.max_tokens - room
            raise APIError(
                400,
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({params.max_tokens}) is {over} tokens over "
                f"the model's context window of {self.context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if room < 1:
            raise APIError(
                400,
                f"the prompt ({prompt_tokens} tokens) fills the model's context window of {self.context} tokens "
                f"({1 - room} tokens over, with room for one reply token)",
                param="messages",
                code="context_length_exceeded",
            )
        if not given:
            params.max_tokens = room

    def token_logprobs(self, logprobs) -> list[dict[str, Any]]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in logprobs
        ]


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage record; ``cached``: prompt tokens reused from the prefix cache."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_chunk(kind: str, ident: str, created: int, server: Server, req, choices: list, **extra) -> str:
    """One server-sent event of a stream; with include_usage, every chunk carries "usage" (null until the last)."""
    body: dict[str, Any] = {
        "id": ident,
        "object": kind,
        "created": created,
        "model": server.name,
        "system_fingerprint": server.fingerprint,
        "choices": choices,
    }
    if req.include_usage:
        body["usage"] = None
    body.update(extra)
    return sse(body)


def finish_reason(reason: str | None) -> str | None:
    """The engine's reasons in the API: a generation cancelled by shutdown is "abort" (as vLLM says)."""
    return "abort" if reason == "cancelled" else reason


def openai_tool_calls(calls: list[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    """The parser's tool calls (arguments as a dict) as OpenAI sends them (arguments as a JSON string, an id)."""
    out = []
    for i, call in enumerate(calls):
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        out.append(
            {
                "index": start + i,
                "id": f"call_{new_id('x')[2:]}",
                "type": "function",
                "function": {
                    "name": function.get("name"),
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
    return out


# --------------------------------------------------------------------------------------------- chat completions


async def chat_completions(server: Server, http: Request) -> Any:
    server.authorize(http)
    req = parse_chat(await server.body(http), max_n=server.engine.max_batch)
    server.check_model(req.model)
    turn = _chat_turn(server.tokenizer, req)
    _constrain_json(server, req.params, turn)
    if req.json_schema is not None:
        _constrain_to_schema(server, req, turn)
    prompt = turn.prompt_ids
    server.fit(req.params, req.max_tokens_given, len(prompt))
    # markers such as <|python_tag|> may be special tokens: a reply to parse keeps them
    job = Job(server.engine, prompt, req.params, req.n, skip_special=not turn.parses_reply)
    ident, created = new_id("chatcmpl"), int(time.time())
    if req.stream:
        chunks = _chat_stream(server, req, job, ident, created, len(prompt), turn)
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    texts = [""] * req.n
    counts = [0] * req.n
    logprobs: list[list] = [[] for _ in range(req.n)]
    reasons: list[str | None] = [None] * req.n
    async for delta in job.deltas(http):
        texts[delta.index] += delta.text
        counts[delta.index] += len(delta.token_ids)
        if delta.logprobs:
            logprobs[delta.index] += delta.logprobs
        if delta.finish_reason:
            reasons[delta.index] = delta.finish_reason
    choices = []
    for i in range(req.n):
        message: dict[str, Any] = {"role": "assistant", "content": texts[i]}
        reason = finish_reason(reasons[i] or "cancelled")
        if turn.parses_reply:
            parsed = turn.parse_reply(texts[i])
            message["content"] = parsed["content"]
            if "reasoning_content" in parsed:
                message["reasoning_content"] = parsed["reasoning_content"]
            if parsed.get("tool_calls"):
                message["tool_calls"] = [
                    {k: v for k, v in c.items() if k != "index"}
                    for c in openai_tool_calls(parsed["tool_calls"])
                ]
                message["content"] = parsed["content"] or None
                reason = "tool_calls" if reason == "stop" else reason
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": {"content": server.token_logprobs(logprobs[i])}
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
        "usage": usage(len(prompt), sum(counts), job.request.cached_tokens),
    }


def _chat_turn(tokenizer, req: ChatRequest) -> ChatTurn:
    """The request's prompt and reply format; what the template or the model cannot do is a 400."""
    try:
        return ChatTurn.render(
            tokenizer,
            req.messages,
            tools=req.tools,
            tool_choice=req.tool_choice,
            json_object=req.json_object,
        )
    except UnsupportedToolChoice as e:
        raise APIError(400, str(e), param="tool_choice", code="unsupported") from e
    except (ValueError, TypeError) as e:
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from e


def _constrain_json(server: Server, params: SamplingParams, turn: ChatTurn) -> None:
    """What constrained decoding needs from the turn: the reply is JSON, goes on with the JSON the prompt began,
    and (tool_choice "required") starts with one of the tools' names."""
    if turn.json_reply:
        params.constraint = functools.partial(
            JsonConstraint,
            server.tokenizer,
            server.engine.eos,
            turn.json_prefix,
            turn.json_starts,
            not turn.parses_reply,  # the text the JSON is read from skips special tokens as the reply's does
        )


def _constrain_to_schema(server: Server, req: ChatRequest, turn: ChatTurn) -> None:
    """response_format json_schema: the reply is held to the schema by the grammar engine; a schema it cannot
    compile is a 400 that says why (never an unconstrained reply)."""
    if turn.parses_reply:
        raise APIError(
            400,
            "response_format 'json_schema' together with tools (or a reasoning model's reply format) is not "
            "supported yet",
            param="response_format",
            code="unsupported",
        )
    vocab, eos = server.model.config.vocab_size, list(server.engine.eos)
    try:
        engine_tok = grammar.engine_tokenizer(server.tokenizer, eos, vocab)
        compiled = grammar.json_schema_grammar(req.json_schema, engine_tok)
    except grammar.GrammarError as e:
        raise APIError(400, str(e), param="response_format", code="invalid_json_schema") from e
    req.params.constraint = functools.partial(grammar.GrammarConstraint, engine_tok, compiled, vocab, eos)


async def _chat_stream(
    server: Server,
    req: ChatRequest,
    job: Job,
    ident: str,
    created: int,
    prompt_tokens: int,
    turn: ChatTurn,
) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], **extra) -> str:
        return stream_chunk("chat.completion.chunk", ident, created, server, req, choices, **extra)

    def choice(index: int, delta: dict[str, Any], logprobs=None, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    parsers = [turn.reply_stream() if turn.parses_reply else None for _ in range(req.n)]
    calls = [0] * req.n
    generated = 0
    for i in range(req.n):
        yield chunk([choice(i, {"role": "assistant", "content": ""})])
    async for delta in job.deltas():
        generated += len(delta.token_ids)
        i = delta.index
        logprobs = {"content": server.token_logprobs(delta.logprobs)} if delta.logprobs else None
        pieces: list[dict[str, Any]] = []
        if parsers[i] is None:
            if delta.text:
                pieces.append({"content": delta.text})
        else:
            parsed = parsers[i].feed(delta.text)
            if delta.finish_reason:
                parsed += parsers[i].finish()
            for piece in parsed:
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
        if delta.finish_reason:
            reason = finish_reason(delta.finish_reason)
            if reason == "stop" and calls[i]:
                reason = "tool_calls"
            yield chunk([choice(i, {}, None, reason)])
    if req.include_usage:
        yield chunk([], usage=usage(prompt_tokens, generated, job.request.cached_tokens))
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
            _completion_stream(server, req, jobs, ident, created, prompts, texts),
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
) -> FastAPI:
    """The OpenAI-compatible app around one model. Its engine's thread starts here (``engine_thread=False``:
    the caller runs ``app.state.server.engine.run()`` itself) and stops with the app's lifespan. ``side``: how
    the engine reaches the model (`model_side`; tensor parallelism passes rank 0's broadcasting one, with its
    own prefix cache). ``cache_ram``: bytes of keys and values kept for prompts that start as earlier ones did
    (0: off). ``cors_origins``: the web origins whose pages may call the API from a browser (CORS; none by
    default, "*" for any)."""
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

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        engine.metrics.reject(error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        engine.metrics.reject(error.status_code)
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
