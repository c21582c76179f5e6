"""Replies parsed back into messages: tool calls of each family, reasoning, streaming, and round trips through
the real chat templates of ../shared/chat_templates."""

from __future__ import annotations

import itertools
import json
import random
from datetime import datetime

import pytest

from chatlm.chat_template import render_chat_template
from chatlm.reply_parsing import (
    TOOL_CALL_SYNTAXES,
    ReplyFormat,
    ReplyParser,
    detect_reply_format,
    parse_reply,
)
from conftest import SHARED

WEATHER = {"location": "Paris, France", "unit": "celsius"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the time in a time zone",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
        },
    },
]
CALLS = [
    ("get_weather", WEATHER, "call12345"),
    ("get_time", {"zone": "Europe/Paris", "note": 'a "quoted" <tag> ünïcode'}, "call67890"),
]


def _fmt(syntax: str | None, reasoning: bool = False) -> ReplyFormat:
    return ReplyFormat(
        tool_calls=TOOL_CALL_SYNTAXES[syntax] if syntax else None,
        reasoning=("<think>", "</think>") if reasoning else None,
    )


def _call(name, arguments, call_id=None):
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        call["id"] = call_id
    return call


# ------------------------------------------------------------------------------------------------ each family

FAMILY_REPLIES = [
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris, France", '
        '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.",
        [_call("get_weather", WEATHER), _call("get_time", {})],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius"}, '
        '"id": "abcDEF123"}, {"name": "get_time", "arguments": {}}]',
        "",
        [_call("get_weather", WEATHER, "abcDEF123"), _call("get_time", {})],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"location": "Paris, France", "unit": "celsius"}}',
        "",
        [_call("get_weather", WEATHER)],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Paris, France", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {}}',
        "",
        [_call("get_weather", WEATHER), _call("get_time", {})],
    ),
    (
        "llama3_json",
        '<|python_tag|>brave_search.call(query="weather in Paris", count=3)',
        "",
        [_call("brave_search", {"query": "weather in Paris", "count": 3})],
    ),
    (
        "granite",
        '<|tool_call|>[{"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius"}}]',
        "",
        [_call("get_weather", WEATHER)],
    ),
    (
        "firefunction",
        ' functools[{"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius"}}]',
        "",
        [_call("get_weather", WEATHER)],
    ),
    (
        "command_r",
        'I will look it up.<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "get_weather", "parameters": '
        '{"location": "Paris, France", "unit": "celsius"}}]<|END_ACTION|>',
        "I will look it up.",
        [_call("get_weather", WEATHER, "0")],
    ),
    (
        "deepseek",
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"location": '
        '"Paris, France", "unit": "celsius"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>get_time<｜tool▁sep｜>'
        "{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "",
        [_call("get_weather", WEATHER), _call("get_time", {})],
    ),
    (
        "json",
        '[{"name": "get_weather", "arguments": "{\\"location\\": \\"Paris, France\\", \\"unit\\": \\"celsius\\"}"}]',
        "",
        [_call("get_weather", WEATHER)],
    ),
]


@pytest.mark.parametrize("syntax, reply, content, calls", FAMILY_REPLIES)
def test_tool_calls_of_each_family(syntax, reply, content, calls):
    message = parse_reply(reply, _fmt(syntax))
    assert message == {"role": "assistant", "content": content, "tool_calls": calls}


