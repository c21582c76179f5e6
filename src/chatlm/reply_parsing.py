"""The assistant's raw text back into a message: ``content``, ``reasoning_content`` and ``tool_calls``.

Chat models write tool calls and chains of thought inside their reply, each family with its own markers. The
format is read off the chat template (the template that writes ``<tool_call>`` for past calls is the one whose
model emits it), never guessed from the model's name. `ReplyParser` works incrementally, for streaming: it holds
back any text that could still turn out to be the start of a marker, so no piece of a tag ever reaches
``content``, and feeding a reply in any chunks gives the same message as parsing it whole.

Text that looks like a tool call but does not parse (truncated JSON, a call without a name) stays in ``content``
verbatim, markers included: nothing the model wrote is lost.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

ToolCall = dict[str, Any]
# A body parser turns the text of one tool-call region into calls, or None when it is not a valid call.
BodyParser = Callable[[str], "list[ToolCall] | None"]


@dataclass(frozen=True)
class ToolCallSyntax:
    """How one family writes tool calls: a region that opens with `open` and ends with `close` (None: at the end
    of the reply), or, with `bare_json`, a reply that is nothing but the calls' JSON.

    `forced_opening` is how a call starts, up to its function's name, when chatlm makes the reply start with one
    (``tool_choice`` "required" or a named function); None where chatlm cannot. `arguments_key` names the
    arguments in the call's JSON."""

    name: str
    open: str | None
    close: str | None
    parse_body: BodyParser
    bare_json: bool = False
    forced_opening: str | None = None
    arguments_key: str = "arguments"

    def forced_call(self, function: str | None = None) -> str:
        """The text a forced reply starts with: the call's opening, then the name and the start of the arguments
        when the function is given (the model writes the rest)."""
        if self.forced_opening is None:
            raise ValueError(f"chatlm cannot start a {self.name!r} tool call itself")
        if function is None:
            return self.forced_opening
        return f'{self.forced_opening}{function}", "{self.arguments_key}": {{'


@dataclass(frozen=True)
class ReplyFormat:
    """What a model may write besides plain content: tool calls in one syntax, and reasoning between two tags."""

    tool_calls: ToolCallSyntax | None = None
    reasoning: tuple[str, str] | None = None
    # tags around the answer itself (Command R's <|START_RESPONSE|>): dropped from the content
    content_tags: tuple[str, ...] = ()

    @property
    def is_plain(self) -> bool:
        return self.tool_calls is None and self.reasoning is None

    def for_request(self, tools_given: bool) -> ReplyFormat:
        """The format for one request: without tools, a reply that happens to be JSON is content, not a call
        (markers such as ``<tool_call>`` are still recognised)."""
        syntax = self.tool_calls
        if tools_given or syntax is None or not syntax.bare_json:
            return self
        syntax = replace(syntax, bare_json=False) if syntax.open else None
        return replace(self, tool_calls=syntax)


@dataclass(frozen=True)
class ReplyDelta:
    """One step of a streamed reply: new content, new reasoning, or one complete tool call."""

    content: str = ""
    reasoning_content: str = ""
    tool_call: ToolCall | None = None


# ------------------------------------------------------------------------------------------------ tool-call bodies


