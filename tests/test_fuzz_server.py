"""Property-based fuzzing of the server's request handling with hypothesis: request bodies made of the real
fields of the OpenAI chat and text completions and Anthropic messages APIs (and stray ones), holding values of
every JSON kind: huge and negative numbers, NaN, odd and invalid Unicode, nesting, wrong shapes. The properties,
for every case: no 5xx; a refusal is a 4xx whose JSON body has the API's error shape; a stream that was accepted
ends properly; and the engine is healthy afterwards. Bounded: a fixed number of cases, derandomized (the same
cases on every run), each generating at most a few tokens."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server import NAME, running_server

CASES = 300

texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "\ud800", "<|im_start|>system", "\x00", "user", "assistant", "function", "auto"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
small_ints = st.integers(min_value=-2, max_value=4)
roles = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), texts)
content = st.one_of(
    texts,
    st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": texts}),
        max_size=2,
    ),
    values,
)
message = st.one_of(st.fixed_dictionaries({"role": roles, "content": content}), values)
messages = st.one_of(st.lists(message, min_size=1, max_size=3), values)
tool = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["function", "retrieval"]),
            "function": st.one_of(
                st.fixed_dictionaries(
                    {"name": texts, "parameters": st.one_of(values, st.just({"type": "object"}))}
                ),
                values,
            ),
        }
    ),
    values,
)


def either(plausible, junk_share: int = 1):
    """Mostly a plausible value (so that cases reach the engine), sometimes anything at all."""
    return st.one_of(*([plausible] * 3), *([values] * junk_share))


chat_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": texts}
    ),
    max_size=2,
).map(lambda ms: [*ms, {"role": "user", "content": "Say something."}])
schemas = st.sampled_from(
    [
        {"type": "object"},
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}, "required": ["a"]},
        {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
        {"type": "string", "maxLength": 3},
    ]
)
function_tool = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g"]), "parameters": schemas}),
    }
)
FIELDS = {
    "temperature": either(
        st.floats(min_value=0, max_value=2) | st.sampled_from([1e-300, 5e-324, float("nan")])
    ),
    "top_p": either(st.floats(min_value=0, max_value=1)),
    "top_k": either(st.integers(min_value=-1, max_value=50)),
    "min_p": either(st.floats(min_value=0, max_value=1)),
    "repetition_penalty": either(st.floats(min_value=0, max_value=3)),
    "presence_penalty": either(st.floats(min_value=-2, max_value=2)),
    "n": either(st.integers(min_value=1, max_value=2)),
    "seed": either(st.integers(min_value=-(2**80), max_value=2**80)),
    "stop": either(st.lists(texts, max_size=3)),
    "logit_bias": either(
        st.dictionaries(
            st.integers(min_value=-1, max_value=70000).map(str),
            st.floats(min_value=-100, max_value=100),
            max_size=3,
        )
    ),
    "tools": either(st.lists(tool, max_size=2) | st.lists(function_tool, min_size=1, max_size=2)),
    "tool_choice": either(
        st.sampled_from(["auto", "none", "required"])
        | st.just({"type": "function", "function": {"name": "f"}})
    ),
    "response_format": either(
        st.just({"type": "json_object"})
        | schemas.map(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}})
    ),
    "logprobs": either(st.booleans()),
    "top_logprobs": either(st.integers(min_value=0, max_value=5)),
    "stream": either(st.booleans()),
    "stream_options": either(st.just({"include_usage": True})),
    "echo": either(st.booleans()),
    "chat_template_kwargs": either(st.just({"enable_thinking": False})),
    "reasoning_effort": either(st.sampled_from(["none", "low", "high"])),
    "system": either(texts),
    "stop_sequences": either(st.lists(texts, max_size=2)),
    "thinking": either(st.just({"type": "enabled", "budget_tokens": 2})),
    "stray": values,
}
BASES = {
    "/v1/chat/completions": {"messages": either(chat_messages)},
    "/v1/completions": {
        "prompt": either(texts | st.lists(st.integers(min_value=-5, max_value=60000), max_size=4))
    },
    "/v1/messages": {"model": either(st.just(NAME)), "messages": either(chat_messages)},
}


COMMON = ["temperature", "top_p", "top_k", "stream", "stray"]
SAMPLING = [
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "n",
    "seed",
    "stop",
    "logit_bias",
    "stream_options",
]
KEYS = {  # the fields each endpoint reads, and one it does not
    "/v1/chat/completions": COMMON
    + SAMPLING
    + [
        "tools",
        "tool_choice",
        "response_format",
        "logprobs",
        "top_logprobs",
        "chat_template_kwargs",
        "reasoning_effort",
    ],
    "/v1/completions": COMMON + SAMPLING + ["echo", "logprobs"],
    "/v1/messages": COMMON + ["system", "stop_sequences", "thinking", "tools", "tool_choice"],
}


def bodies(endpoint: str):
    # max_tokens small or junk, but never null: without it a reply may take the context's room (thousands of tokens)
    max_tokens = st.one_of(
        *[st.integers(min_value=1, max_value=4)] * 3, values.filter(lambda v: v is not None)
    )
    base = st.fixed_dictionaries({**BASES[endpoint], "max_tokens": max_tokens})
    extras = st.lists(st.sampled_from(KEYS[endpoint]), max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys})
    )
    return st.tuples(base, extras).map(lambda pair: {**pair[0], **pair[1]})


ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/messages"]


@pytest.fixture(scope="module")
def server(bundled_model):
    with running_server(bundled_model) as (url, app):
        yield url, app


def check(url: str, endpoint: str, body: dict) -> None:
    raw = json.dumps(body, allow_nan=True)  # NaN and Infinity as Python writes them: the parser must cope
    with httpx.stream(
        "POST", url + endpoint, content=raw, headers={"Content-Type": "application/json"}, timeout=120
    ) as r:
        text = "".join(r.iter_text())
    assert r.status_code < 500, (endpoint, raw[:500], r.status_code, text[:500])
    if r.status_code >= 400:
        error = json.loads(text)
        if endpoint == "/v1/messages":
            assert error["type"] == "error" and error["error"]["message"], text
        else:
            assert error["error"]["message"] and error["error"]["type"], text
    elif r.headers["content-type"].startswith("text/event-stream"):
        last = [line for line in text.splitlines() if line.strip()][-1]
        assert last == "data: [DONE]" or "message_stop" in last or "error" in last, (
            endpoint,
            raw[:300],
            last,
        )
    else:
        json.loads(text)


@settings(
    max_examples=CASES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(case=st.sampled_from(ENDPOINTS).flatmap(lambda e: st.tuples(st.just(e), bodies(e))))
def test_no_request_gets_a_5xx_or_hurts_the_server(server, case):
    url, app = server
    endpoint, body = case
    check(url, endpoint, body)
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert app.state.server.engine.alive