@pytest.mark.parametrize(
    "syntax, reply",
    [
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"location": \n</tool_call> and more'),
        ("hermes", '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
        ("hermes", "<tool_call>\n" + '{"name": "f", "arguments": [1, 2]}'),  # arguments not an object
        ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Par'),  # cut off
        ("llama3_json", '{"answer": 42, "note": "JSON, but not a call"}'),
        ("llama3_json", "<|python_tag|>import os; os.system('rm -rf /')"),  # code, not a call: never run
        (
            "deepseek",
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        ),
        ("json", "[1, 2, 3]"),
    ],
)
def test_text_that_is_not_a_call_stays_content_verbatim(syntax, reply):
    message = parse_reply(reply, _fmt(syntax))
    assert message == {"role": "assistant", "content": reply}


def test_json_reply_is_content_when_the_request_has_no_tools():
    reply = '{"name": "get_weather", "parameters": {}}'
    fmt = detect_reply_format(_template("llama-3.2-3b-instruct.jinja"))
    assert "tool_calls" in parse_reply(reply, fmt.for_request(tools_given=True))
    assert parse_reply(reply, fmt.for_request(tools_given=False)) == {"role": "assistant", "content": reply}
    # markers still count without tools: the model wrote them
    hermes = detect_reply_format(_template("qwen2.5-7b-instruct.jinja")).for_request(tools_given=False)
    assert "tool_calls" in parse_reply('<tool_call>{"name": "f", "arguments": {}}</tool_call>', hermes)


def test_plain_reply_is_untouched():
    reply = '  Hello!\n\nHere is a JSON example: {"name": "x"}  \n'
    for syntax in TOOL_CALL_SYNTAXES:
        for reasoning in (False, True):
            assert parse_reply(reply, _fmt(syntax, reasoning))["content"] == reply


# ------------------------------------------------------------------------------------------------ reasoning


def test_reasoning_between_think_tags():
    reply = "<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello!"
    assert parse_reply(reply, _fmt(None, reasoning=True)) == {
        "role": "assistant",
        "content": "Hello!",
        "reasoning_content": "The user greets me.\nI greet back.",
    }
    # without reasoning in the format, the tags are content
    assert parse_reply(reply, _fmt(None))["content"] == reply


def test_reasoning_prefilled_by_the_template():
    """QwQ and DeepSeek-R1 templates end the prompt with <think>: the model writes only the closing tag."""
    template = _template("qwq-32b.jinja")
    prompt = render_chat_template(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt.rstrip().endswith("<think>")
    fmt = detect_reply_format(template)
    message = parse_reply("The user says hi.\n</think>\n\nHello!", fmt, prefix=prompt)
    assert message["reasoning_content"] == "The user says hi."
    assert message["content"] == "Hello!"
    # a prompt whose thinking is already closed (enable_thinking=False style) starts with content
    closed = prompt + "\n\n</think>\n\n"
    assert parse_reply("Hello!", fmt, prefix=closed) == {"role": "assistant", "content": "Hello!"}


def test_reasoning_cut_off_by_the_token_limit_is_all_reasoning():
    message = parse_reply("Let me think about", _fmt(None, True), prefix="<|im_start|>assistant\n<think>\n")
    assert message == {"role": "assistant", "content": "", "reasoning_content": "Let me think about"}


def test_reasoning_then_tool_call():
    reply = (
        '<think>Need the weather.</think>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    assert parse_reply(reply, _fmt("hermes", True)) == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Need the weather.",
        "tool_calls": [_call("get_time", {})],
    }


# ------------------------------------------------------------------------------------------------ streaming


STREAM_CASES = [(syntax, reply) for syntax, reply, _, _ in FAMILY_REPLIES] + [
    ("hermes", 'Text <tool_ca and <tool_call>{"name": broken</tool_call> <tool_call'),
    ("hermes", "<think>\nplan < think > </thin </think>\n\n answer <tool_call"),
    ("llama3_json", '  \n {"name": "f", "parameters": {"x": "<|python_tag|>"}}'),
    ("llama3_json", "<think>x</think>\n" + '{"name": "f", "parameters": {}}'),
    ("json", " [not json"),
    ("deepseek", "ok <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜>"),
    (None, "plain <think> text </think> stays"),
]


def _split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("syntax, reply", STREAM_CASES)
@pytest.mark.parametrize("reasoning", [False, True])
def test_streaming_in_any_chunks_gives_the_whole_text_message(syntax, reply, reasoning):
    fmt = _fmt(syntax, reasoning)
    whole = parse_reply(reply, fmt)
    rng = random.Random(hash((syntax, reply, reasoning)) & 0xFFFF)
    markers = [m for m in (fmt.reasoning or ()) if m]
    if fmt.tool_calls:
        markers += [m for m in (fmt.tool_calls.open, fmt.tool_calls.close) if m]
    for pieces in [list(reply), *(_split(reply, rng) for _ in range(30))]:
        parser = ReplyParser(fmt)
        deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
        assert parser.message == whole
        # the deltas add up to the message, and no delta carries a piece of a marker the parser removed
        assert "".join(d.content for d in deltas) == whole["content"]
        assert "".join(d.reasoning_content for d in deltas) == whole.get("reasoning_content", "")
        assert [d.tool_call for d in deltas if d.tool_call] == whole.get("tool_calls", [])
        if "tool_calls" in whole or "reasoning_content" in whole:
            for d in deltas:
                for marker in markers:
                    for n in range(2, len(marker) + 1):
                        part = marker[:n]
                        if d.content.endswith(part) and part not in whole["content"]:
                            raise AssertionError(f"delta {d.content!r} leaks {part!r}")


def test_parser_refuses_text_after_finish():
    parser = ReplyParser(_fmt("hermes"))
    parser.finish()
    with pytest.raises(ValueError, match="finished"):
        parser.feed("more")


# ------------------------------------------------------------------------------------------------ real templates

TEMPLATES = "chat_templates/templates_public"


@pytest.fixture(scope="module")
def template_index(shared_dir):
    index = json.loads((shared_dir / TEMPLATES / "index.json").read_text())
    return {entry["file"]: entry for entry in index["templates"]}


def _template(name: str) -> str:
    path = SHARED / TEMPLATES / name
    if not path.is_file():
        pytest.skip(f"the shared chat templates are not at {path.parent}")
    with open(path, newline="") as f:
        return f.read()


TOOL_TEMPLATES = [
    ("command-r7b-12-2024-tool_use.jinja", "command_r"),
    ("deepseek-r1-distill-qwen-32b.jinja", "deepseek"),
    ("deepseek-v3.1.jinja", "deepseek"),
    ("firefunction-v2.jinja", "firefunction"),
    ("hermes-2-pro-llama-3-8b-tool_use.jinja", "hermes"),
    ("llama-3.1-8b-instruct.jinja", "llama3_json"),
    ("llama-3.2-3b-instruct.jinja", "llama3_json"),
    ("mistral-7b-instruct-v0.3.jinja", "mistral"),
    ("qwen2.5-7b-instruct.jinja", "hermes"),
    ("qwq-32b.jinja", "hermes"),
]


def test_formats_come_from_the_templates(template_index):
    """Each template that renders past tool calls gets the syntax whose marker it writes; the others none."""
    expected = dict(TOOL_TEMPLATES)
    for name, entry in template_index.items():
        fmt = detect_reply_format(_template(name))
        if name in expected:
            assert fmt.tool_calls is not None and fmt.tool_calls.name == expected[name], name
        elif not entry["features"]["tools"]:
            assert fmt.tool_calls is None, name
        has_think = any(tag in _template(name) for tag in ("</think>", "<|END_THINKING|>"))
        assert (fmt.reasoning is not None) == has_think, name


# Variables some templates need besides the tools (firefunction takes its functions as a JSON text).
TEMPLATE_VARIABLES = {"firefunction-v2.jinja": {"functions": json.dumps(TOOLS), "datetime": "2025-03-14"}}
THOUGHT = "The user wants the weather."


def _assistant_text(name: str, template: str, entry: dict, chat: list[dict]) -> tuple[str, str]:
    """The prompt, and what the model would have generated for the final assistant message of `chat`: the
    template's rendering of it after the generation prompt, up to the end of the turn. A prompt that pre-fills
    the reasoning tag gets a reasoning text and the closing tag in front of the rendered message."""
    variables = {**entry["special_tokens"], **TEMPLATE_VARIABLES.get(name, {})}
    kwargs = dict(tools=TOOLS, now=datetime(2025, 3, 14, 15, 9, 26), **variables)
    prompt = render_chat_template(template, chat[:-1], add_generation_prompt=True, **kwargs)
    full = render_chat_template(template, chat, **kwargs)
    reasoning = detect_reply_format(template).reasoning
    if not full.startswith(prompt) and reasoning and prompt.rstrip().endswith(reasoning[0]):
        opened = prompt.rstrip()[: -len(reasoning[0])]
        assert full.startswith(opened), "the rendering of the reply extends the prompt"
        full = prompt + f"{THOUGHT}\n{reasoning[1]}\n\n" + full[len(opened) :]
    assert full.startswith(prompt), "the rendering of the reply extends the prompt"
    reply = full[len(prompt) :]
    eos = variables.get("eos_token")
    ends = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|END_OF_TURN_TOKEN|>", "<｜end▁of▁sentence｜>", eos)
    cut = min((reply.find(end) for end in ends if end and end in reply), default=len(reply))
    return prompt, reply[:cut].rstrip()


# DeepSeek-R1-Distill's template writes a past call only when its content is None, a key that rendering drops
# (in transformers too): it never renders calls. Its call syntax is checked with the other families above.
ROUND_TRIP_TEMPLATES = [
    (name, syntax) for name, syntax in TOOL_TEMPLATES if not name.startswith("deepseek-r1")
]


@pytest.mark.parametrize("name, syntax", ROUND_TRIP_TEMPLATES)
def test_tool_calls_round_trip_through_the_template(name, syntax, template_index):
    """A message with tool calls, rendered by the real template as the model would write it, parses back to the
    same calls (ids where the format carries them)."""
    template, entry = _template(name), template_index[name]
    fmt = detect_reply_format(template).for_request(tools_given=True)
    tried = 0
    for count, string_arguments, content in itertools.product((1, 2), (False, True), ("", None)):
        calls = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": n, "arguments": json.dumps(a) if string_arguments else a},
            }
            for n, a, call_id in CALLS[:count]
        ]
        chat = [
            {"role": "system", "content": "You are a helpful assistant with access to tools."},
            {"role": "user", "content": "What's the weather like in Paris right now?"},
            {"role": "assistant", "content": content, "tool_calls": calls},
        ]
        try:
            prompt, reply = _assistant_text(name, template, entry, chat)
        except Exception:
            continue  # this template refuses this shape (one call at a time, arguments as text, ...)
        if "get_weather" not in reply:
            continue  # this template does not render the calls for this shape
        tried += 1
        message = parse_reply(reply, fmt, prefix=prompt)
        parsed = message.get("tool_calls")
        assert parsed is not None, f"{name}: no calls in {reply!r}"
        assert message["content"] == "", message
        assert message.get("reasoning_content", THOUGHT) == THOUGHT
        assert [c["function"]["name"] for c in parsed] == [n for n, _, _ in CALLS[:count]]
        assert [c["function"]["arguments"] for c in parsed] == [a for _, a, _ in CALLS[:count]]
        for original, back in zip(calls, parsed):
            if original["id"] in reply:  # the template writes the ids (Mistral): they come back too
                assert back["id"] == original["id"]
        # streaming character by character gives the same message
        parser = ReplyParser(fmt, prefix=prompt)
        for ch in reply:
            parser.feed(ch)
        parser.finish()
        assert parser.message == message
    assert tried, f"{name}: no tool-call message rendered"
