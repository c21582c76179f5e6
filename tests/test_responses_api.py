"""OpenAI's Responses API (``POST /v1/responses``) for real: uvicorn with the bundled model and the official
``openai`` client. Replies are checked against greedy ``generate`` of the equivalent chat; streams against the
plain response; prompts with calls against the template's own rendering of the equivalent chat messages."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from chatlm import AutoTokenizer
from test_server import NAME, error, greedy_reply, running_server

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(bundled_model):
    with running_server(bundled_model) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def _template(shared_dir, name: str) -> str:
    return (shared_dir / "chat_templates" / "templates_public" / f"{name}.jinja").read_text()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def without_ids(response) -> dict:
    """The response as JSON, less what differs between two runs of one request (ids, times, and the prompt
    tokens the prefix cache kept from the first)."""
    body = response.model_dump(mode="json")
    for key in ("id", "created_at", "completed_at"):
        body.pop(key)
    body["usage"]["input_tokens_details"].pop("cached_tokens")
    for item in body["output"]:
        item.pop("id", None)
        item.pop("call_id", None)
    return body


def test_input_string_is_greedy_generate(client, bundled_model):
    text, prompt_tokens, reply_tokens = greedy_reply(
        bundled_model, [{"role": "user", "content": QUESTION}], 40
    )
    r = client.responses.create(model=NAME, input=QUESTION, temperature=0, max_output_tokens=40)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == NAME
    assert r.status == "completed" and r.incomplete_details is None and r.error is None
    assert r.output_text == text
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_") and [p.type for p in message.content] == ["output_text"]
    assert r.usage.input_tokens == prompt_tokens and r.usage.output_tokens == reply_tokens
    assert r.usage.total_tokens == prompt_tokens + reply_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.temperature == 0 and r.max_output_tokens == 40 and r.tools == [] and r.parallel_tool_calls


def test_items_and_instructions_are_the_equivalent_chat(client, bundled_model):
    """Instructions are a system message first; parts are joined as chat's are; "developer" is "system";
    items with or without "type": "message"."""
    chat = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "system", "content": "Use plain words."},
        {"role": "user", "content": "Name three colours."},
        {"role": "assistant", "content": "Red, green and blue."},
        {"role": "user", "content": "Name two more\nplease."},
    ]
    text, prompt_tokens, reply_tokens = greedy_reply(bundled_model, chat, 30)
    items = [
        {"role": "developer", "content": "Use plain words."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Name three colours."}],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": chat[3]["content"]}],
        },
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Name two more"},
                {"type": "input_text", "text": "please."},
            ],
        },
    ]
    r = client.responses.create(
        model=NAME, instructions="Answer briefly.", input=items, temperature=0, max_output_tokens=30
    )
    assert r.output_text == text and r.instructions == "Answer briefly."
    assert (r.usage.input_tokens, r.usage.output_tokens) == (prompt_tokens, reply_tokens)


def test_stream_events_and_final_response(client):
    """The Responses event sequence, numbered; its text is the plain response's, and response.completed carries
    the plain response (less ids). The SDK's stream helper accumulates the same response."""
    options = dict(model=NAME, input="Count from one to five.", temperature=0, max_output_tokens=30)
    plain = client.responses.create(**options)
    events = list(client.responses.create(**options, stream=True))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 1
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if plain.status == "completed" else "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")} | {events[-2].item.id}
    assert item_ids == {events[-1].response.output[0].id}
    assert len({e.response.id for e in (events[0], events[1], events[-1])}) == 1
    assert without_ids(events[-1].response) == without_ids(plain)
    with client.responses.stream(model=NAME, input=QUESTION, temperature=0, max_output_tokens=30) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert (
        final.output_text
        == "".join(texts)
        == client.responses.create(**{**options, "input": QUESTION}).output_text
    )


