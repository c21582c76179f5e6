"""Anthropic's Messages API (``POST /v1/messages`` and ``/v1/messages/count_tokens``) over the same chat runs as
OpenAI's chat completions: Anthropic's messages become the chat template's (tool_use blocks an assistant's
``tool_calls``, tool_result blocks ``tool`` messages, as vLLM and llama.cpp convert them), and the parsed reply
becomes Anthropic's content blocks (thinking, text, tool_use), whole or as Anthropic's stream of events. Errors
take Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``, with the status the server chose."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat_turn import thinking_kwargs
from ..reply_parsing import ReplyDelta
from .chat_run import ChatRun, render_turn
from .engine import SamplingParams
from .protocol import APIError, ChatRequest, Fields, bad
from .server import Server, log_rejected

# The fields each endpoint reads; anything else is a 400 that names it (chatlm never takes a parameter it does not
# honour). "metadata" is the client's own label; "cache_control" (on the request, its blocks and tools) asks for
# prompt caching, which chatlm's prefix cache does for every prompt unasked.
MESSAGES_FIELDS = {
    "model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k", "stream",
    "metadata", "tools", "tool_choice", "thinking", "output_config", "output_format",
    "service_tier", "cache_control",
}  # fmt: skip
COUNT_TOKENS_FIELDS = {
    "model", "messages", "system", "tools", "tool_choice", "thinking", "output_config", "output_format",
    "cache_control",
}  # fmt: skip
_TOOL_FIELDS = {
    "type", "name", "description", "input_schema", "cache_control", "strict", "eager_input_streaming",
}  # fmt: skip


# Anthropic's error types by HTTP status (the status stays the one the server chose)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# Anthropic's content blocks that are no text, for a clear refusal: chatlm's models read text
_MEDIA = {"image": "an image", "document": "a document"}
# Anthropic's efforts as the reasoning efforts chat templates read (gpt-oss's low / medium / high)
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def add_routes(app: FastAPI, server: Server) -> None:
    """Anthropic's endpoints on the app; their errors, the server's own included, in Anthropic's shape."""

    @app.post("/v1/messages")
    async def create_message(request: Request):
        return await _anthropic_errors(server, messages(server, request))

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(request: Request):
        return await _anthropic_errors(server, count_tokens(server, request))


async def _anthropic_errors(server: Server, answer) -> Any:
    try:
        return await answer
    except APIError as e:
        server.engine.metrics.reject(e.status)
        log_rejected(e.status, e.message)
        return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


