"""The OpenAI-compatible server, for real: uvicorn on 127.0.0.1 with a free port, the bundled model, and the
official ``openai`` client (or ``httpx`` for the error cases). Replies are checked against ``generate``."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
import uvicorn

from chatlm import AutoTokenizer
from chatlm.serving.app import create_app

NAME = "smollm2"


@contextlib.contextmanager
def running_server(model, chat_template: str | None = None, tokenizer=None, **options):
    """The app on a free port of 127.0.0.1 in a thread; yields its base URL and the app. ``tokenizer``: the
    model's own (default: the bundled model's)."""
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(None)
    if chat_template is not None:
        tok.chat_template = chat_template
    app = create_app(model, tok, NAME, **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)
        app.state.server.engine.shutdown()


@pytest.fixture(scope="module")
def server(bundled_model):
    with running_server(bundled_model) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def greedy_reply(model, messages, max_new_tokens: int) -> tuple[str, int, int]:
    """(reply text, prompt tokens, reply tokens with the end token) of plain greedy generate: the oracle."""
    tok = AutoTokenizer.from_pretrained(None)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens)[0, ids.shape[1] :].tolist()
    eos = set(model.generation_config.eos_token_ids)
    end = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))
    return tok.decode(out[:end], skip_special_tokens=True), ids.shape[1], end


QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Count from one to five.",
    "What is two plus two?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Name a large ocean.",
    "What is the opposite of hot?",
    "Which planet is called red?",
    "How many legs does a spider have?",
    "What colour is the sky?",
    "Name a fruit that is yellow.",
    "What is ice made of?",
    "Give me a word that rhymes with cat.",
    "What is the first month of the year?",
    "What animal says moo?",
]


def test_chat_completion_is_greedy_generate(client, bundled_model):
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    text, prompt_tokens, reply_tokens = greedy_reply(bundled_model, messages, 40)
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("stop" if reply_tokens < 40 else "length")
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == reply_tokens
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")


def test_streaming_gives_the_same_text_and_usage(client, bundled_model):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTIONS[2]}]
    text, prompt_tokens, reply_tokens = greedy_reply(bundled_model, messages, 30)
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if reply_tokens < 30 else "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_sixteen_concurrent_streams_each_get_their_own_greedy_reply(server, bundled_model):
    """16 streaming clients at once share the batch (they join and leave it at different steps); each gets the
    text it gets alone, and nobody errors."""
    url, app = server
    expected = [greedy_reply(bundled_model, [{"role": "user", "content": q}], 48)[0] for q in QUESTIONS]

    def ask(question: str) -> str:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=48,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, QUESTIONS))
    assert got == expected
    metrics = httpx.get(url + "/metrics").text
    assert "chatlm_running_sequences 0" in metrics


def test_logprobs_are_the_models(client, bundled_model):
    """Each token's log-probability and its top alternatives, against the model's own log-softmax."""
    tok = AutoTokenizer.from_pretrained(None)
    messages = [{"role": "user", "content": QUESTIONS[3]}]
    r = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    entries = r.choices[0].logprobs.content
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    reply = bundled_model.generate(ids, max_new_tokens=8)[0, ids.shape[1] :]
    with torch.no_grad():
        full = torch.cat([ids[0], reply])[None]
        logits = bundled_model(full).logits[0, ids.shape[1] - 1 : -1].log_softmax(-1)
    assert len(entries) == len(reply)
    for position, entry in enumerate(entries):
        token = int(reply[position])
        assert entry.token == tok.decode([token])
        assert math.isclose(entry.logprob, float(logits[position, token]), abs_tol=1e-3)
        best = torch.topk(logits[position], 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-3)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely


def test_top_k_min_p_and_repetition_penalty(client, bundled_model):
    """vLLM's and llama.cpp's sampling options: repetition_penalty at temperature 0 replies as generate does (itself
    checked against transformers); each token sampled with top_k is among the k most likely, and with min_p at
    least min_p times as likely (after temperature) as the most likely; top_k=1 is greedy."""
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    tok = AutoTokenizer.from_pretrained(None)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    eos = set(bundled_model.generation_config.eos_token_ids)

    def reply(**options) -> str:
        out = bundled_model.generate(ids, max_new_tokens=24, **options)[0, ids.shape[1] :].tolist()
        end = next((i for i, t in enumerate(out) if t in eos), len(out))
        return tok.decode(out[:end], skip_special_tokens=True)

    penalised = reply(repetition_penalty=1.5)
    assert penalised != reply()  # the penalty changes this reply
    r = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=24, extra_body={"repetition_penalty": 1.5}
    )
    assert r.choices[0].message.content == penalised

    temperature = 1.5

    def sampled(k: int, **extra) -> list:
        r = client.chat.completions.create(
            model=NAME,
            messages=messages,
            temperature=temperature,
            max_tokens=30,
            seed=3,
            logprobs=True,
            top_logprobs=k,
            extra_body=extra,
        )
        return r.choices[0].logprobs.content

    outside_top_3 = lambda entries: [e for e in entries if e.logprob < e.top_logprobs[-1].logprob - 1e-4]  # noqa: E731
    assert outside_top_3(sampled(3))  # unrestricted, this seed draws less likely tokens
    assert not outside_top_3(sampled(3, top_k=3))
    floor = temperature * math.log(0.3)
    unlikely = lambda entries: [e for e in entries if e.logprob - e.top_logprobs[0].logprob < floor - 1e-4]  # noqa: E731
    assert unlikely(sampled(1))
    assert not unlikely(sampled(1, min_p=0.3))
    r = client.chat.completions.create(
        model=NAME, messages=messages, temperature=1.0, max_tokens=24, seed=4, extra_body={"top_k": 1}
    )
    assert r.choices[0].message.content == reply()


def test_stop_strings_max_tokens_and_n(client, bundled_model):
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    text = greedy_reply(bundled_model, messages, 40)[0]
    stop = text[10:14]
    r = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=40, stop=[stop]
    )
    assert r.choices[0].message.content == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    sampled = [
        client.chat.completions.create(
            model=NAME, messages=messages, temperature=1.0, max_tokens=12, n=3, seed=5
        ).choices
        for _ in range(2)
    ]
    texts = [[c.message.content for c in choices] for choices in sampled]
    assert texts[0] == texts[1]  # the same seed, the same samples
    assert len(set(texts[0])) > 1  # the choices are different samples
    assert [c.index for c in sampled[0]] == [0, 1, 2]


def test_text_completions(server, bundled_model):
    url, _ = server
    tok = AutoTokenizer.from_pretrained(None)
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    expected = tok.decode(bundled_model.generate(ids, max_new_tokens=8)[0, ids.shape[1] :])
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=2
    )
    assert r.choices[0].text == prompt + expected
    assert len(r.choices[0].logprobs.tokens) == 8 and r.usage.completion_tokens == 8
    stream = client.completions.create(
        model=NAME, prompt=[prompt, "One, two,"], max_tokens=8, temperature=0, stream=True
    )
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts[0] == expected


def test_models_health_and_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(url + "/metrics").text
    values = {
        line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and line[0] != "#"
    }
    assert values["chatlm_requests_total"] > 0 and values["chatlm_generation_tokens_total"] > 0
    assert values["chatlm_time_to_first_token_seconds_count"] > 0
    assert "chatlm_queue_depth" in values and "chatlm_batch_size" in values


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def test_bad_requests_get_openai_errors(server):
    url, _ = server
    post = lambda body: httpx.post(url + "/v1/chat/completions", json=body)  # noqa: E731
    chat = [{"role": "user", "content": "hi"}]
    error(httpx.post(url + "/v1/chat/completions", content=b"{not json"), 400)
    assert error(post({"messages": chat, "temperature": 5}), 400)["param"] == "temperature"
    assert error(post({"messages": chat, "max_tokens": "ten"}), 400)["param"] == "max_tokens"
    assert error(post({"messages": "hi"}), 400)["param"] == "messages"
    assert error(post({}), 400)["param"] == "messages"
    assert error(post({"messages": chat, "top_logprobs": 2}), 400)["param"] == "top_logprobs"
    for name, value in (("top_k", -2), ("top_k", 1.5), ("min_p", 1.5), ("repetition_penalty", 0)):
        assert error(post({"messages": chat, name: value}), 400)["param"] == name
    over = error(post({"messages": chat, "max_tokens": 10**6}), 400)
    assert over["code"] == "context_length_exceeded" and "tokens over" in over["message"]
    assert error(post({"model": "gpt-4o", "messages": chat}), 404)["code"] == "model_not_found"
    error(httpx.get(url + "/v1/nothing"), 404)
    error(httpx.post(url + "/v1/completions", json={"prompt": [10**9]}), 400)
    assert error(httpx.post(url + "/v1/completions", json={"prompt": ""}), 400)["param"] == "prompt"
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # none of it reached the engine


def test_api_key_body_limit_and_full_queue(bundled_model):
    with running_server(bundled_model, api_key="sesame", max_batch=1, max_queue=1, max_body=2000) as (
        url,
        app,
    ):
        chat = {"messages": [{"role": "user", "content": "Count to a hundred."}], "max_tokens": 200}
        error(httpx.post(url + "/v1/chat/completions", json=chat), 401)
        error(
            httpx.post(url + "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer nope"}), 401
        )
        auth = {"Authorization": "Bearer sesame"}
        error(httpx.get(url + "/v1/models"), 401)
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        error(httpx.post(url + "/v1/chat/completions", json=big, headers=auth), 413)
        engine = app.state.server.engine
        with httpx.Client(timeout=60) as http:
            with http.stream(
                "POST", url + "/v1/chat/completions", json={**chat, "stream": True}, headers=auth
            ) as first:
                next(first.iter_lines())  # the first request holds the only row of the batch
                waiting = threading.Thread(
                    target=httpx.post,
                    args=(url + "/v1/chat/completions",),
                    kwargs=dict(json=chat, headers=auth, timeout=60),
                )
                waiting.start()
                deadline = time.monotonic() + 10
                while engine.queue_depth < 1:  # the second one waits in the queue
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                full = httpx.post(url + "/v1/chat/completions", json=chat, headers=auth)
                assert error(full, 429)["code"] == "queue_full" and full.headers["retry-after"]
            waiting.join(60)


def test_json_object_replies_are_json(client):
    """response_format json_object: a reply that ends ("stop") is one JSON object, greedy or sampled; one cut by
    max_tokens is the start of one."""
    messages = [{"role": "user", "content": "Describe a cat as a JSON object with the keys name and age."}]
    for options in (dict(temperature=0), dict(temperature=1.0, seed=1), dict(temperature=1.0, seed=2)):
        r = client.chat.completions.create(
            model=NAME, messages=messages, response_format={"type": "json_object"}, max_tokens=120, **options
        )
        content, reason = r.choices[0].message.content, r.choices[0].finish_reason
        if reason == "stop":
            assert isinstance(json.loads(content), dict), content
        else:
            assert reason == "length" and content.startswith("{"), (content, reason)
        if "seed" not in options:
            assert reason == "stop"
    plain = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=20)
    assert not plain.choices[0].message.content.lstrip().startswith("{")  # unconstrained, it writes prose


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {what} in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    for name, what in (("get_weather", "weather"), ("get_time", "local time"))
]


@pytest.fixture(scope="module")
def tools_url(bundled_model, shared_dir):
    """The bundled model behind Qwen 2.5's chat template (tool calls between <tool_call> tags)."""
    template = (shared_dir / "chat_templates" / "templates_public" / "qwen2.5-7b-instruct.jinja").read_text()
    with running_server(bundled_model, chat_template=template) as (url, _):
        yield url


