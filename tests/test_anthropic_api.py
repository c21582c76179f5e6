"""Anthropic's Messages API on the server, for real: uvicorn with the bundled model and the official ``anthropic``
client. Replies are checked against greedy ``generate``, prompts against the chat template's own rendering of the
messages as vLLM and llama.cpp convert them."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from chatlm import AutoTokenizer
from chatlm.chat_turn import ChatTurn
from test_server import NAME, greedy_reply, running_server

anthropic = pytest.importorskip("anthropic")

QUESTION = "What is the capital of France?"
# this client's create() has no sampling parameters (newer Claude models take none); other clients send them
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def url(bundled_model):
    with running_server(bundled_model) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(url):
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


def kinds(events) -> list[str]:
    return [e.type for e in events]


def test_a_greedy_reply_is_generate_and_usage_counts_the_prompt(client, bundled_model):
    system = "Answer briefly."
    text, prompt_tokens, reply_tokens = greedy_reply(
        bundled_model, [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}], 40
    )
    messages = [{"role": "user", "content": QUESTION}]
    r = client.messages.create(model=NAME, max_tokens=40, **GREEDY, system=system, messages=messages)
    assert r.type == "message" and r.role == "assistant" and r.model == NAME and r.id.startswith("msg_")
    assert [(b.type, b.text) for b in r.content] == [("text", text)]
    assert r.stop_reason == ("end_turn" if reply_tokens < 40 else "max_tokens") and r.stop_sequence is None
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == prompt_tokens
    assert r.usage.output_tokens == reply_tokens and r.usage.cache_creation_input_tokens == 0
    counted = client.messages.count_tokens(model=NAME, system=system, messages=messages)
    assert counted.input_tokens == prompt_tokens
    # the same prompt again: the prefix cache holds it, and Anthropic counts that part apart
    again = client.messages.create(model=NAME, max_tokens=40, **GREEDY, system=system, messages=messages)
    assert again.content == r.content and again.usage.cache_read_input_tokens > 0
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == prompt_tokens
    # a list of text blocks is the text joined, as OpenAI's content parts are
    blocks = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    joined = greedy_reply(bundled_model, [{"role": "user", "content": "What is the capital\nof France?"}], 20)
    r = client.messages.create(
        model=NAME, max_tokens=20, **GREEDY, messages=[{"role": "user", "content": blocks}]
    )
    assert r.content[0].text == joined[0]


def test_streaming_gives_anthropics_events_the_same_text_and_usage(client, bundled_model):
    chat = [{"role": "user", "content": "Count from one to five."}]
    text, prompt_tokens, reply_tokens = greedy_reply(bundled_model, chat, 30)
    events = list(client.messages.create(model=NAME, max_tokens=30, **GREEDY, messages=chat, stream=True))
    deltas = len(events) - 5
    assert kinds(events) == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start, block, end, stop = events[0], events[1], events[-2], events[-1]
    assert start.message.content == [] and start.message.stop_reason is None
    assert start.message.usage.input_tokens + start.message.usage.cache_read_input_tokens == prompt_tokens
    assert block.index == 0 and block.content_block.type == "text" and block.content_block.text == ""
    assert all(e.index == 0 and e.delta.type == "text_delta" for e in events[2:-3])
    assert "".join(e.delta.text for e in events[2:-3]) == text
    assert end.delta.stop_reason == ("end_turn" if reply_tokens < 30 else "max_tokens")
    assert end.usage.output_tokens == reply_tokens and stop.type == "message_stop"
    # the client's own accumulation of the stream
    with client.messages.stream(model=NAME, max_tokens=30, **GREEDY, messages=chat) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == text and final.usage.output_tokens == reply_tokens


def test_stop_sequences_and_max_tokens(client, bundled_model):
    chat = [{"role": "user", "content": "Count from one to five."}]
    text = greedy_reply(bundled_model, chat, 40)[0]
    stop = text[10:14]
    r = client.messages.create(
        model=NAME, max_tokens=40, **GREEDY, messages=chat, stop_sequences=["@@@@", stop]
    )
    assert r.content[0].text == text[: text.index(stop)]
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    events = list(
        client.messages.create(
            model=NAME, max_tokens=40, **GREEDY, messages=chat, stop_sequences=[stop], stream=True
        )
    )
    assert events[-2].delta.stop_reason == "stop_sequence" and events[-2].delta.stop_sequence == stop
    r = client.messages.create(model=NAME, max_tokens=3, **GREEDY, messages=chat, stop_sequences=["@@@@"])
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None and r.usage.output_tokens == 3


TOOLS = [
    {
        "name": name,
        "description": f"The {what} in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    for name, what in (("get_weather", "weather"), ("get_time", "local time"))
]
# the same tools as the chat template gets them
FUNCTIONS = [
    {
        "type": "function",
        "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]},
    }
    for t in TOOLS
]


@pytest.fixture(scope="module")
def tools_template(shared_dir) -> str:
    """Qwen 2.5's chat template: tools, tool calls between <tool_call> tags, tool messages."""
    return (shared_dir / "chat_templates" / "templates_public" / "qwen2.5-7b-instruct.jinja").read_text()