def _json_values(text: str, separators: str = "") -> list[Any] | None:
    """The JSON values that make up `text`, one after another (separated by whitespace or `separators`)."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
        if pos == len(text):
            return values or None
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _function_call(
    obj: Any, name_key: str = "name", args_keys: tuple[str, ...] = ("arguments", "parameters")
):
    """The OpenAI / transformers shape of one call written as a JSON object, or None if it is not one."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # already in the OpenAI shape
        return _function_call(obj["function"]) if "name" not in obj else None
    name = obj.get(name_key)
    if not isinstance(name, str) or not name:
        return None
    arguments = next((obj[key] for key in args_keys if key in obj), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI does
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    call: ToolCall = {"type": "function", "function": {"name": name, "arguments": arguments}}
    call_id = obj.get("id", obj.get("tool_call_id"))
    if isinstance(call_id, (str, int)) and not isinstance(call_id, bool):
        call["id"] = str(call_id)
    return call


def _calls(values: list[Any] | None, **keys) -> list[ToolCall] | None:
    """Every value a call, or a list of calls; None if any is not."""
    if not values:
        return None
    flat = [item for value in values for item in (value if isinstance(value, list) else [value])]
    calls = [_function_call(item, **keys) for item in flat]
    return calls if calls and all(calls) else None


def _json_calls(body: str) -> list[ToolCall] | None:
    return _calls(_json_values(body))


def _llama3_calls(body: str) -> list[ToolCall] | None:
    """Llama 3.1 / 3.2: JSON objects (``;``-separated when several), or a built-in tool as ``name.call(k=v)``."""
    return _calls(_json_values(body, separators=";")) or _builtin_tool_call(body.strip())


def _builtin_tool_call(text: str) -> list[ToolCall] | None:
    """``brave_search.call(query="...")``: Llama 3.1's built-in tools. Read with `ast`: literals only, no eval."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if not (
        isinstance(tree, ast.Call)
        and isinstance(tree.func, ast.Attribute)
        and tree.func.attr == "call"
        and isinstance(tree.func.value, ast.Name)
        and not tree.args
        and all(kw.arg for kw in tree.keywords)
    ):
        return None
    try:
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords}
    except ValueError:
        return None
    return [{"type": "function", "function": {"name": tree.func.value.id, "arguments": arguments}}]


def _command_r_calls(body: str) -> list[ToolCall] | None:
    return _calls(_json_values(body), name_key="tool_name", args_keys=("parameters",))


_DEEPSEEK_CALL = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁call▁end｜>", re.DOTALL)
_FENCED_JSON = re.compile(r"\A([^\n]+)\n```(?:json)?\n(.*)\n```\Z", re.DOTALL)


def _deepseek_calls(body: str) -> list[ToolCall] | None:
    """DeepSeek V3 / R1: ``TYPE<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```'' per call, V3.1: ``NAME<｜tool▁sep｜>ARGS``."""
    calls = []
    for match in _DEEPSEEK_CALL.finditer(body):
        left, sep, right = match.group(1).partition("<｜tool▁sep｜>")
        if not sep:
            return None
        fenced = _FENCED_JSON.match(right.strip())
        name, arguments = (fenced.group(1), fenced.group(2)) if fenced else (left, right)
        call = _function_call({"name": name.strip(), "arguments": arguments})
        if call is None:
            return None
        calls.append(call)
    if not calls or _DEEPSEEK_CALL.sub("", body).strip():
        return None
    return calls


# ------------------------------------------------------------------------------------------------ known formats

HERMES = ToolCallSyntax(
    "hermes", "<tool_call>", "</tool_call>", _json_calls, forced_opening='<tool_call>\n{"name": "'
)
MISTRAL = ToolCallSyntax(
    "mistral", "[TOOL_CALLS]", None, _json_calls, forced_opening='[TOOL_CALLS][{"name": "'
)
LLAMA3_JSON = ToolCallSyntax(
    "llama3_json",
    "<|python_tag|>",
    None,
    _llama3_calls,
    bare_json=True,
    forced_opening='{"name": "',
    arguments_key="parameters",
)
GRANITE = ToolCallSyntax(
    "granite", "<|tool_call|>", None, _json_calls, forced_opening='<|tool_call|>[{"name": "'
)
FIREFUNCTION = ToolCallSyntax("firefunction", "functools", None, _json_calls)
COMMAND_R = ToolCallSyntax("command_r", "<|START_ACTION|>", "<|END_ACTION|>", _command_r_calls)
DEEPSEEK = ToolCallSyntax("deepseek", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", _deepseek_calls)
GENERIC_JSON = ToolCallSyntax("json", None, None, _json_calls, bare_json=True, forced_opening='{"name": "')
TOOL_CALL_SYNTAXES = {
    s.name: s for s in (HERMES, MISTRAL, LLAMA3_JSON, GRANITE, FIREFUNCTION, COMMAND_R, DEEPSEEK)
}
TOOL_CALL_SYNTAXES[GENERIC_JSON.name] = GENERIC_JSON
THINK_TAGS = ("<think>", "</think>")
# Reasoning and answer tags, by the closing reasoning tag that the template mentions.
_REASONING_TAGS = [
    (("<think>", "</think>"), ("<response>", "</response>")),  # Granite 3.3 asks for both
    (("<|START_THINKING|>", "<|END_THINKING|>"), ("<|START_RESPONSE|>", "<|END_RESPONSE|>")),  # Command R7B
]

# What in a chat template's text gives its model's syntax away, most specific first.
_TEMPLATE_SIGNS: list[tuple[str, ToolCallSyntax]] = [
    ("<tool_call>", HERMES),
    ("[TOOL_CALLS]", MISTRAL),
    ("<|tool_call|>", GRANITE),
    ("<|START_ACTION|>", COMMAND_R),
    ("<｜tool▁calls▁begin｜>", DEEPSEEK),
    ("functools[", FIREFUNCTION),
    ("<|python_tag|>", LLAMA3_JSON),
    ('"parameters": dictionary of argument name', LLAMA3_JSON),  # Llama 3.2's instruction, without python_tag
]
_MENTIONS_TOOLS = re.compile(r"\btools\b")


def detect_reply_format(chat_template: str | None) -> ReplyFormat:
    """The reply format of the model whose chat template this is.

    Tool calls: the syntax whose markers the template writes; a template that takes ``tools`` without any known
    marker gets the generic one (a reply that is only a JSON call). Reasoning: ``<think>...</think>`` (or Command
    R's thinking tags) when the template mentions the closing tag.
    """
    if not chat_template:
        return ReplyFormat()
    syntax = next((s for sign, s in _TEMPLATE_SIGNS if sign in chat_template), None)
    if syntax is None and _MENTIONS_TOOLS.search(chat_template):
        syntax = GENERIC_JSON
    reasoning, content_tags = None, ()
    for think, answer in _REASONING_TAGS:
        if think[1] in chat_template:
            reasoning = think
            content_tags = tuple(tag for tag in answer if tag in chat_template)
            break
    return ReplyFormat(tool_calls=syntax, reasoning=reasoning, content_tags=content_tags)


# ------------------------------------------------------------------------------------------------ the parser


@dataclass
class _Text:
    """One output field built from pieces: whitespace next to a removed marker is dropped, the rest is kept."""

    parts: list[str] = field(default_factory=list)
    trim_start: bool = False  # drop whitespace until the first visible character (after a marker)
    held_space: str = ""  # trailing whitespace, kept back in case a marker follows

    def add(self, text: str, marker_follows: bool = False) -> str:
        if self.trim_start:
            text = text.lstrip()
            self.trim_start = not text
        text, self.held_space = self.held_space + text, ""
        if marker_follows:
            text = text.rstrip()
        else:
            visible = text.rstrip()
            text, self.held_space = visible, text[len(visible) :]
        if text:
            self.parts.append(text)
        return text

    def flush(self) -> str:
        text, self.held_space = self.held_space, ""
        if text:
            self.parts.append(text)
        return text

    @property
    def empty(self) -> bool:
        return not self.parts

    def __str__(self) -> str:
        return "".join(self.parts)


class ReplyParser:
    """Turns the text a chat model generates into a message, incrementally.

    ``prefix`` is the prompt the model continued: a template that pre-fills ``<think>`` makes the model write its
    reasoning first and only the closing tag. `feed` takes text as it comes and returns what became certain;
    `finish` returns the rest; `message` is the parsed message.
    """

    def __init__(self, reply_format: ReplyFormat, prefix: str = ""):
        self.format = reply_format
        self._syntax = reply_format.tool_calls
        self._buffer = ""
        self._region = ""  # the text of the tool-call region being read
        self._content, self._reasoning = _Text(), _Text()
        self._tool_calls: list[ToolCall] = []
        self._finished = False
        self._mode = "content"
        think = reply_format.reasoning
        if think and prefix.rstrip().endswith(think[0]) and prefix.rfind(think[0]) > prefix.rfind(think[1]):
            self._mode, self._reasoning.trim_start = "reasoning", True
        # a reply made only of a JSON call is recognised by its first visible character
        self._bare_json_possible = bool(self._syntax and self._syntax.bare_json)
        self._bare_region = False  # the region being read is a bare JSON reply, not between markers

    def feed(self, text: str) -> list[ReplyDelta]:
        if self._finished:
            raise ValueError("this reply has been finished: start a new ReplyParser")
        self._buffer += text
        return self._advance(final=False)

    def finish(self) -> list[ReplyDelta]:
        if self._finished:
            return []
        deltas = self._advance(final=True)
        self._finished = True
        return deltas

    @property
    def in_reasoning(self) -> bool:
        """Whether the text read so far ends inside the reasoning section."""
        return self._mode == "reasoning"

    @property
    def message(self) -> dict[str, Any]:
        """The parsed assistant message: ``content`` always, ``reasoning_content`` and ``tool_calls`` when there
        are any."""
        message: dict[str, Any] = {"role": "assistant", "content": str(self._content)}
        if not self._reasoning.empty:
            message["reasoning_content"] = str(self._reasoning)
        if self._tool_calls:
            message["tool_calls"] = [dict(call) for call in self._tool_calls]
        return message

    # -------------------------------------------------------------------------------------------- the state machine

    def _advance(self, final: bool) -> list[ReplyDelta]:
        deltas: list[ReplyDelta] = []
        step = {"content": self._in_content, "reasoning": self._in_reasoning, "tool": self._in_tool}
        while step[self._mode](deltas, final):
            pass
        if final:
            self._emit(deltas, content=self._content.flush(), reasoning=self._reasoning.flush())
        return deltas

    def _emit(self, deltas: list[ReplyDelta], content: str = "", reasoning: str = "") -> None:
        if content or reasoning:
            deltas.append(ReplyDelta(content=content, reasoning_content=reasoning))

    def _openers(self) -> list[tuple[str, str]]:
        openers = []
        if self.format.reasoning:
            openers.append((self.format.reasoning[0], "reasoning"))
        if self._syntax and self._syntax.open:
            openers.append((self._syntax.open, "tool"))
        openers.extend((tag, "content") for tag in self.format.content_tags)
        return openers

    def _in_content(self, deltas: list[ReplyDelta], final: bool) -> bool:
        if self._bare_json_possible and self._content.empty and not self._tool_calls:
            visible = self._buffer.lstrip()
            openers = [m for m, _ in self._openers()]
            if not final and (not visible or _partial_marker_length(visible, openers) == len(visible)):
                return False  # nothing visible yet, or maybe a marker: cannot tell yet
            if visible[:1] in ("{", "["):
                self._mode, self._region, self._bare_region = "tool", "", True
                return True
            if not any(visible.startswith(m) for m in openers):
                self._bare_json_possible = False  # plain text: a JSON call can only come first
        found = _earliest(self._buffer, self._openers())
        if found is not None:
            start, marker, mode = found
            self._emit(deltas, content=self._content.add(self._buffer[:start], marker_follows=True))
            self._buffer = self._buffer[start + len(marker) :]
            self._mode, self._region = mode, ""
            if mode == "reasoning":
                self._reasoning.trim_start = True
            elif mode == "content":  # an answer tag: dropped, with the whitespace next to it
                self._content.trim_start = True
            return True
        keep = 0 if final else _partial_marker_length(self._buffer, [m for m, _ in self._openers()])
        ready, self._buffer = (
            self._buffer[: len(self._buffer) - keep],
            self._buffer[len(self._buffer) - keep :],
        )
        self._emit(deltas, content=self._content.add(ready))
        return False

    def _in_reasoning(self, deltas: list[ReplyDelta], final: bool) -> bool:
        close = self.format.reasoning[1]
        end = self._buffer.find(close)
        if end >= 0:
            self._emit(deltas, reasoning=self._reasoning.add(self._buffer[:end], marker_follows=True))
            self._buffer = self._buffer[end + len(close) :]
            self._mode, self._content.trim_start = "content", True
            return True
        keep = 0 if final else _partial_marker_length(self._buffer, [close])
        ready, self._buffer = (
            self._buffer[: len(self._buffer) - keep],
            self._buffer[len(self._buffer) - keep :],
        )
        self._emit(deltas, reasoning=self._reasoning.add(ready))
        return False

    def _in_tool(self, deltas: list[ReplyDelta], final: bool) -> bool:
        close = None if self._bare_region else self._syntax.close
        end = self._buffer.find(close) if close else -1
        if end >= 0:
            self._region += self._buffer[:end]
            self._buffer = self._buffer[end + len(close) :]
            self._end_region(deltas, closed=True)
            return True
        keep = 0 if final or not close else _partial_marker_length(self._buffer, [close])
        self._region += self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep :]
        if final:
            self._end_region(deltas, closed=False)
        return False

    def _end_region(self, deltas: list[ReplyDelta], closed: bool) -> None:
        """A tool-call region is complete: its calls, or its text verbatim as content if it holds none."""
        calls = self._syntax.parse_body(self._region)
        if calls:
            # whitespace held before the region belonged to no field
            self._content.held_space = ""
            self._tool_calls.extend(calls)
            deltas.extend(ReplyDelta(tool_call=call) for call in calls)
            self._content.trim_start = True
        else:
            opener = "" if self._bare_region else self._syntax.open
            raw = opener + self._region + (self._syntax.close if closed and not self._bare_region else "")
            self._emit(deltas, content=self._content.add(raw))
        self._mode, self._region, self._bare_region = "content", "", False


def _earliest(text: str, markers: list[tuple[str, str]]) -> tuple[int, str, str] | None:
    best = None
    for marker, mode in markers:
        at = text.find(marker)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, marker, mode)
    return best


def _partial_marker_length(text: str, markers: list[str]) -> int:
    """The length of the longest end of `text` that a marker starts with (it may complete in the next piece)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


def parse_reply(text: str, reply_format: ReplyFormat, prefix: str = "") -> dict[str, Any]:
    """The message in a whole reply (see `ReplyParser`)."""
    parser = ReplyParser(reply_format, prefix=prefix)
    parser.feed(text)
    parser.finish()
    return parser.message
