"""The state behind every endpoint: the model, its tokenizer, the engine and the options (`Server`), and one
engine request seen from the event loop (`Job`), with the pieces of a reply that all APIs share."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import importlib.metadata
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from . import engine as engine_module
from .engine import Delta, Engine, EngineStopped, QueueFull, SamplingParams
from .protocol import APIError, bad, new_id, parse_json

# One line per request (``chatlm serve`` prints them; --quiet turns them off): the endpoint, the status, the tokens
# in and out, the time to the first token and the speed.
request_log = logging.getLogger("chatlm.requests")
BODY_TIMEOUT = 60.0  # seconds for a request's body, once its headers are in
current_route: contextvars.ContextVar[str] = contextvars.ContextVar("current_route", default="")


def log_rejected(status: int, message: str) -> None:
    request_log.info("%s %d %s", current_route.get(), status, message)


class Job:
    """One engine request seen from the event loop: its deltas arrive on an asyncio queue."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, n: int, skip_special: bool):
        self.engine = engine
        if any(not 0 <= token < engine.vocab for token, _ in params.logit_bias):
            raise APIError(
                400,
                f"'logit_bias' names a token id outside the vocabulary (0 to {engine.vocab - 1})",
                param="logit_bias",
                code="invalid_value",
            )
        self.route, self.started, self.first, self.generated = current_route.get(), time.monotonic(), None, 0
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
        """Deltas until every choice has finished. With ``http`` (a non-streaming request), a client that goes
        away cancels the generation at once: before the engine's next step, not when the reply is done."""
        watcher = asyncio.create_task(self._cancel_on_disconnect(http)) if http is not None else None
        try:
            while self.open:
                delta = await self.queue.get()
                if delta.finish_reason is not None:
                    self.open -= 1
                if delta.finish_reason == "error":
                    raise APIError(
                        500,
                        f"generating the reply failed ({delta.error}); the server goes on serving",
                        "server_error",
                        code="generation_failed",
                    )
                if delta.token_ids and self.first is None:
                    self.first = time.monotonic()
                self.generated += len(delta.token_ids)
                yield delta
        finally:
            if watcher is not None:
                watcher.cancel()
            if self.open:
                self.engine.cancel(self.request)
            self._log()

    async def _cancel_on_disconnect(self, http: Request) -> None:
        # the body has been read: the next message the connection sends is its end (streams do the same in
        # Starlette's StreamingResponse)
        while (await http.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(self.request)

    def _log(self) -> None:
        if not request_log.isEnabledFor(logging.INFO):
            return
        end = time.monotonic()
        prompt, cached = len(self.request.prompt), self.request.cached_tokens
        timing = ""
        if self.first is not None:
            speed = (
                (self.generated - 1) / (end - self.first) if self.generated > 1 and end > self.first else 0.0
            )
            timing = f", first token {1000 * (self.first - self.started):.0f} ms, {speed:.1f} tokens/s"
        request_log.info(
            "%s 200 prompt %d tokens (%d cached), reply %d tokens%s%s",
            self.route,
            prompt,
            cached,
            self.generated,
            timing,
            "" if not self.open else " (cancelled)",
        )


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
        """The API key, as OpenAI's clients send it ("Authorization: Bearer KEY") or Anthropic's ("x-api-key")."""
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            message = "no API key given" if not token else "the API key is not valid"
            raise APIError(
                401,
                f"{message}: send 'Authorization: Bearer KEY' (or 'x-api-key: KEY')",
                "authentication_error",
                code="invalid_api_key",
            )

    async def body(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large(int(declared))

        async def read() -> bytes:
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > self.max_body:
                    raise self._too_large(len(raw))
            return bytes(raw)

        try:  # a client that trickles its body must not hold a connection (and a handler) for ever
            raw = await asyncio.wait_for(read(), BODY_TIMEOUT)
        except asyncio.TimeoutError:
            raise APIError(
                408, f"the request body did not arrive within {BODY_TIMEOUT:g} s", code="request_timeout"
            ) from None
        return parse_json(raw)

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


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """OpenAI's usage record; ``cached``: prompt tokens reused from the prefix cache; ``reasoning``: reply tokens
    spent thinking (a reasoning model's section, its tags included)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
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
