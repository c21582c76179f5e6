"""One turn of a chat: the prompt the template renders, the reply format it implies, and the reply parsed back.

The pipeline, the CLI and the server all go through `ChatTurn`: it renders the messages (and tools) with the
chat template, appends the opening of a tool call when ``tool_choice`` forces one, reads the reply format off the
template, and parses the model's reply, whole or streamed, as a continuation of that prompt. It also says what
constrained decoding needs: whether the reply must be JSON and the JSON the prompt already began.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .chat_template import text_content_parts, validate_chat
from .reply_parsing import ReplyDelta, ReplyFormat, ReplyParser, detect_reply_format
from .tool_schema import get_json_schema


class UnsupportedToolChoice(ValueError):
    """``tool_choice`` asks for a call that chatlm cannot start in this model's tool-call syntax."""


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


def thinking_kwargs(enabled: bool | None = None, effort: str | None = None) -> dict[str, Any]:
    """The template variables that turn a model's thinking on or off, under the names the templates read:
    ``enable_thinking`` (Qwen3, SmolLM3), ``thinking`` (DeepSeek-V3.1, Granite 3.3) and ``reasoning_effort``
    (gpt-oss). ``effort`` "none" turns thinking off; a template that reads none of them renders as before."""
    if effort is not None and effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}, not {effort!r}")
    if effort == "none":
        enabled = False
    out: dict[str, Any] = {}
    if enabled is not None:
        out["enable_thinking"] = out["thinking"] = enabled
    if effort not in (None, "none"):
        out["reasoning_effort"] = effort
    return out


def reply_format_for(tokenizer, tools: Sequence | None = None) -> ReplyFormat:
    """The reply format of the chat template a request with these tools uses (plain without a template)."""
    try:
        template = tokenizer.get_chat_template(None, tools)
    except ValueError:
        return ReplyFormat()
    return detect_reply_format(template).for_request(tools_given=bool(tools))


def forced_opening(reply_format: ReplyFormat, tool_choice: str | Mapping | None) -> str:
    """The text the reply is made to start with for ``tool_choice``: "" for "auto" / "none", a call's opening
    for "required", and the opening with the function's name for a named function."""
    if tool_choice in (None, "auto", "none"):
        return ""
    syntax = reply_format.tool_calls
    if syntax is None or syntax.forced_opening is None:
        kind = syntax.name if syntax else "none"
        raise UnsupportedToolChoice(
            f"tool_choice {tool_choice!r} needs a model whose tool calls chatlm can start itself; this model's "
            f"format is {kind!r} (use 'auto')"
        )
    if tool_choice == "required":
        return syntax.forced_call()
    return syntax.forced_call(tool_choice["function"]["name"])


def json_start(opening: str) -> str:
    """The JSON that a forced call's opening begins: a list of calls ("[{") or one call ("{")."""
    start = opening.find("[{")
    return opening[start:] if start >= 0 else opening[opening.index("{") :]


def _tool_name(tool: Any) -> str:
    schema = tool if isinstance(tool, Mapping) else get_json_schema(tool)
    return schema["function"]["name"]


@dataclass(frozen=True)
class ChatTurn:
    """A rendered chat prompt and how to read the reply to it (build one with `ChatTurn.render`)."""

    reply_format: ReplyFormat
    prompt: str  # the rendered prompt, a forced tool-call opening included: what the model continues
    prompt_ids: list[int]  # its tokens
    forced: str  # the forced tool-call opening at the end of `prompt` ("" when none)
    json_reply: bool  # the reply must be JSON: a forced call, or a request for a JSON object
    # for "required": the reply starts with one of these, a tool's name and its closing quote
    json_starts: tuple[str, ...]

    @classmethod
    def render(
        cls,
        tokenizer,
        messages: Sequence[Mapping],
        *,
        tools: Sequence | None = None,
        tool_choice: str | Mapping | None = None,
        documents: Sequence | None = None,
        continue_final_message: bool = False,
        json_object: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> ChatTurn:
        """Render `messages` for the model's reply (or, with ``continue_final_message``, to go on with the last
        message). `tool_choice` ("required" or a named function, with `tools`) makes the reply start with a tool
        call; a format chatlm cannot start one in raises `UnsupportedToolChoice`, before anything is rendered.
        ``json_object``: the request asks for a JSON reply. ``template_kwargs``: more variables for the template
        (``enable_thinking``, ``reasoning_effort``, ...: what the model's template reads). Content parts reach the template as text (see
        `chatlm.chat_template.text_content_parts`). Errors of the template are the tokenizer's (ValueError,
        TypeError)."""
        reply_format = reply_format_for(tokenizer, tools)
        forced = forced_opening(reply_format, tool_choice) if tools else ""
        chat = text_content_parts(tokenizer.get_chat_template(None, tools), validate_chat(messages))
        text = tokenizer.apply_chat_template(
            chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
            tokenize=False,
            **(template_kwargs or {}),
        )
        prompt = text + forced  # the reply starts with the opening of a call: the prompt goes on with it
        json_starts = (
            tuple(f'{_tool_name(t)}"' for t in tools) if forced and tool_choice == "required" else ()
        )
        return cls(
            reply_format=reply_format,
            prompt=prompt,
            prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"],
            forced=forced,
            json_reply=json_object or bool(forced),
            json_starts=json_starts,
        )

    @property
    def json_prefix(self) -> str:
        """The JSON the prompt already began, which the reply goes on with ("" when none)."""
        return json_start(self.forced) if self.forced else ""

    @property
    def parses_reply(self) -> bool:
        """Whether the reply can hold more than content (tool calls, reasoning) and needs `reply_stream`."""
        return not self.reply_format.is_plain

    def reply_stream(self) -> ReplyStream:
        """A parser for the reply as it is generated."""
        return ReplyStream(self)

    def parse_reply(self, text: str) -> dict[str, Any]:
        """The assistant message in a whole reply (special tokens included: some markers are special)."""
        stream = self.reply_stream()
        stream.feed(text)
        stream.finish()
        return stream.message


class ReplyStream:
    """The reply of one `ChatTurn` parsed as it comes: `feed` text, `finish` at the end, read `message`.

    The parser sees the reply as the model wrote it: after the prompt's own text, starting with the forced
    tool-call opening (which the prompt holds, so the generated text does not)."""

    def __init__(self, turn: ChatTurn):
        self._parser = ReplyParser(
            turn.reply_format, prefix=turn.prompt[: len(turn.prompt) - len(turn.forced)]
        )
        self._pending = self._parser.feed(turn.forced) if turn.forced else []

    def feed(self, text: str) -> list[ReplyDelta]:
        deltas, self._pending = self._pending + self._parser.feed(text), []
        return deltas

    def finish(self) -> list[ReplyDelta]:
        deltas, self._pending = self._pending + self._parser.finish(), []
        return deltas

    @property
    def in_reasoning(self) -> bool:
        """Whether the reply read so far ends inside its reasoning section."""
        return self._parser.in_reasoning

    @property
    def message(self) -> dict[str, Any]:
        return self._parser.message
