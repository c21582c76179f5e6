"""OpenAI's request bodies in, typed requests out; a field that is missing, of the wrong type or out of range is an
`APIError` (HTTP 400) that names it, in the shape OpenAI's errors take."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..chat_turn import REASONING_EFFORTS, thinking_kwargs
from ..generation.sampling import SamplingParams


class APIError(Exception):
    """An error response: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


@dataclass
class CommonOptions:
    """What chat and text completions share."""

    model: str | None
    params: SamplingParams
    max_tokens_given: bool
    n: int
    stream: bool
    include_usage: bool


@dataclass
class ChatRequest(CommonOptions):
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    json_object: bool = False
    json_schema: dict[str, Any] | bool | None = None  # response_format json_schema's schema
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # more variables for the chat template
    reasoning_budget: int | None = None  # reply tokens the thinking section may take at most (None: no limit)
    continue_final: bool = False  # the reply goes on with the last (assistant) message: a prefill


@dataclass
class CompletionRequest(CommonOptions):
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False


# The fields each endpoint reads. Like OpenAI's API, anything else is a 400 that names it, so that a client never
# takes a parameter for honoured when it is not (vLLM's and llama.cpp's top_k, min_p and repetition_penalty are
# honoured extensions). "user" and "metadata" are the client's own labels, with no effect on the reply in OpenAI's
# API either.
_SAMPLING_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
    "presence_penalty", "frequency_penalty", "logprobs", "n", "stream", "stream_options", "logit_bias", "user",
    "metadata",
}  # fmt: skip
CHAT_FIELDS = _SAMPLING_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "response_format",
    "parallel_tool_calls", "store", "service_tier", "reasoning_effort", "chat_template_kwargs",
    "thinking_token_budget",
}  # fmt: skip
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt", "echo", "suffix", "best_of"}