@pytest.fixture(scope="module")
def tools_client(bundled_model, tools_template):
    with running_server(bundled_model, chat_template=tools_template) as (url, _):
        yield anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


def test_a_tool_use_round_trip(tools_client, tools_template):
    client = tools_client
    question = {"role": "user", "content": "What time is it in Paris?"}
    forced = {"type": "tool", "name": "get_time"}
    r = client.messages.create(
        model=NAME, max_tokens=40, **GREEDY, messages=[question], tools=TOOLS, tool_choice=forced
    )
    assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["tool_use"]
    call = r.content[0]
    assert call.name == "get_time" and call.id.startswith("toolu_") and isinstance(call.input, dict)
    assert set(call.input) == {"city"}  # held to the tool's input_schema
    events = list(
        client.messages.create(
            model=NAME,
            max_tokens=40,
            **GREEDY,
            messages=[question],
            tools=TOOLS,
            tool_choice=forced,
            stream=True,
        )
    )
    assert kinds(events) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    block, delta = events[1].content_block, events[2].delta
    assert block.type == "tool_use" and block.name == "get_time" and block.input == {}
    assert delta.type == "input_json_delta" and json.loads(delta.partial_json) == call.input
    assert events[-2].delta.stop_reason == "tool_use"
    r = client.messages.create(
        model=NAME, max_tokens=40, **GREEDY, messages=[question], tools=TOOLS, tool_choice={"type": "any"}
    )
    assert r.stop_reason == "tool_use" and r.content[0].name in {"get_weather", "get_time"}

    # the call and its result go back: they reach the template as an assistant's tool_calls and a tool message
    answer = {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": call.id, "content": "12:00"},
            {"type": "text", "text": "And in Rome?"},
        ],
    }
    follow_up = [question, r.to_param(), answer]
    tok = AutoTokenizer.from_pretrained(None)
    tok.chat_template = tools_template

    def rendered(tool_content: str, tools=FUNCTIONS) -> int:
        chat = [
            question,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.input},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": tool_content},
            {"role": "user", "content": "And in Rome?"},
        ]
        return len(ChatTurn.render(tok, chat, tools=tools).prompt_ids)

    counted = client.messages.count_tokens(model=NAME, messages=follow_up, tools=TOOLS).input_tokens
    assert counted == rendered("12:00")
    r = client.messages.create(model=NAME, max_tokens=8, **GREEDY, messages=follow_up, tools=TOOLS)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == counted
    # an error result says so; tool_choice "none" leaves the tools out of the prompt
    failed = {**answer, "content": [{**answer["content"][0], "is_error": True}, answer["content"][1]]}
    counted = client.messages.count_tokens(model=NAME, messages=[*follow_up[:2], failed], tools=TOOLS)
    assert counted.input_tokens == rendered("Error: 12:00")
    counted = client.messages.count_tokens(
        model=NAME, messages=follow_up, tools=TOOLS, tool_choice={"type": "none"}
    )
    assert counted.input_tokens == rendered("12:00", tools=None)


# A reasoning template in the manner of Qwen 3's: thinking unless enable_thinking is false (then an empty
# section), and an earlier turn's reasoning shown
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def thinking_client(bundled_model):
    with running_server(bundled_model, chat_template=THINKING_TEMPLATE) as (url, _):
        yield anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


