"""ChatTurn: the prompt of a chat turn (a forced tool-call opening included) and its reply parsed back, as the
pipeline, the CLI and the server all use it. The templates are the real models' (shared reference data)."""

from __future__ import annotations

import json

import openai
import pytest

from chatlm import AutoTokenizer, pipeline
from chatlm.chat_turn import ChatTurn, UnsupportedToolChoice
from test_server import NAME, TOOLS, running_server  # tests/ is on sys.path (conftest.py)

MESSAGES = [{"role": "user", "content": "What time is it in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


def _tokenizer(shared_dir, template: str | None):
    tok = AutoTokenizer.from_pretrained(None)
    if template is not None:
        tok.chat_template = (
            shared_dir / "chat_templates" / "templates_public" / f"{template}.jinja"
        ).read_text()
    return tok


# template, what "required" appends, what a named function appends, the JSON that the opening begins
FORCED = [
    ("hermes-2-pro-llama-3-8b-tool_use", '<tool_call>\n{"name": "', '"arguments": {', '{"name": "'),
    ("mistral-7b-instruct-v0.3", '[TOOL_CALLS][{"name": "', '"arguments": {', '[{"name": "'),
    ("llama-3.1-8b-instruct", '{"name": "', '"parameters": {', '{"name": "'),
]


@pytest.mark.parametrize(("template", "opening", "arguments", "json_prefix"), FORCED)
def test_a_forced_call_is_the_templates_text_and_the_opening(
    shared_dir, template, opening, arguments, json_prefix
):
    tok = _tokenizer(shared_dir, template)
    rendered = tok.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    required = ChatTurn.render(tok, MESSAGES, tools=TOOLS, tool_choice="required")
    assert required.prompt == rendered + opening
    assert required.prompt_ids == tok(rendered + opening, add_special_tokens=False)["input_ids"]
    assert required.json_reply and required.json_prefix == json_prefix
    assert required.json_starts == ('get_weather"', 'get_time"')
    named = ChatTurn.render(tok, MESSAGES, tools=TOOLS, tool_choice=NAMED)
    assert named.prompt == f'{rendered}{opening}get_time", {arguments}'
    assert named.json_starts == () and named.json_prefix == json_prefix + f'get_time", {arguments}'
    auto = ChatTurn.render(tok, MESSAGES, tools=TOOLS, tool_choice="auto")
    assert auto.prompt == rendered and auto.forced == "" and not auto.json_reply
    assert auto.prompt_ids == tok.apply_chat_template(
        MESSAGES, tools=TOOLS, add_generation_prompt=True, return_dict=False
    )


@pytest.mark.parametrize(("template", "kind"), [(None, "none"), ("firefunction-v2", "firefunction")])
def test_a_format_chatlm_cannot_start_refuses_a_forced_call(shared_dir, template, kind):
    tok = _tokenizer(shared_dir, template)
    with pytest.raises(UnsupportedToolChoice, match=f"this model's format is '{kind}'"):
        ChatTurn.render(tok, MESSAGES, tools=TOOLS, tool_choice="required")
    with pytest.raises(UnsupportedToolChoice, match="needs a model whose tool calls chatlm can start itself"):
        ChatTurn.render(tok, MESSAGES, tools=TOOLS, tool_choice=NAMED)


@pytest.mark.parametrize(("template", "_opening", "arguments", "_prefix"), FORCED)
def test_a_forced_reply_parses_to_the_named_call_whole_or_streamed(
    shared_dir, template, _opening, arguments, _prefix
):
    tok = _tokenizer(shared_dir, template)
    turn = ChatTurn.render(tok, MESSAGES, tools=TOOLS, tool_choice=NAMED)
    closing = "}\n</tool_call>" if template.startswith("hermes") else "}]" if "mistral" in template else "}"
    reply = '"city": "Paris"}' + closing  # what the model writes after the forced opening
    expected = {"name": "get_time", "arguments": {"city": "Paris"}}
    whole = turn.parse_reply(reply)
    assert [call["function"] for call in whole["tool_calls"]] == [expected]
    assert whole["content"] == ""
    for size in (1, 2, 5):
        stream = turn.reply_stream()
        deltas = [d for at in range(0, len(reply), size) for d in stream.feed(reply[at : at + size])]
        deltas += stream.finish()
        assert stream.message == whole
        assert [d.tool_call["function"] for d in deltas if d.tool_call] == [expected]
        assert not any(d.content for d in deltas)


def test_reasoning_after_a_prefilled_think_tag_streams_as_it_parses(shared_dir):
    tok = _tokenizer(shared_dir, "qwq-32b")
    turn = ChatTurn.render(tok, MESSAGES)
    assert turn.prompt.rstrip().endswith("<think>")  # QwQ's template opens the reasoning itself
    reply = "Paris is UTC+1.\n</think>\n\nIt is noon.<tool_call>\n{oops</tool_call>"
    whole = turn.parse_reply(reply)
    assert whole == {
        "role": "assistant",
        "content": "It is noon.<tool_call>\n{oops</tool_call>",  # not a call: kept verbatim
        "reasoning_content": "Paris is UTC+1.",
    }
    for size in (1, 3, 7):
        stream = turn.reply_stream()
        deltas = [d for at in range(0, len(reply), size) for d in stream.feed(reply[at : at + size])]
        deltas += stream.finish()
        assert stream.message == whole
        assert "".join(d.reasoning_content for d in deltas) == whole["reasoning_content"]
        assert "".join(d.content for d in deltas) == whole["content"]


def test_the_pipeline_and_the_server_take_the_same_turn(shared_dir, bundled_model):
    """One greedy reply through both front ends: the same prompt and the same parsed message."""
    tok = _tokenizer(shared_dir, "qwen2.5-7b-instruct")
    turn = ChatTurn.render(tok, MESSAGES, tools=TOOLS)
    assert turn.parses_reply and turn.reply_format.tool_calls.name == "hermes"
    generator = pipeline("text-generation", bundled_model, tokenizer=tok)
    out = generator(MESSAGES, tools=TOOLS, do_sample=False, max_new_tokens=24)
    ours = out[0]["generated_text"][-1]
    with running_server(bundled_model, chat_template=tok.chat_template) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model=NAME, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=24
        )
    assert r.usage.prompt_tokens == len(turn.prompt_ids)
    message = r.choices[0].message
    assert message.content == ours["content"]
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in ours.get("tool_calls", [])]