def refuse_unknown(body: dict[str, Any], known: set[str]) -> None:
    """OpenAI's rule: a field the endpoint does not read is a 400 that names it."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(
            400,
            f"Unrecognized request argument supplied: {unknown[0]} (chatlm rejects parameters it does not honour)",
            param=unknown[0],
            code="unknown_parameter",
        )


def _known_fields(body: dict[str, Any], known: set[str]) -> None:
    refuse_unknown(body, known)
    # known, with a value chatlm cannot honour
    if body.get("parallel_tool_calls") is False:
        raise bad(
            "parallel_tool_calls",
            "'parallel_tool_calls': false is not supported (replies may hold several calls)",
        )
    if body.get("store"):
        raise bad("store", "'store': true is not supported: chatlm keeps no completions")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise bad("service_tier", "'service_tier' must be 'auto' or 'default' on chatlm")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of", "'best_of' other than 1 is not supported: use 'n'")


MAX_DEPTH = 64  # nesting of a request body: JSON schemas and tool arguments stay far below it
MAX_TOOLS = 128  # OpenAI's limit on a request's tools
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError as e:
        raise APIError(
            400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json"
        ) from e
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    _check_values(body)
    return body


def _check_values(body: dict[str, Any]) -> None:
    """Nesting at most `MAX_DEPTH` deep, and every string (keys too) valid Unicode: JSON's escapes can spell a
    lone surrogate ("\\ud800"), which no tokenizer or UTF-8 encoder takes."""
    stack: list[tuple[Any, int, str]] = [(v, 2, k) for k, v in body.items()]
    stack += [(k, 1, k) for k in body]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(
                400, f"'{field}' nests deeper than {MAX_DEPTH} levels", param=field, code="invalid_json"
            )
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(
                    400,
                    f"'{field}' holds a string that is not valid Unicode (a lone surrogate at {e.start})",
                    param=field,
                    code="invalid_value",
                ) from e
        elif isinstance(value, dict):
            stack += [(v, depth + 1, field) for v in value.values()] + [(k, depth, field) for k in value]
        elif isinstance(value, list):
            stack += [(v, depth + 1, field) for v in value]


class Fields:
    """Typed reads of a request body's fields, with OpenAI's ranges."""

    def __init__(self, body: dict[str, Any]):
        self.body = body

    def get(self, name: str, kinds: tuple[type, ...], default: Any = None, what: str = "") -> Any:
        value = self.body.get(name)
        if value is None:
            return default
        # bool is an int in Python, but not in JSON: true is no number
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise bad(
                name, f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, not {value!r}"
            )
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = float(self.get(name, (int, float), default, "a number"))
        if not low <= value <= high:
            raise bad(name, f"'{name}' must be between {low} and {high}, not {value}")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
        value = self.get(name, (int,), default, "an integer")
        if value is not None and (value < low or (high is not None and value > high)):
            limit = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise bad(name, f"'{name}' must be {limit}, not {value}")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        return self.get(name, (bool,), default, "true or false")


def _stop(fields: Fields) -> tuple[str, ...]:
    stop = fields.body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise bad("stop", "'stop' must be a non-empty string or a list of up to 16 non-empty strings")
    return tuple(stop)


def _logit_bias(fields: Fields) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: token id (a string of digits, as JSON keys are) -> a bias from -100 to 100."""
    bias = fields.get("logit_bias", (dict,), {}, "an object mapping token ids to biases")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise bad("logit_bias", f"'logit_bias' keys must be token ids, not {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad("logit_bias", f"'logit_bias' values must be numbers from -100 to 100, not {value!r}")
        out.append((int(key), float(value)))
    return tuple(out)


def common_options(fields: Fields, default_max_tokens: int | None, max_n: int, logprobs: int | None) -> dict:
    model = fields.get("model", (str,), None, "a string")
    max_tokens = fields.integer("max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = fields.integer("max_tokens", None, 1)
    options = fields.get("stream_options", (dict,), {}, "an object")
    stream = fields.flag("stream")
    if options and not stream:
        raise bad("stream_options", "'stream_options' is only allowed with \"stream\": true")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options", "'stream_options.include_usage' must be true or false")
    params = SamplingParams(
        max_tokens=max_tokens or default_max_tokens or 0,
        temperature=fields.number("temperature", 1.0, 0.0, 2.0),
        top_p=fields.number("top_p", 1.0, 0.0, 1.0),
        # top_k, min_p and repetition_penalty are not OpenAI's: vLLM's and llama.cpp's extensions, same ranges
        top_k=max(0, fields.integer("top_k", 0, -1)),  # -1 (vLLM) or 0: off
        min_p=fields.number("min_p", 0.0, 0.0, 1.0),
        # from 0.01: a penalty of 1e-300 divides scores into infinities
        repetition_penalty=fields.number("repetition_penalty", 1.0, 0.01, 2.0),
        seed=fields.integer("seed", None, -(2**63)),
        stop=_stop(fields),
        presence_penalty=fields.number("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=fields.number("frequency_penalty", 0.0, -2.0, 2.0),
        logprobs=logprobs,
        logit_bias=_logit_bias(fields),
    )
    if params.top_p == 0:
        raise bad("top_p", "'top_p' must be greater than 0")
    return dict(
        model=model,
        params=params,
        # an endpoint's own default (completions: 16) is a limit as a given one is; none: the context's room
        max_tokens_given=max_tokens is not None or default_max_tokens is not None,
        n=fields.integer("n", 1, 1, max_n),
        stream=stream,
        include_usage=include_usage,
    )


def _json_schema(response_format: dict[str, Any]) -> dict[str, Any] | bool:
    """OpenAI's ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``: the
    schema (the reply is held to it whether or not ``strict`` is set: chatlm has no looser mode)."""
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise bad(
            "response_format", "'response_format.json_schema' must be an object with 'name' and 'schema'"
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise bad(
            "response_format", "'response_format.json_schema.name' must be a name of 1 to 64 characters"
        )
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise bad("response_format", "'response_format.json_schema.strict' must be true or false")
    schema = spec.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise bad("response_format", "'response_format.json_schema.schema' must be a JSON schema (an object)")
    return schema


def _thinking(fields: Fields) -> tuple[dict[str, Any], int | None]:
    """The template variables and the reasoning budget a chat request asks for: ``chat_template_kwargs`` (vLLM's
    and SGLang's: any variables, e.g. ``{"enable_thinking": false}``), OpenAI's ``reasoning_effort`` ("none"
    turns thinking off), and ``thinking_token_budget`` (vLLM's: the thinking section's tokens at most)."""
    kwargs = dict(fields.get("chat_template_kwargs", (dict,), {}, "an object of template variables"))
    effort = fields.get("reasoning_effort", (str,), None, "a string")
    try:
        kwargs = {**thinking_kwargs(effort=effort), **kwargs}
    except ValueError as e:
        raise bad(
            "reasoning_effort", f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}"
        ) from e
    reserved = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message"}
    clash = sorted(reserved & set(kwargs))
    if clash:
        raise bad(
            "chat_template_kwargs", f"'chat_template_kwargs' cannot set {clash[0]!r}: it is the request's own"
        )
    return kwargs, fields.integer("thinking_token_budget", None, 0)


def _call_arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's clients send an earlier tool call's arguments as a JSON string; chat templates render them as an
    object (``| tojson``, as transformers' examples pass them): the string is read back, so that the prompt shows
    the call as the model wrote it, not a quoted string."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list) and any(isinstance(c, dict) for c in calls):
            message = {**message, "tool_calls": [_call_object(c) for c in calls]}
        out.append(message)
    return out


def _openai_roles(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's roles only (a role is written into the prompt as it is: an empty one or one carrying template
    markup must not get there); "developer" is the system message, as OpenAI's newer models call it. An assistant
    message's ``tool_calls`` is a list of function calls."""
    out = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in CHAT_ROLES:
            raise ValueError(f"message {i} has the role {role!r}: it must be one of {', '.join(CHAT_ROLES)}")
        if role == "developer":
            message = {**message, "role": "system"}
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise ValueError(f"message {i}: 'tool_calls' must be a list of calls in an assistant message")
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise ValueError(
                        f"message {i}: tool call {j} must be {{'type': 'function', 'function': {{'name': ..., "
                        "'arguments': ...}}}}"
                    )
                if not isinstance(function.get("arguments", {}), (str, dict)):
                    raise ValueError(
                        f"message {i}: tool call {j}'s 'arguments' must be a JSON string or an object"
                    )
        out.append(message)
    return out


def _call_object(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError as e:
        raise ValueError(f"a tool call's arguments are not valid JSON: {e}") from e
    return {**call, "function": {**function, "arguments": arguments}}


def parse_chat(body: dict[str, Any], max_n: int) -> ChatRequest:
    from ..chat_template import validate_chat

    _known_fields(body, CHAT_FIELDS)
    fields = Fields(body)
    if "messages" not in body:
        raise bad("messages", "'messages' is required: a list of {'role', 'content'} messages")
    try:
        messages = _call_arguments_as_objects(_openai_roles(validate_chat(body["messages"])))
    except (ValueError, TypeError) as e:
        raise bad("messages", str(e)) from e
    top = fields.integer("top_logprobs", None, 0, 20)
    wants = fields.flag("logprobs")
    if top is not None and not wants:
        raise bad("top_logprobs", "'top_logprobs' needs \"logprobs\": true")
    tools = fields.get("tools", (list,), None, "a list of tools")
    if tools is not None and len(tools) > MAX_TOOLS:
        raise bad("tools", f"'tools' holds {len(tools)} tools; at most {MAX_TOOLS} are allowed")
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(function, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(function.get("name"), str)
            or not function["name"]
            or not isinstance(function.get("parameters", {}), dict)
        ):
            raise bad(
                "tools",
                f"tool {i} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}: "
                "chatlm runs function tools only",
            )
    choice = body.get("tool_choice", "auto" if tools else "none")
    names = {t["function"]["name"] for t in tools or []}
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or name not in names:
            raise bad("tool_choice", f"'tool_choice' names no function among the tools: {choice!r}")
    elif choice not in ("auto", "none", "required"):
        raise bad("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or a named function")
    elif choice == "required" and not tools:
        raise bad("tool_choice", "'tool_choice' is 'required' but no tools were given")
    response_format = fields.get("response_format", (dict,), {"type": "text"}, "an object")
    kind = response_format.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise bad(
            "response_format",
            f"'response_format' type must be 'text', 'json_object' or 'json_schema', not {kind!r}",
        )
    schema = _json_schema(response_format) if kind == "json_schema" else None
    common = common_options(fields, None, max_n, (top or 0) if wants else None)
    template_kwargs, budget = _thinking(fields)
    return ChatRequest(
        **common,
        messages=messages,
        tools=tools if choice != "none" else None,
        tool_choice=choice,
        json_object=kind == "json_object",
        json_schema=schema,
        template_kwargs=template_kwargs,
        reasoning_budget=budget,
    )


def parse_completion(body: dict[str, Any], max_n: int) -> CompletionRequest:
    _known_fields(body, COMPLETION_FIELDS)
    fields = Fields(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt
        )
    ):
        prompts = list(prompt)
    else:
        raise bad("prompt", "'prompt' must be a string, a list of strings, or token ids (a list, or lists)")
    if body.get("suffix"):
        raise bad("suffix", "'suffix' (fill in the middle) is not supported")
    logprobs = fields.integer("logprobs", None, 0, 5)
    return CompletionRequest(
        **common_options(fields, 16, max_n, logprobs),  # 16: OpenAI's default for completions
        prompts=prompts,
        echo=fields.flag("echo"),
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