def test_max_output_tokens_makes_the_response_incomplete(client, bundled_model):
    text, _, _ = greedy_reply(bundled_model, [{"role": "user", "content": "Write a poem about the sea."}], 5)
    options = dict(model=NAME, input="Write a poem about the sea.", temperature=0, max_output_tokens=5)
    r = client.responses.create(**options)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == text and r.usage.output_tokens == 5 and r.output[0].status == "incomplete"
    events = list(client.responses.create(**options, stream=True))
    assert events[-1].type == "response.incomplete" and without_ids(events[-1].response) == without_ids(r)


def test_text_format_json_schema_and_json_object(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=NAME,
        input="Describe a person in JSON.",
        temperature=0,
        max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
    )
    assert r.status == "completed", r.output_text
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema" and r.text.format.name == "person"
    r = client.responses.create(
        model=NAME,
        input="Describe a cat as a JSON object.",
        temperature=0,
        max_output_tokens=40,
        text={"format": {"type": "json_object"}},
    )
    assert r.output_text.lstrip().startswith("{")


def test_logprobs_are_the_reply_tokens(client):
    r = client.responses.create(
        model=NAME,
        input=QUESTION,
        temperature=0,
        max_output_tokens=20,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    logprobs = r.output[0].content[0].logprobs
    assert "".join(lp.token for lp in logprobs) == r.output_text
    for lp in logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token == lp.token


TOOLS = [
    {
        "type": "function",
        "name": name,
        "description": f"The {what} in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    for name, what in (("get_weather", "weather"), ("get_time", "local time"))
]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]


@pytest.fixture(scope="module")
def tools_url(bundled_model, shared_dir):
    """The bundled model behind Qwen 2.5's chat template (hermes tool calls between <tool_call> tags)."""
    with running_server(bundled_model, chat_template=_template(shared_dir, "qwen2.5-7b-instruct")) as (
        url,
        _,
    ):
        yield url


def test_function_calls_and_their_outputs(tools_url, bundled_model, shared_dir):
    """A named tool_choice gives one function_call item (streamed too); sending it back with its output renders
    the prompt the template renders for the equivalent chat, and the reply is greedy generate's for it."""
    client = _client(tools_url)
    question = {"role": "user", "content": "What time is it in Paris?"}
    options = dict(
        model=NAME, tools=TOOLS, tool_choice={"type": "function", "name": "get_time"}, temperature=0
    )
    r = client.responses.create(input=[question], max_output_tokens=40, **options)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_time" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and r.status == "completed"
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, TOOLS[1]["parameters"])  # a forced call's arguments follow the parameters
    events = list(client.responses.create(input=[question], max_output_tokens=40, stream=True, **options))
    assert [e.type for e in events][2:-1] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert events[3].delta == events[4].arguments == call.arguments
    assert without_ids(events[-1].response) == without_ids(r)

    answer = json.dumps({"time": "12:00"})
    follow_up = [
        question,
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": answer},
    ]
    reply = client.responses.create(
        model=NAME, input=follow_up, tools=TOOLS, temperature=0, max_output_tokens=30
    )
    chat = [
        question,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": "get_time", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "name": "get_time", "content": answer},
    ]
    tok = AutoTokenizer.from_pretrained(None)
    tok.chat_template = _template(shared_dir, "qwen2.5-7b-instruct")
    ids = tok.apply_chat_template(chat, tools=CHAT_TOOLS, add_generation_prompt=True, return_tensors="pt")[
        "input_ids"
    ]
    assert reply.usage.input_tokens == ids.shape[1]
    out = bundled_model.generate(ids, max_new_tokens=30)[0, ids.shape[1] :].tolist()
    eos = set(bundled_model.generation_config.eos_token_ids)
    end = next((i for i, t in enumerate(out) if t in eos), len(out))
    assert reply.output_text == tok.decode(
        out[:end], skip_special_tokens=False
    )  # text here, not another call


@pytest.fixture(scope="module")
def reasoning_url(bundled_model, shared_dir):
    """QwQ's template: the reply starts inside <think>, so the bundled model's reply is all reasoning."""
    with running_server(bundled_model, chat_template=_template(shared_dir, "qwq-32b")) as (url, _):
        yield url


