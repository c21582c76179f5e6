"""OpenAI's Responses API (``POST /v1/responses``) over a `ChatRun`, stateless: the request's ``instructions`` and
``input`` items (messages, function calls and their outputs, reasoning) become the chat the template renders, its
flat function tools the template's, ``text.format`` the reply's constraint; the reply comes back as output items
(reasoning, message, function calls), whole or as the API's stream of events. Nothing is stored: a request that
needs an earlier response (``previous_response_id``, ``store``) is a 400 that says so."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ..chat_turn import thinking_kwargs
from .chat_run import ChatRun, ReplyStep
from .protocol import APIError, ChatRequest, Fields, bad, common_options, refuse_unknown
from .server import Server

# The fields read here; anything else is a 400 that names it (as on the other endpoints). "user", "metadata",
# "safety_identifier" and "prompt_cache_key" are the client's labels (chatlm's prefix cache needs no key); top_k,
# min_p, repetition_penalty, seed, stop, the penalties and logit_bias are the extensions chat completions takes.
RESPONSES_FIELDS = {
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
    "text", "reasoning", "stream", "store", "previous_response_id", "conversation", "background", "metadata",
    "user", "safety_identifier", "prompt_cache_key", "parallel_tool_calls", "truncation", "include",
    "top_logprobs", "service_tier",
}  # fmt: skip
_EXTENSIONS = (
    "top_k", "min_p", "repetition_penalty", "seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias",
)  # fmt: skip
_LOGPROBS = "message.output_text.logprobs"
_MEDIA = {"input_image": "an image", "input_file": "a file", "input_audio": "audio"}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class ResponsesRequest:
    chat: ChatRequest  # what the chat run needs
    echo: dict[str, Any]  # the settings the response object repeats, in the Responses API's shapes
    logprobs: bool  # include "message.output_text.logprobs"


def add_routes(app: FastAPI, server: Server) -> None:
    """``POST /v1/responses``, and a clear 404 for the routes that read stored responses."""

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await create_response(server, request)

    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])
    async def stored(response_id: str, request: Request):
        server.authorize(request)
        raise APIError(
            404,
            f"no response '{response_id}': chatlm keeps no responses (send the whole conversation in 'input')",
            "not_found_error",
            code="not_found",
        )


# --------------------------------------------------------------------------------------------- the request


def parse_responses(body: dict[str, Any]) -> ResponsesRequest:
    """A Responses API body as a chat request (and what the response repeats of it)."""
    _known_fields(body)
    fields = Fields(body)
    instructions = fields.get("instructions", (str,), None, "a string")
    include = fields.get("include", (list,), [], "a list")
    for entry in include:
        if entry != _LOGPROBS:
            raise bad("include", f"'include' may list only '{_LOGPROBS}' on chatlm, not {entry!r}")
    top = fields.integer("top_logprobs", None, 0, 20)
    if top is not None and _LOGPROBS not in include:
        raise bad("top_logprobs", f"'top_logprobs' needs 'include': ['{_LOGPROBS}']")
    max_output = fields.integer("max_output_tokens", None, 1)
    sampling = {
        name: body[name] for name in ("model", "temperature", "top_p", "stream", *_EXTENSIONS) if name in body
    }
    logprobs = _LOGPROBS in include
    common = common_options(
        Fields({**sampling, "max_tokens": max_output}), None, 1, (top or 0) if logprobs else None
    )
    tools, flat_tools = _tools(fields)
    choice, chat_choice = _tool_choice(body, flat_tools)
    text = fields.get("text", (dict,), {}, "an object")
    if text.get("verbosity") is not None:
        raise bad("text", "'text.verbosity' is not supported: the reply's length is the model's own")
    for key in set(text) - {"format", "verbosity"}:
        raise bad("text", f"'text' takes 'format', not {key!r}")
    text_format = text.get("format") or {"type": "text"}
    schema = _text_format(text_format)
    reasoning = fields.get("reasoning", (dict,), {}, "an object")
    effort = reasoning.get("effort")
    try:
        template_kwargs = thinking_kwargs(effort=effort)
    except ValueError as e:
        raise bad("reasoning", f"'reasoning.effort': {e}") from e
    for key in set(reasoning) - {"effort", "summary", "generate_summary"}:
        raise bad("reasoning", f"'reasoning' takes 'effort' and 'summary', not {key!r}")
    for key in ("summary", "generate_summary"):
        if reasoning.get(key) not in (None, "auto"):
            raise bad(
                "reasoning", f"'reasoning.{key}' must be 'auto': chatlm gives the model's reasoning itself"
            )
    chat = ChatRequest(
        **common,
        messages=_messages(body.get("input"), instructions),
        tools=tools if chat_choice != "none" else None,
        tool_choice=chat_choice,
        json_object=text_format.get("type") == "json_object",
        json_schema=schema,
        template_kwargs=template_kwargs,
    )
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_output,
        "metadata": fields.get("metadata", (dict,), {}, "an object"),
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": effort, "summary": reasoning.get("summary")},
        "service_tier": "default",
        "store": False,
        "temperature": chat.params.temperature,
        "text": {"format": text_format},
        "tool_choice": choice,
        "tools": flat_tools,
        "top_logprobs": top or 0,
        "top_p": chat.params.top_p,
        "truncation": "disabled",
        "user": fields.get("user", (str,), None, "a string"),
    }
    for label in ("safety_identifier", "prompt_cache_key"):
        if label in body:
            echo[label] = fields.get(label, (str,), None, "a string")
    return ResponsesRequest(chat, echo, logprobs)


def _known_fields(body: dict[str, Any]) -> None:
    """Unknown fields, and known ones with a value chatlm cannot honour, are 400s that name them."""
    refuse_unknown(body, RESPONSES_FIELDS | set(_EXTENSIONS))
    stateless = "chatlm keeps no responses: send the whole conversation in 'input'"
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            raise APIError(400, f"'{name}' is not supported: {stateless}", param=name, code="unsupported")
    if body.get("store"):
        raise APIError(400, f"'store': true is not supported: {stateless}", param="store", code="unsupported")
    if body.get("background"):
        raise bad("background", "'background': true is not supported: chatlm answers while the client waits")
    if body.get("parallel_tool_calls") is False:
        raise bad(
            "parallel_tool_calls",
            "'parallel_tool_calls': false is not supported (replies may hold several calls)",
        )
    if body.get("truncation") not in (None, "disabled"):
        raise bad("truncation", "'truncation' must be 'disabled': chatlm drops no input to fit the context")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise bad("service_tier", "'service_tier' must be 'auto' or 'default' on chatlm")


def _tools(fields: Fields) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Responses' flat function tools as the chat template takes them ({"type": "function", "function": {...}}),
    and as the response repeats them. ``strict`` goes with them: a strict tool's arguments are held to its
    parameters, as on chat completions (left out, as in chat, it is not strict)."""
    flat = fields.get("tools", (list,), [], "a list of tools")
    chat, echo = [], []
    for i, tool in enumerate(flat):
        if not isinstance(tool, dict):
            raise bad("tools", f"tool {i} must be an object such as {{'type': 'function', 'name': ...}}")
        if tool.get("type") != "function":
            raise bad(
                "tools",
                f"tool {i} is of type {tool.get('type')!r}: chatlm runs no built-in tools, only 'function' tools "
                "that the client calls itself",
            )
        extra = set(tool) - {"type", "name", "description", "parameters", "strict"}
        if extra:
            raise bad("tools", f"tool {i} has a field chatlm does not read: {sorted(extra)[0]!r}")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad("tools", f"tool {i} needs a 'name'")
        if not isinstance(tool.get("parameters", {}), (dict, type(None))):
            raise bad("tools", f"tool {i}: 'parameters' must be a JSON schema (an object)")
        if not isinstance(tool.get("strict", False), (bool, type(None))):
            raise bad("tools", f"tool {i}: 'strict' must be true or false")
        keys = ("name", "description", "parameters", "strict")
        function = {k: tool[k] for k in keys if tool.get(k) is not None}
        chat.append({"type": "function", "function": function})
        echo.append({"type": "function", "strict": None, "parameters": None, **function})
    return chat, echo


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]]) -> tuple[Any, Any]:
    """``tool_choice`` as given (or its default) and as chat's."""
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        if choice.get("type") != "function" or choice.get("name") not in {t["name"] for t in tools}:
            raise bad("tool_choice", f"'tool_choice' names no function among the tools: {choice!r}")
        return choice, {"type": "function", "function": {"name": choice["name"]}}
    if choice not in ("auto", "none", "required"):
        raise bad(
            "tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'name'}"
        )
    if choice == "required" and not tools:
        raise bad("tool_choice", "'tool_choice' is 'required' but no tools were given")
    return choice, choice