def test_content_parts_reach_a_text_template_as_text(shared_dir):
    """OpenAI-style content parts: joined with newlines for a template that reads content as a string, kept as
    text parts for one that loops over them (Gemma 3's); media parts refused with a message that names them."""
    from chatlm.chat_template import iterates_content_parts, text_content_parts

    templates = shared_dir / "chat_templates" / "templates_public"
    loops = {
        name: iterates_content_parts((templates / f"{name}.jinja").read_text())
        for name in (
            "gemma-3-it",
            "llama-3.1-8b-instruct",
            "qwen2.5-7b-instruct",
            "smollm2-instruct",
            "mistral-7b-instruct-v0.3",
        )
    }
    assert loops == {
        "gemma-3-it": True,
        "llama-3.1-8b-instruct": False,
        "qwen2.5-7b-instruct": False,
        "smollm2-instruct": False,
        "mistral-7b-instruct-v0.3": False,
    }
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    llama = (templates / "llama-3.1-8b-instruct.jinja").read_text()
    gemma = (templates / "gemma-3-it.jinja").read_text()
    assert text_content_parts(llama, chat)[1]["content"] == "Hello\nthere"
    assert text_content_parts(gemma, chat)[1]["content"] == parts
    assert chat[1]["content"] is parts  # the caller's chat is left alone
    for part, named in (
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "an image"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
        ({"type": "text"}, "must be"),
    ):
        with pytest.raises(ValueError, match=f"message 1 \\(user\\): content part 1 .*{named}"):
            text_content_parts(llama, [chat[0], {"role": "user", "content": [parts[0], part]}])


def test_a_turn_with_content_parts_renders_the_joined_text():
    """The bundled model's ChatML template reads content as a string: parts give the joined text's prompt."""
    tokenizer = AutoTokenizer.from_pretrained(None)
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    joined = ChatTurn.render(tokenizer, [{"role": "user", "content": "What is the capital\nof France?"}])
    assert ChatTurn.render(tokenizer, [{"role": "user", "content": parts}]).prompt == joined.prompt