def test_tool_choice_named_and_none(tools_url, bundled_model):
    client = openai.OpenAI(base_url=tools_url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What time is it in Paris?"}]
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(
        model=NAME, messages=messages, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=200
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_time" and call.id.startswith("call_")
    # a forced call's arguments follow its function's parameter schema (the grammar engine holds them)
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        tools=TOOLS,
        tool_choice=named,
        temperature=0,
        max_tokens=200,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [(t.function.name, t.function.arguments) for t in calls] == [("get_time", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # "required": a call to one of the tools, whichever the model prefers, with JSON arguments
    r = client.chat.completions.create(
        model=NAME, messages=messages, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name in {"get_weather", "get_time"} and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
    # "none": the tools stay out of the prompt
    tok = AutoTokenizer.from_pretrained(None)
    tok.chat_template = AutoTokenizer.from_pretrained(None).chat_template
    r = client.chat.completions.create(
        model=NAME, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=5
    )
    with_tools = client.chat.completions.create(
        model=NAME, messages=messages, tools=TOOLS, temperature=0, max_tokens=5
    )
    assert r.usage.prompt_tokens < with_tools.usage.prompt_tokens
    assert r.choices[0].message.tool_calls is None


def test_earlier_tool_calls_render_as_objects(tools_url, shared_dir):
    """A tool call in the history comes from OpenAI's clients with its arguments as a JSON string; the template
    renders them as the object they are (as vLLM and llama.cpp do), and arguments that are no JSON are a 400."""
    client = openai.OpenAI(base_url=tools_url + "/v1", api_key="unused", max_retries=0)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"city": "Paris"}'},
    }
    history = [
        {"role": "user", "content": "What time is it in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
    ]
    r = client.chat.completions.create(model=NAME, messages=history, tools=TOOLS, max_tokens=1)
    tok = AutoTokenizer.from_pretrained(None)
    tok.chat_template = (
        shared_dir / "chat_templates" / "templates_public" / "qwen2.5-7b-instruct.jinja"
    ).read_text()
    as_object = copy.deepcopy(history)
    as_object[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    text = tok.apply_chat_template(as_object, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert '{"name": "get_time", "arguments": {"city": "Paris"}}' in text
    assert r.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    broken = copy.deepcopy(history)
    broken[1]["tool_calls"][0]["function"]["arguments"] = '{"city": '
    with pytest.raises(openai.BadRequestError, match="arguments are not valid JSON"):
        client.chat.completions.create(model=NAME, messages=broken, tools=TOOLS, max_tokens=1)


def test_tool_choice_needs_a_tool_format(client):
    """The bundled model's own template has no tool-call syntax: forcing a call is refused, clearly."""
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "hi"}],
            tools=TOOLS,
            tool_choice="required",
            max_tokens=5,
        )


def test_long_prompts_are_prefilled_in_chunks_between_decoding_steps(bundled_model):
    """The engine on its own: while a long prompt is prefilled (256 tokens a turn while others decode), the
    running sequence gets a token every turn; both replies are plain greedy decoding's."""
    from chatlm.serving.engine import Engine, Request, SamplingParams

    tok = AutoTokenizer.from_pretrained(None)
    engine = Engine(bundled_model, tok, busy_prefill_chunk=256)
    events: list[str] = []
    done = {"a": threading.Event(), "b": threading.Event()}
    tokens = {"a": [], "b": []}

    def sink(name):
        def take(delta):
            events.append(name)
            tokens[name] += delta.token_ids
            if delta.finish_reason:
                done[name].set()

        return take

    short = tok("The river flows", add_special_tokens=False)["input_ids"]
    long = tok(" ".join(["the river Danube flows to the sea"] * 150), add_special_tokens=False)["input_ids"]
    assert len(long) > 1000
    try:
        engine.submit(Request(short, SamplingParams(max_tokens=60, temperature=0), sink("a")))
        while len(events) < 3:
            time.sleep(0.005)
        submitted = len(events)
        engine.submit(Request(long, SamplingParams(max_tokens=6, temperature=0), sink("b")))
        assert done["a"].wait(120) and done["b"].wait(120)
    finally:
        engine.shutdown()
    during = events[submitted : events.index("b")]
    assert during.count("a") >= len(long) // 256  # one token of "a" per chunk of "b"
    for name, prompt, n in (("a", short, 60), ("b", long, 6)):
        expected = bundled_model.generate(torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt) :].tolist()
        assert tokens[name] == expected[: len(tokens[name])] and len(tokens[name]) == len(expected)


def test_a_client_that_leaves_frees_its_place(server):
    """A streaming client that disconnects mid-reply cancels its generation: the batch empties at once, long
    before max_tokens would have ended it."""
    url, app = server
    engine = app.state.server.engine
    body = {
        "messages": [{"role": "user", "content": "Write a long story about a river."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    before = engine.metrics.generated_tokens
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(5):
                next(lines)
            assert engine.running
    deadline = time.monotonic() + 10
    while engine.running:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.02)
    assert engine.metrics.generated_tokens - before < 200


def test_serve_command_shuts_down_cleanly_on_sigterm(tmp_path):
    """``chatlm serve`` in its own process: a streaming request is in flight when SIGTERM comes; the reply still
    ends properly ([DONE]) and the process exits with status 0."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen(
        [sys.executable, "-m", "chatlm", "serve", "--port", str(port), "--max-batch", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        refused = httpx.post(url + "/v1/chat/completions", json={"messages": "hi"}, timeout=60)
        assert refused.status_code == 400
        body = {
            "messages": [{"role": "user", "content": "Name two colours."}],
            "max_tokens": 12,  # short: it must finish within the 30 s of grace even on a loaded machine
            "stream": True,
        }
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not lines:
                    process.send_signal(signal.SIGTERM)
                if line:  # events are separated by blank lines
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        reasons = [
            json.loads(line[6:])["choices"][0]["finish_reason"]
            for line in lines
            if line.startswith("data: {")
        ]
        assert reasons[-1] in ("stop", "length")  # finished, not cut off
        assert process.wait(60) == 0
        # a line per request on stderr: the endpoint, the status, the tokens, the speed
        log = process.stderr.read().decode()
        assert "POST /v1/chat/completions 400 " in log
        served = re.search(
            r"POST /v1/chat/completions 200 prompt (\d+) tokens \(\d+ cached\), reply (\d+) tokens", log
        )
        assert served and 0 < int(served[2]) <= 12, log
        assert "tokens/s" in log
    finally:
        if process.poll() is None:
            process.kill()


def test_content_parts_are_text_and_media_parts_a_400(client, bundled_model):
    """What the openai SDK and chat front ends send: text parts, joined as OpenAI's server joins them for a text
    model (the greedy reply to the joined text); an image to this text-only model is a 400 that says so."""
    joined = [{"role": "user", "content": "What is the capital\nof France?"}]
    text, prompt_tokens, _ = greedy_reply(bundled_model, joined, 20)
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=20
    )
    assert r.choices[0].message.content == text and r.usage.prompt_tokens == prompt_tokens
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError, match="an image .* text only") as refused:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [parts[0], image]}])
    assert refused.value.body["param"] == "messages"


def test_logit_bias_moves_the_tokens_it_names(client, bundled_model, server):
    """OpenAI's logit_bias: added to the logits before the choice. -100 on the greedy token gives the runner-up;
    +100 on an unlikely token makes it the reply; ids outside the vocabulary and biases past +-100 are a 400."""
    tok = AutoTokenizer.from_pretrained(None)
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = bundled_model(ids).logits[0, -1]
    first, second = logits.topk(2).indices.tolist()
    unlikely = 200 + int(logits[200:2000].argmin())  # ordinary tokens, not special ones

    def reply(bias: dict) -> str:
        r = client.chat.completions.create(
            model=NAME, messages=messages, temperature=0, max_tokens=1, logit_bias=bias
        )
        return r.choices[0].message.content

    assert reply({}) == tok.decode([first])
    assert reply({str(first): -100}) == tok.decode([second])
    assert reply({str(unlikely): 100}) == tok.decode([unlikely])
    for bias, says in (({"99999999": 1}, "outside the vocabulary"), ({"5": 500}, "from -100 to 100")):
        with pytest.raises(openai.BadRequestError, match=says) as refused:
            reply(bias)
        assert refused.value.body["param"] == "logit_bias"


def test_unknown_parameters_are_refused_and_replies_carry_a_fingerprint(server, client):
    """As OpenAI's API does, a parameter chatlm does not read is a 400 naming it (on both endpoints), never a 200
    that ignored it; a known one with a value chatlm cannot honour too. Replies carry a system_fingerprint."""
    url = server[0]
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for path, body in (
        ("/v1/chat/completions", {**chat, "grammar": "root ::= 'a'"}),
        ("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2, "grammar": "root ::= 'a'"}),
    ):
        e = error(httpx.post(url + path, json=body, timeout=60), 400)
        assert e["param"] == "grammar" and "Unrecognized request argument" in e["message"]
    for extra, param in (({"parallel_tool_calls": False}, "parallel_tool_calls"), ({"store": True}, "store")):
        assert (
            error(httpx.post(url + "/v1/chat/completions", json={**chat, **extra}, timeout=60), 400)["param"]
            == param
        )
    # the client's own labels are accepted, as in OpenAI's API
    first = client.chat.completions.create(**chat, user="someone", metadata={"run": "1"})
    second = client.completions.create(model=NAME, prompt="Hi", max_tokens=2)
    assert (
        first.system_fingerprint.startswith("fp_") and first.system_fingerprint == second.system_fingerprint
    )
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert {c.system_fingerprint for c in chunks} == {first.system_fingerprint}


def test_cors_is_off_unless_an_origin_is_allowed(server, bundled_model):
    """A browser's preflight: refused by default (no page elsewhere drives a local model unasked); with
    cors_origins (``chatlm serve --cors-origin``), the allowed origin gets the CORS headers, another does not."""
    preflight = {
        "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    default = httpx.options(server[0] + "/v1/chat/completions", headers=preflight, timeout=60)
    assert default.status_code >= 400 and "access-control-allow-origin" not in default.headers
    with running_server(bundled_model, cors_origins=("http://localhost:3000",)) as (url, _):
        allowed = httpx.options(url + "/v1/chat/completions", headers=preflight, timeout=60)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.options(
            url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"}
        )
        assert "access-control-allow-origin" not in other.headers
        r = httpx.get(url + "/v1/models", headers={"Origin": "http://localhost:3000"}, timeout=60)
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"


SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["colors"],
        "additionalProperties": False,  # as OpenAI's strict mode asks: else the model may add keys for ever
    },
    {"type": "array", "items": {"type": "number", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {
        "$defs": {
            "point": {
                "type": "object",
                # bounded: a 135M model asked for an unbounded integer may write digits until max_tokens
                "properties": {
                    "x": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "y": {"type": "integer", "minimum": -1000, "maximum": 1000},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    {
        "anyOf": [
            {"type": "boolean"},
            {
                "type": "object",
                "properties": {"ok": {"const": True}},
                "required": ["ok"],
                "additionalProperties": False,
            },
        ]
    },
]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_replies_follow_the_schema(client, temperature):
    """response_format json_schema: the grammar engine keeps every reply valid for its schema (checked by the
    jsonschema package), greedy and sampled, and the reply ends when the document is complete."""
    for i, schema in enumerate(SCHEMAS):
        r = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Describe a person, some colours or points, in JSON."}],
            max_tokens=120,
            temperature=temperature,
            seed=i,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
            },
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_a_schema_the_engine_cannot_compile_is_a_400(client):
    """Never a silently unconstrained reply: a schema that cannot be compiled says why."""
    for schema, says in (
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "compiled"),
    ):
        with pytest.raises(openai.BadRequestError, match=says) as refused:
            client.chat.completions.create(
                model=NAME,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=8,
                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
            )
        assert refused.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError, match="name"):
        client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema", "json_schema": {"schema": {}}},
        )


def test_json_schema_holds_every_row_of_a_batch(client):
    """n sampled replies decode as rows of one batch, each with its own place in the grammar."""
    schema = SCHEMAS[1]
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Pick some colours."}],
        max_tokens=60,
        temperature=1.2,
        seed=11,
        n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "colours", "schema": schema}},
    )
    replies = [c.message.content for c in r.choices]
    for reply in replies:
        jsonschema.validate(json.loads(reply), schema)
    assert len(set(replies)) > 1  # the rows drew apart: each followed the grammar on its own