def _text_format(spec: Any) -> dict[str, Any] | bool | None:
    """``text.format``: the JSON schema the reply is held to (json_schema; held whether or not ``strict`` is
    set: chatlm has no looser mode), or None."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise bad("text", f"'text.format' type must be 'text', 'json_object' or 'json_schema', not {kind!r}")
    if kind != "json_schema":
        return None
    if not isinstance(spec.get("name"), str) or not _NAME.fullmatch(spec["name"]):
        raise bad("text", "'text.format.name' must be 1 to 64 letters, digits, '_' or '-'")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise bad("text", "'text.format.strict' must be true or false")
    schema = spec.get("schema")
    if not isinstance(schema, (dict, bool)):
        raise bad("text", "'text.format.schema' must be a JSON schema (an object)")
    return schema


def _messages(given: Any, instructions: str | None) -> list[dict[str, Any]]:
    """The chat the input items make: messages as they are ("developer" is "system"); function_call items join
    the assistant message of their turn as its tool_calls (arguments as the object the model wrote); a
    function_call_output is a "tool" message; a reasoning item's text is the next assistant message's
    ``reasoning_content`` (what the templates that keep reasoning read)."""
    messages = [{"role": "system", "content": instructions}] if instructions is not None else []
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise bad(
            "input", "'input' must be a string or a non-empty list of items (messages, function calls, ...)"
        )
    turn: dict[str, Any] | None = None  # the assistant message that this turn's items join
    names: dict[str, str] = {}  # call_id -> the function's name
    for i, item in enumerate(given):
        if not isinstance(item, dict):
            raise bad("input", f"input item {i} must be an object, not {type(item).__name__}")
        kind = item.get("type") or "message"
        if kind == "message":
            role = item.get("role")
            role = _ROLES.get(role) if isinstance(role, str) else None
            if role is None:
                raise bad(
                    "input", f"input item {i}: 'role' must be 'user', 'assistant', 'system' or 'developer'"
                )
            content = _text(item.get("content"), i, "content")
            if role != "assistant":
                messages.append({"role": role, "content": content})
                turn = None
            elif turn is not None and not turn["content"] and not turn.get("tool_calls"):
                turn["content"] = content
            else:
                turn = {"role": "assistant", "content": content}
                messages.append(turn)
        elif kind == "function_call":
            call_id, name, arguments = (_string(item, key, i) for key in ("call_id", "name", "arguments"))
            if turn is None:
                turn = {"role": "assistant", "content": ""}
                messages.append(turn)
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": _arguments(arguments)},
            }
            turn.setdefault("tool_calls", []).append(call)
            names[call_id] = name
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", i)
            output = _text(item.get("output"), i, "output")
            if isinstance(output, list):
                output = "\n".join(part["text"] for part in output)
            tool = {"role": "tool", "tool_call_id": call_id, "content": output}
            if call_id in names:
                tool["name"] = names[call_id]
            messages.append(tool)
            turn = None
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
            if text:  # (encrypted reasoning, which only OpenAI can read, has none)
                if turn is None:
                    turn = {"role": "assistant", "content": ""}
                    messages.append(turn)
                turn["reasoning_content"] = turn.get("reasoning_content", "") + text
        elif kind == "item_reference":
            raise bad(
                "input", f"input item {i} is an item_reference: chatlm keeps no items; send the item itself"
            )
        else:
            raise bad(
                "input",
                f"input item {i} is of type {kind!r}: chatlm takes messages, function_call, function_call_output "
                "and reasoning items",
            )
    for message in messages:
        if message.get("tool_calls") and not message["content"]:
            message["content"] = None  # as chat completions' clients send a message of calls only
    return messages


def _text(content: Any, i: int, key: str) -> str | list[dict[str, str]]:
    """A message's content (or a call's output): a string, or its text parts (input_text, output_text) as chat's
    text parts; an image or a file is a 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad("input", f"input item {i}: '{key}' must be a string or a list of content parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA:
            raise bad(
                "input",
                f"input item {i}: content part {j} is {_MEDIA[kind]} ({kind!r}), and this model reads text only",
            )
        text = part.get("refusal" if kind == "refusal" else "text") if kind else None
        if kind not in ("input_text", "output_text", "text", "refusal") or not isinstance(text, str):
            raise bad(
                "input", f"input item {i}: content part {j} must be {{'type': 'input_text', 'text': ...}}"
            )
        parts.append({"type": "text", "text": text})
    return parts


def _string(item: dict[str, Any], key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad("input", f"input item {i} ({item.get('type')}) needs '{key}' (a string)")
    return value


def _arguments(arguments: str) -> Any:
    """A call's arguments as the templates render them: the object (the JSON string, if it is not one)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    return value if isinstance(value, dict) else arguments


# --------------------------------------------------------------------------------------------- the response


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Output:
    """The response's output items, built from the run's steps in the order the reply writes them (reasoning,
    message, function calls), and with ``stream``, the events that tell of each piece. One builder serves both,
    so a streamed response ends as the plain one does. Content of whitespace only waits: next to a call it makes
    no message."""

    def __init__(self, server: Server, logprobs: bool, stream: bool):
        self.server, self.logprobs = server, logprobs
        self.events: list[str] | None = [] if stream else None
        self.sequence = 0
        self.items: list[dict[str, Any]] = []
        self.kind: str | None = None  # of the item being written: "reasoning", "message" or None
        self.parts: list[str] = []  # its text
        self.entries: list[dict[str, Any]] = []  # its log-probabilities
        self.blank = ""  # whitespace content not shown yet
        self.held: list[dict[str, Any]] = []  # log-probabilities of tokens not shown yet
        self.tokens = self.reasoning_tokens = 0
        self.finish_reason: str | None = None

    def event(self, kind: str, **fields: Any) -> None:
        if self.events is not None:
            data = {"type": kind, "sequence_number": self.sequence, **fields}
            self.events.append(f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n")
            self.sequence += 1

    def drain(self) -> list[str]:
        """The stream's events since the last drain."""
        events = self.events or []
        if self.events is not None:
            self.events = []
        return events

    def feed(self, step: ReplyStep) -> None:
        self.tokens += step.tokens
        self.reasoning_tokens += step.reasoning_tokens
        if self.logprobs and step.logprobs:
            self.held += self.server.token_logprobs(step.logprobs)
        if step.reasoning_tokens or any(p.tool_call for p in step.pieces):
            self.held = []  # thinking, or a call's markup: no text's tokens
        for piece in step.pieces:
            if piece.reasoning_content:
                self._write("reasoning", piece.reasoning_content)
            if piece.content:
                self._content(piece.content)
            if piece.tool_call:
                self._call(piece.tool_call)
        self.finish_reason = step.finish_reason or self.finish_reason

    def finish(self) -> str:
        """Close the output; the response's status."""
        calls = any(item["type"] == "function_call" for item in self.items)
        if (self.blank and not calls) or not self.items:
            self._write("message", self.blank)
        status = {"length": "incomplete", "cancelled": "failed"}.get(self.finish_reason or "", "completed")
        self._close("completed" if status == "completed" else "incomplete")
        return status

    def _content(self, text: str) -> None:
        if self.kind != "message" and not (self.blank + text).strip():
            self.blank += text
            return
        text, self.blank = self.blank + text, ""
        self._write("message", text)

    def _write(self, kind: str, text: str) -> None:
        if self.kind != kind:
            self._close("completed")
            self._open(kind)
        self.parts.append(text)
        where = self._where()
        if kind == "reasoning":
            self.event("response.reasoning_text.delta", **where, content_index=0, delta=text)
        elif text:
            logprobs, self.held = self.held, []
            self.entries += logprobs
            self.event("response.output_text.delta", **where, content_index=0, delta=text, logprobs=logprobs)

    def _open(self, kind: str) -> None:
        if kind == "message":
            item = {
                "id": _id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {
                "id": _id("rs"),
                "type": "reasoning",
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
            part = {"type": "reasoning_text", "text": ""}
        self.items.append(item)
        self.kind, self.parts, self.entries = kind, [], []
        self.event("response.output_item.added", output_index=len(self.items) - 1, item=item)
        self.event("response.content_part.added", **self._where(), content_index=0, part=part)

    def _close(self, status: str) -> None:
        if self.kind is None:
            return
        where, text = self._where(), "".join(self.parts)
        if self.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": self.entries}
            self.event(
                "response.output_text.done", **where, content_index=0, text=text, logprobs=self.entries
            )
        else:
            part = {"type": "reasoning_text", "text": text}
            self.event("response.reasoning_text.done", **where, content_index=0, text=text)
        self.event("response.content_part.done", **where, content_index=0, part=part)
        self.items[-1].update(content=[part], status=status)
        self.event("response.output_item.done", output_index=where["output_index"], item=self.items[-1])
        self.kind = None

    def _call(self, call: dict[str, Any]) -> None:
        self._close("completed")
        self.blank = ""
        function = call.get("function", call)
        name, arguments = function.get("name"), function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        item = {"id": _id("fc"), "type": "function_call", "status": "in_progress", "call_id": _id("call")}
        self.items.append({**item, "name": name, "arguments": ""})
        where = self._where()
        self.event("response.output_item.added", output_index=where["output_index"], item=self.items[-1])
        self.event("response.function_call_arguments.delta", **where, delta=arguments)
        self.event("response.function_call_arguments.done", **where, name=name, arguments=arguments)
        self.items[-1].update(arguments=arguments, status="completed")
        self.event("response.output_item.done", output_index=where["output_index"], item=self.items[-1])

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}


def _response(
    ident: str,
    created: int,
    server: Server,
    req: ResponsesRequest,
    run: ChatRun,
    output: _Output | None = None,
    status: str = "in_progress",
) -> dict[str, Any]:
    """The response object: in progress (no output yet), or with the finished output and its status."""
    body: dict[str, Any] = {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": server.name,
        "output": output.items if output is not None else [],
        "usage": None,
        **req.echo,
    }
    if status == "failed":
        body["error"] = {
            "code": "server_error",
            "message": "the generation was cancelled: the server is stopping",
        }
    if output is not None:
        body["completed_at"] = int(time.time()) if status == "completed" else None
        body["usage"] = {
            "input_tokens": run.prompt_tokens,
            "input_tokens_details": {"cached_tokens": run.cached_tokens},
            "output_tokens": output.tokens,
            "output_tokens_details": {"reasoning_tokens": output.reasoning_tokens},
            "total_tokens": run.prompt_tokens + output.tokens,
        }
    return body


# The chat names of the fields in ChatRun's errors, as the Responses API calls them.
_PARAMS = {"messages": "input", "response_format": "text", "max_tokens": "max_output_tokens"}


def _run(server: Server, req: ResponsesRequest) -> ChatRun:
    try:
        return ChatRun(server, req.chat)
    except APIError as e:
        if e.param in _PARAMS:
            e.param = _PARAMS[e.param]
            e.message = e.message.replace("response_format", "text.format").replace(
                "max_tokens", "max_output_tokens"
            )
        raise


async def create_response(server: Server, http: Request) -> Any:
    server.authorize(http)
    req = parse_responses(await server.body(http))
    server.check_model(req.chat.model)
    run = _run(server, req)
    ident, created = _id("resp"), int(time.time())
    if req.chat.stream:
        return StreamingResponse(
            _stream(server, req, run, ident, created),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    output = _Output(server, req.logprobs, stream=False)
    async for step in run.steps(http):
        output.feed(step)
    return _response(ident, created, server, req, run, output, output.finish())


async def _stream(
    server: Server, req: ResponsesRequest, run: ChatRun, ident: str, created: int
) -> AsyncIterator[str]:
    """The Responses stream: response.created and .in_progress, each output item's events as the reply writes
    it, and response.completed (or .incomplete, or .failed) with the whole response. No "[DONE]" follows."""
    output = _Output(server, req.logprobs, stream=True)
    output.event("response.created", response=_response(ident, created, server, req, run))
    output.event("response.in_progress", response=_response(ident, created, server, req, run))
    for event in output.drain():
        yield event
    try:
        async for step in run.steps():
            output.feed(step)
            for event in output.drain():
                yield event
    except APIError as error:  # the generation failed part way: an error event, then response.failed
        output.event("error", code=error.code, message=error.message, param=error.param)
        failed = _response(ident, created, server, req, run, output, output.finish())
        failed["status"] = "failed"
        failed["error"] = {"code": "server_error", "message": error.message}
        output.event("response.failed", response=failed)
        for event in output.drain():
            yield event
        return
    final = _response(ident, created, server, req, run, output, output.finish())
    output.event(f"response.{final['status']}", response=final)
    for event in output.drain():
        yield event