def test_reasoning_is_a_reasoning_item(reasoning_url):
    client = _client(reasoning_url)
    options = dict(
        model=NAME, input=QUESTION, temperature=0, max_output_tokens=12, reasoning={"effort": "low"}
    )
    r = client.responses.create(**options)
    reasoning = r.output[0]
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    assert reasoning.content[0].type == "reasoning_text" and reasoning.content[0].text
    assert r.usage.output_tokens_details.reasoning_tokens > 0 and r.reasoning.effort == "low"
    events = list(client.responses.create(**options, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    done = [e.text for e in events if e.type == "response.reasoning_text.done"]
    assert text == done[0] == reasoning.content[0].text
    assert without_ids(events[-1].response) == without_ids(r)
    # a reasoning item sent back is the assistant message's reasoning_content (QwQ's template leaves it out)
    back = [{"role": "user", "content": QUESTION}, reasoning.model_dump(exclude_none=True)]
    back += [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    plain = [back[0], *back[2:]]
    assert (
        client.responses.create(model=NAME, input=back, max_output_tokens=1).usage.input_tokens
        == client.responses.create(model=NAME, input=plain, max_output_tokens=1).usage.input_tokens
    )


def test_bad_requests_are_openai_errors(client, server):
    """Never silently ignored: unknown fields, state the server does not keep, tools it cannot run and inputs
    the model cannot read are 400s in OpenAI's error shape that name the parameter."""
    base = dict(model=NAME, input="Hi", max_output_tokens=2)
    for extra, param, says in (
        (dict(extra_body={"grammar": "root ::= 'a'"}), "grammar", "Unrecognized request argument"),
        (dict(previous_response_id="resp_123"), "previous_response_id", "keeps no responses"),
        (dict(store=True), "store", "keeps no responses"),
        (dict(tools=[{"type": "web_search"}]), "tools", "'web_search'"),
        # strict tools are held to their parameters (as on chat), which this template's plain replies cannot be
        (dict(tools=[{**TOOLS[0], "strict": True}]), "tools", "strict tools"),
        (dict(tool_choice={"type": "function", "name": "nowhere"}), "tool_choice", "no function"),
        (dict(text={"format": {"type": "xml"}}), "text", "text.format"),
        (dict(reasoning={"effort": "extreme"}), "reasoning", "effort"),
        (dict(parallel_tool_calls=False), "parallel_tool_calls", "not supported"),
        (dict(include=["reasoning.encrypted_content"]), "include", "include"),
        (dict(max_output_tokens=10**6), "max_output_tokens", "context window"),
        (dict(model="gpt-5"), "model", "does not exist"),
    ):
        kind = openai.NotFoundError if param == "model" else openai.BadRequestError
        with pytest.raises(kind, match=says) as refused:
            client.responses.create(**{**base, **extra})
        assert refused.value.body["param"] == param, refused.value.body
    assert client.responses.create(**base, tools=TOOLS).status in (
        "completed",
        "incomplete",
    )  # not strict: fine
    image = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}
    for item in (
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"}, image]},
        {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file", "file_id": "f"}]},
        {"type": "item_reference", "id": "msg_1"},
        {"role": ["user"], "content": "Hi"},
        {"type": "computer_call_output", "call_id": "c", "output": {}},
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=NAME, input=[item])
        assert refused.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError, match="an image .* text only"):
        client.responses.create(model=NAME, input=[{"role": "user", "content": [image]}])
    body = error(httpx.post(server + "/v1/responses", json={**base, "verbosity": "low"}, timeout=60), 400)
    assert body["code"] == "unknown_parameter" and body["param"] == "verbosity"
    assert (
        error(httpx.post(server + "/v1/responses", json={"model": NAME}, timeout=60), 400)["param"] == "input"
    )
    assert error(httpx.get(server + "/v1/responses/resp_1"), 404)["code"] == "not_found"
    assert httpx.get(server + "/health").json() == {"status": "ok"}