def error_body(error: APIError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


# --------------------------------------------------------------------------------------------- the endpoints


async def messages(server: Server, http: Request) -> Any:
    server.authorize(http)
    req, omit_thinking = parse_messages(await server.body(http))
    server.check_model(req.model)
    reply = MessageReply(server, ChatRun(server, req), omit_thinking)
    if req.stream:
        return StreamingResponse(
            _sse(reply), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    async for _ in reply.events(http):
        pass
    return reply.message


async def count_tokens(server: Server, http: Request) -> dict[str, int]:
    """The rendered prompt's tokens (a forced tool call's opening included): what the request would take in."""
    server.authorize(http)
    req, _ = parse_messages(await server.body(http), counting=True)
    server.check_model(req.model)
    return {"input_tokens": len(render_turn(server.tokenizer, req).prompt_ids)}


async def _sse(reply: MessageReply) -> AsyncIterator[str]:
    """Server-sent events as Anthropic writes them; an error after the stream began is an ``error`` event."""
    try:
        async for event in reply.events():
            yield _event(event)
    except APIError as e:
        yield _event(error_body(e))


def _event(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------------------------- the reply


class MessageReply:
    """A chat run's reply as Anthropic's message: the stream events that open, fill and close its content
    blocks as the parsed pieces come (`events`), and the whole message they add up to (`message`)."""

    def __init__(self, server: Server, run: ChatRun, omit_thinking: bool = False):
        self.server, self.run, self.omit_thinking = server, run, omit_thinking
        self.stop: str | None = None  # the stop sequence the reply ended at
        self.message: dict[str, Any] = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": server.name,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._usage(0, 0),
        }
        self._open: dict[str, Any] | None = None  # the block being written

    async def events(self, http: Request | None = None) -> AsyncIterator[dict[str, Any]]:
        """Anthropic's events in order; a generation cut short (the server shutting down) is an `APIError`.
        With ``http``, a client that goes away cancels the generation."""
        output = thinking = 0
        reason = None
        started = False
        try:
            async with contextlib.aclosing(self.run.steps(http)) as steps:
                async for step in steps:
                    if not started:  # the first step: the prompt is in, the part of it the cache held known
                        started = True
                        self.message["usage"] = self._usage(0, 0)
                        yield {"type": "message_start", "message": {**self.message, "content": []}}
                    output += step.tokens
                    thinking += step.reasoning_tokens
                    reason = step.finish_reason or reason
                    self.stop = step.stop or self.stop
                    for piece in step.pieces:
                        for event in self._piece(piece):
                            yield event
        finally:
            self.run.cancel()
        for event in self._close():
            yield event
        if reason not in ("stop", "length"):
            raise APIError(503, "the generation was cancelled: the server is shutting down", "server_error")
        self.message["stop_reason"] = self._stop_reason(reason)
        self.message["usage"] = self._usage(output, thinking)
        yield {
            "type": "message_delta",
            "delta": {
                "stop_reason": self.message["stop_reason"],
                "stop_sequence": self.message["stop_sequence"],
            },
            "usage": self.message["usage"],
        }
        yield {"type": "message_stop"}

    def _usage(self, output: int, thinking: int) -> dict[str, Any]:
        """Anthropic counts the prompt's tokens read from the cache apart from ``input_tokens``."""
        cached = self.run.cached_tokens
        usage: dict[str, Any] = {
            "input_tokens": self.run.prompt_tokens - cached,
            "output_tokens": output,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
        }
        if thinking:
            usage["output_tokens_details"] = {"thinking_tokens": thinking}
        return usage

    def _stop_reason(self, reason: str) -> str:
        if reason == "length":
            return "max_tokens"
        if any(block["type"] == "tool_use" for block in self.message["content"]):
            return "tool_use"
        if self.stop is not None:
            self.message["stop_sequence"] = self.stop
            return "stop_sequence"
        return "end_turn"

    def _piece(self, piece: ReplyDelta) -> Iterator[dict[str, Any]]:
        if piece.reasoning_content:
            yield from self._into("thinking")
            if not self.omit_thinking:
                self._open["thinking"] += piece.reasoning_content
                yield self._delta({"type": "thinking_delta", "thinking": piece.reasoning_content})
        if piece.content:
            yield from self._into("text")
            self._open["text"] += piece.content
            yield self._delta({"type": "text_delta", "text": piece.content})
        if piece.tool_call:
            yield from self._close()
            function = piece.tool_call.get("function", piece.tool_call)
            arguments = function.get("arguments") or {}
            block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": function["name"]}
            yield from self._start({**block, "input": arguments}, {**block, "input": {}})
            yield self._delta(
                {"type": "input_json_delta", "partial_json": json.dumps(arguments, ensure_ascii=False)}
            )
            yield from self._close()

    def _into(self, kind: str) -> Iterator[dict[str, Any]]:
        """Make the open block one of this kind: close another, open a new one."""
        if self._open is not None and self._open["type"] == kind:
            return
        yield from self._close()
        block = (
            {"type": "thinking", "thinking": "", "signature": ""}
            if kind == "thinking"
            else {"type": kind, "text": ""}
        )
        yield from self._start(block, dict(block))

    def _start(self, block: dict[str, Any], shown: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.message["content"].append(block)
        self._open = block
        yield {
            "type": "content_block_start",
            "index": len(self.message["content"]) - 1,
            "content_block": shown,
        }

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": len(self.message["content"]) - 1, "delta": delta}

    def _close(self) -> Iterator[dict[str, Any]]:
        if self._open is None:
            return
        if (
            self._open["type"] == "thinking"
        ):  # chatlm signs nothing: an empty signature, as a client expects one
            yield self._delta({"type": "signature_delta", "signature": ""})
        self._open = None
        yield {"type": "content_block_stop", "index": len(self.message["content"]) - 1}


# --------------------------------------------------------------------------------------------- the request


def parse_messages(body: dict[str, Any], counting: bool = False) -> tuple[ChatRequest, bool]:
    """A Messages request (with ``counting``, a count_tokens one) as a `ChatRequest`, and whether the thinking
    text is to be left out (``thinking.display`` "omitted")."""
    unknown = sorted(set(body) - (COUNT_TOKENS_FIELDS if counting else MESSAGES_FIELDS))
    if unknown:
        raise APIError(
            400,
            f"{unknown[0]}: Extra inputs are not permitted (chatlm rejects parameters it does not honour)",
            param=unknown[0],
            code="unknown_parameter",
        )
    fields = Fields(body)
    if not counting and body.get("max_tokens") is None:
        raise bad("max_tokens", "max_tokens: Field required (the most tokens the reply may take)")
    max_tokens = fields.integer("max_tokens", None, 1) or 0
    fields.get("metadata", (dict,), None, "an object")
    if body.get("service_tier") not in (None, "auto", "standard_only"):
        raise bad("service_tier", "service_tier must be 'auto' or 'standard_only'")
    fields.get("cache_control", (dict,), None, "an object")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=fields.number("temperature", 1.0, 0.0, 1.0),
        top_p=fields.number("top_p", 1.0, 0.0, 1.0),
        top_k=fields.integer("top_k", 0, 0),
        stop=_stop_sequences(body.get("stop_sequences")),
    )
    if params.top_p == 0:
        raise bad("top_p", "'top_p' must be greater than 0")
    tools = _tools(fields.get("tools", (list,), None, "a list of tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    template_kwargs, budget, omit_thinking = _thinking(body.get("thinking"))
    effort, schema = _output_config(
        fields.get("output_config", (dict,), {}, "an object"), body.get("output_format")
    )
    if effort is not None:
        template_kwargs.update(thinking_kwargs(effort=effort))
    messages = chat_messages(body.get("system"), body.get("messages"))
    req = ChatRequest(
        model=fields.get("model", (str,), None, "a string"),
        params=params,
        max_tokens_given=True,
        n=1,
        stream=fields.flag("stream"),
        include_usage=False,
        messages=messages,
        tools=tools if tools and choice != "none" else None,
        tool_choice=choice,
        json_schema=schema,
        template_kwargs=template_kwargs,
        reasoning_budget=budget,
        # a final assistant message is a prefill: the reply goes on with it (and holds only the new text)
        continue_final=messages[-1]["role"] == "assistant",
    )
    return req, omit_thinking


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise bad("stop_sequences", "stop_sequences must be a list of non-empty strings")
    return tuple(value)


def _tools(tools: list[Any] | None) -> list[dict[str, Any]]:
    """Anthropic's custom tools as the chat template takes tools (OpenAI's function shape)."""
    out = []
    for i, tool in enumerate(tools or []):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise bad("tools", f"{where} must be an object with 'name', 'description' and 'input_schema'")
        if tool.get("type") not in (None, "custom"):
            raise bad(
                "tools",
                f"{where} is Anthropic's server tool {tool['type']!r}, which chatlm cannot run: give custom tools "
                "(name, description, input_schema) and run them yourself",
            )
        unknown = sorted(set(tool) - _TOOL_FIELDS)
        if unknown:
            raise bad("tools", f"{where}.{unknown[0]}: Extra inputs are not permitted")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise bad("tools", f"{where}.name must be a non-empty string")
        if not isinstance(schema, dict):
            raise bad("tools", f"{where}.input_schema must be a JSON schema (an object)")
        function: dict[str, Any] = {"name": name}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        function["parameters"] = schema
        if tool.get("strict"):  # the input is held to input_schema
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any]:
    """Anthropic's tool_choice as chatlm's: "auto", "none", "required" (any tool) or a named function."""
    if choice is None:
        return "auto" if tools else "none"
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise bad(
            "tool_choice",
            "tool_choice must be {'type': 'auto' | 'any' | 'tool' | 'none'} ('tool' with a name)",
        )
    if choice.get("disable_parallel_tool_use"):
        raise bad(
            "tool_choice",
            "tool_choice.disable_parallel_tool_use is not supported (a reply may hold several calls)",
        )
    if kind in ("any", "tool") and not tools:
        raise bad("tool_choice", f"tool_choice {kind!r} needs tools")
    if kind == "tool":
        name = choice.get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise bad("tool_choice", f"tool_choice names no tool among the tools: {name!r}")
        return {"type": "function", "function": {"name": name}}
    return {"any": "required"}.get(kind, kind)


def _thinking(value: Any) -> tuple[dict[str, Any], int | None, bool]:
    """``thinking`` as the template variables that turn thinking on or off, the budget, and whether the thinking
    text is left out of the reply."""
    if value is None:
        return {}, None, False
    kind = value.get("type") if isinstance(value, dict) else None
    display = value.get("display") if isinstance(value, dict) else None
    if kind not in ("enabled", "adaptive", "disabled") or display not in (None, "summarized", "omitted"):
        raise bad(
            "thinking",
            "thinking must be {'type': 'enabled', 'budget_tokens': N}, {'type': 'adaptive'} or {'type': 'disabled'} "
            "(with 'display' 'summarized' or 'omitted')",
        )
    budget = None
    if kind == "enabled":
        budget = value.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise bad("thinking", "thinking.budget_tokens must be a positive integer")
    return thinking_kwargs(enabled=kind != "disabled"), budget, display == "omitted"


def _output_config(config: dict[str, Any], beta_format: Any) -> tuple[str | None, dict[str, Any] | None]:
    """``output_config``: the effort (as the reasoning effort templates read) and a JSON schema for the reply
    (``format``, or the structured-outputs beta's top-level ``output_format``)."""
    unknown = sorted(set(config) - {"effort", "format"})
    if unknown:
        raise bad("output_config", f"output_config.{unknown[0]}: Extra inputs are not permitted")
    effort = config.get("effort")
    if effort is not None and effort not in _EFFORTS:
        raise bad(
            "output_config", f"output_config.effort must be one of {', '.join(_EFFORTS)}, not {effort!r}"
        )
    form = config.get("format")
    if form is not None and beta_format is not None:
        raise bad("output_format", "give output_config.format or output_format, not both")
    form = beta_format if form is None else form
    if form is None:
        return _EFFORTS.get(effort), None
    if (
        not isinstance(form, dict)
        or form.get("type") != "json_schema"
        or not isinstance(form.get("schema"), dict)
    ):
        raise bad("output_config", "output_config.format must be {'type': 'json_schema', 'schema': {...}}")
    return _EFFORTS.get(effort), form["schema"]


# --------------------------------------------------------------------------------------------- the messages


def chat_messages(system: Any, messages: Any) -> list[dict[str, Any]]:
    """Anthropic's system prompt and messages as the chat template's messages: a system message first; a user's
    tool_result blocks as ``tool`` messages (in order, before the user's text); an assistant's tool_use blocks as
    its ``tool_calls`` and its thinking blocks as its ``reasoning_content`` (which templates such as Qwen3's show
    within a tool-calling turn). Images and documents are a 400: chatlm's models read text."""
    chat: list[dict[str, Any]] = []
    if system is not None:
        if not isinstance(system, (str, list)):
            raise bad("system", "system must be a string or a list of text blocks")
        chat.append(
            {"role": "system", "content": system if isinstance(system, str) else _texts(system, "system")}
        )
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages: a non-empty list of {'role', 'content'} messages is required")
    names: dict[str, str] = {}  # tool_use id -> the tool's name, for the tool messages that answer it
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise bad("messages", f"{where} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            raise bad(
                "messages",
                f"{where}.role must be 'user' or 'assistant', not {role!r} (the system prompt goes in 'system')",
            )
        if isinstance(content, str):
            chat.append({"role": role, "content": content})
        elif isinstance(content, list):
            chat += _user(content, where, names) if role == "user" else _assistant(content, where, names)
        else:
            raise bad("messages", f"{where}.content must be a string or a list of content blocks")
    return chat


def _block(block: Any, where: str, allowed: tuple[str, ...]) -> str:
    """The block's type, one of ``allowed``: a media block or one of another type is a 400 that names it."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind in allowed:
        return kind
    if kind in _MEDIA:
        raise bad("messages", f"{where} is {_MEDIA[kind]} ({kind!r}), and this model reads text only")
    raise bad("messages", f"{where} must be a content block of type {', '.join(allowed)}, not {kind!r}")


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise bad("messages", f"{where}.text must be a string")
    return text


def _texts(blocks: list[Any], where: str) -> list[dict[str, str]]:
    """Text blocks as the content parts the template gets (their cache_control and citations left behind)."""
    parts = []
    for j, block in enumerate(blocks):
        _block(block, f"{where}.{j}", ("text",))
        parts.append({"type": "text", "text": _text(block, f"{where}.{j}")})
    return parts


def _user(blocks: list[Any], where: str, names: dict[str, str]) -> list[dict[str, Any]]:
    out, parts = [], []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        if _block(block, at, ("text", "tool_result")) == "text":
            parts.append({"type": "text", "text": _text(block, at)})
            continue
        ident = block.get("tool_use_id")
        if not isinstance(ident, str):
            raise bad("messages", f"{at}.tool_use_id must be a string")
        content = block.get("content", "")
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in _texts(content, f"{at}.content"))
        elif not isinstance(content, str):
            raise bad("messages", f"{at}.content must be a string or a list of text blocks")
        if block.get("is_error"):  # templates have no field for it: the model reads it in the result
            content = f"Error: {content}" if content else "Error"
        tool = {"role": "tool", "tool_call_id": ident, "content": content}
        if ident in names:
            tool["name"] = names[ident]
        out.append(tool)
    if parts or not out:
        out.append({"role": "user", "content": parts})
    return out


def _assistant(blocks: list[Any], where: str, names: dict[str, str]) -> list[dict[str, Any]]:
    parts, reasoning, calls = [], [], []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        kind = _block(block, at, ("text", "thinking", "redacted_thinking", "tool_use"))
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise bad("messages", f"{at}.thinking must be a string")
            reasoning.append(block["thinking"])
        elif kind == "tool_use":
            ident, name, arguments = block.get("id"), block.get("name"), block.get("input")
            if not (isinstance(ident, str) and isinstance(name, str) and isinstance(arguments, dict)):
                raise bad("messages", f"{at} must have a string 'id' and 'name' and an object 'input'")
            names[ident] = name
            calls.append(
                {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}
            )
        # redacted_thinking is encrypted by Anthropic: nothing a local model can read
    message: dict[str, Any] = {"role": "assistant", "content": parts or ""}
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return [message]