def test_thinking_reaches_the_template_and_comes_back_as_thinking_blocks(thinking_client, bundled_model):
    client = thinking_client
    chat = [{"role": "user", "content": "Explain why the sky is blue."}]
    tok = AutoTokenizer.from_pretrained(None)
    tok.chat_template = THINKING_TEMPLATE

    def prompt(messages=chat, **kwargs) -> list[int]:
        return ChatTurn.render(tok, messages, template_kwargs=kwargs).prompt_ids

    on = {"type": "enabled", "budget_tokens": 1024}
    assert client.messages.count_tokens(model=NAME, messages=chat, thinking=on).input_tokens == len(prompt())
    off = client.messages.count_tokens(model=NAME, messages=chat, thinking={"type": "disabled"})
    assert off.input_tokens == len(prompt(enable_thinking=False)) > len(prompt())

    # thinking on: the reply (greedy) is inside the section: one thinking block, signed (empty), then stopped
    ids = prompt()
    out = bundled_model.generate(torch.tensor([ids]), max_new_tokens=10)[0, len(ids) :]
    thought = tok.decode(out.tolist())
    r = client.messages.create(model=NAME, max_tokens=10, **GREEDY, messages=chat, thinking=on)
    assert [b.type for b in r.content] == ["thinking"] and r.stop_reason == "max_tokens"
    assert r.content[0].thinking.strip() == thought.strip() and r.content[0].signature == ""
    assert r.usage.output_tokens == 10 and r.usage.output_tokens_details.thinking_tokens == 10
    events = list(
        client.messages.create(model=NAME, max_tokens=10, **GREEDY, messages=chat, thinking=on, stream=True)
    )
    assert kinds(events)[:2] == ["message_start", "content_block_start"] and kinds(events)[-2:] == [
        "message_delta",
        "message_stop",
    ]
    assert events[1].content_block.type == "thinking" and events[-3].type == "content_block_stop"
    assert [e.delta.type for e in events[2:-3]][-1] == "signature_delta"
    assert {e.delta.type for e in events[2:-4]} == {"thinking_delta"}
    assert "".join(e.delta.thinking for e in events[2:-4]) == r.content[0].thinking
    omitted = {**on, "display": "omitted"}
    r = client.messages.create(model=NAME, max_tokens=10, **GREEDY, messages=chat, thinking=omitted)
    assert [(b.type, b.thinking) for b in r.content] == [("thinking", "")]
    # a budget: the section closes after its tokens and the answer follows, in a block of its own
    short = {"type": "enabled", "budget_tokens": 3}
    events = list(
        client.messages.create(
            model=NAME, max_tokens=24, **GREEDY, messages=chat, thinking=short, stream=True
        )
    )
    # thinking, signed and closed, then the text: indexes 0 and 1
    order = [(e.type, getattr(e, "index", None)) for e in events if e.type != "content_block_delta"]
    assert order[1:-2] == [
        ("content_block_start", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_stop", 1),
    ]
    assert [e.content_block.type for e in events if e.type == "content_block_start"] == ["thinking", "text"]
    deltas = [e for e in events if e.type == "content_block_delta"]
    thought = [e.delta.thinking for e in deltas if e.index == 0 and e.delta.type == "thinking_delta"]
    assert "".join(thought).strip() == tok.decode(out[:3].tolist()).strip()
    assert [e.delta.type for e in deltas if e.index == 0][-1] == "signature_delta"
    assert {e.delta.type for e in deltas if e.index == 1} == {"text_delta"}

    # thinking off: a text reply
    r = client.messages.create(
        model=NAME, max_tokens=10, **GREEDY, messages=chat, thinking={"type": "disabled"}
    )
    assert [b.type for b in r.content] == ["text"]

    # an earlier turn's thinking block is its reasoning
    history = [
        *chat,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "The capital is Paris.", "signature": ""},
                {"type": "text", "text": "Paris."},
            ],
        },
        {"role": "user", "content": "And of Italy?"},
    ]
    expected = [
        *chat,
        {"role": "assistant", "content": "Paris.", "reasoning_content": "The capital is Paris."},
        history[-1],
    ]
    counted = client.messages.count_tokens(model=NAME, messages=history).input_tokens
    assert counted == len(prompt(expected))


def test_output_config_format_holds_the_reply_to_a_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = client.messages.create(
        model=NAME,
        max_tokens=40,
        **GREEDY,
        messages=[{"role": "user", "content": "Name a city, as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert r.stop_reason == "end_turn", r.content
    assert set(json.loads(r.content[0].text)) == {"city"}


def anthropic_error(error: anthropic.APIStatusError, status: int, kind: str) -> str:
    assert error.status_code == status
    assert error.body["type"] == "error" and error.body["error"]["type"] == kind
    return error.body["error"]["message"]


def test_a_final_assistant_message_is_a_prefill(client, bundled_model):
    """Anthropic's prefill: the reply goes on with the last assistant message and holds only the new text."""
    chat = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "My favourite is"},
    ]
    tok = AutoTokenizer.from_pretrained(None)
    ids = tok.apply_chat_template(chat, continue_final_message=True, return_tensors="pt")["input_ids"]
    out = bundled_model.generate(ids, max_new_tokens=12)[0, ids.shape[1] :].tolist()
    r = client.messages.create(model=NAME, max_tokens=12, messages=chat, extra_body={"temperature": 0})
    assert r.content[0].text == tok.decode(out, skip_special_tokens=True)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == ids.shape[1]


def test_bad_requests_get_anthropic_errors(client, url):
    chat = [{"role": "user", "content": "hi"}]

    def refused(match: str, **body) -> None:
        with pytest.raises(anthropic.BadRequestError) as e:
            client.post("/v1/messages", body={"model": NAME, "max_tokens": 5, **body}, cast_to=object)
        assert match in anthropic_error(e.value, 400, "invalid_request_error")

    with pytest.raises(anthropic.BadRequestError) as e:
        client.post("/v1/messages", body={"model": NAME, "messages": chat}, cast_to=object)
    assert "max_tokens" in anthropic_error(e.value, 400, "invalid_request_error")
    refused("frequency_penalty", messages=chat, frequency_penalty=0.5)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    refused(
        "an image ('image'), and this model reads text only", messages=[{"role": "user", "content": [image]}]
    )
    refused("messages.0.role", messages=[{"role": "system", "content": "hi"}])
    refused("temperature", messages=chat, temperature=1.5)
    refused("tool_choice", messages=chat, tools=TOOLS, tool_choice={"type": "tool", "name": "nope"})
    refused("server tool", messages=chat, tools=[{"type": "web_search_20250305", "name": "web_search"}])
    with pytest.raises(anthropic.BadRequestError) as e:  # a stream refused before it starts: a plain error
        client.messages.create(
            model=NAME, max_tokens=5, messages=chat, extra_body={"temperature": -1}, stream=True
        )
    anthropic_error(e.value, 400, "invalid_request_error")
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=chat)
    assert NAME in anthropic_error(e.value, 404, "not_found_error")
    bad_json = httpx.post(url + "/v1/messages", content=b"{not json")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    too_long = httpx.post(url + "/v1/messages", json={"model": NAME, "max_tokens": 10**7, "messages": chat})
    assert too_long.status_code == 400 and "context window" in too_long.json()["error"]["message"]


def test_the_api_key_comes_as_x_api_key(bundled_model):
    with running_server(bundled_model, api_key="k") as (url, _):
        chat = [{"role": "user", "content": "hi"}]
        missing = httpx.post(url + "/v1/messages", json={"model": NAME, "max_tokens": 5, "messages": chat})
        assert missing.status_code == 401
        assert missing.json() == {
            "type": "error",
            "error": {"type": "authentication_error", "message": missing.json()["error"]["message"]},
        }
        wrong = anthropic.Anthropic(base_url=url, api_key="nope", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as e:
            wrong.messages.count_tokens(model=NAME, messages=chat)
        anthropic_error(e.value, 401, "authentication_error")
        right = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        assert right.messages.count_tokens(model=NAME, messages=chat).input_tokens > 0
        assert right.messages.create(model=NAME, max_tokens=2, messages=chat).usage.output_tokens == 2
