"""Thinking control on the server: a reasoning model's template gets ``enable_thinking`` / ``reasoning_effort``, and
a thinking budget is enforced (the section closed with the template's closing text, the answer after it). The
model is the bundled one behind a Qwen3-style template (it pre-fills ``<think>`` unless thinking is off); the
oracle is plain greedy ``generate`` on the same tokens."""

from __future__ import annotations

import copy
import json

import jsonschema
import openai
import pytest
import torch

from chatlm import AutoTokenizer
from test_server import NAME, TOOLS, running_server  # tests/ is on sys.path (conftest.py)

# Qwen3's switch, in miniature: thinking on, the reply starts inside <think>; off, the section is empty and closed
TEMPLATE = """{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""

MESSAGES = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def thinking(bundled_model):
    with running_server(bundled_model, chat_template=TEMPLATE) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _tokenizer():
    tok = AutoTokenizer.from_pretrained(None)
    tok.chat_template = TEMPLATE
    return tok


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n)
    return out[0, len(ids) :].tolist()


def test_a_thinking_budget_closes_the_section_and_the_answer_follows(thinking, bundled_model):
    tok = _tokenizer()
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    budget, answer_tokens = 8, 12
    # the oracle: greedy thinking for `budget` tokens, the closing text, then greedy again
    thought = _greedy(bundled_model, prompt, budget)
    assert 2 not in thought  # the model would have gone on thinking
    text = tok.decode(thought)
    closing = tok(("" if text.endswith("\n") else "\n") + "</think>\n\n", add_special_tokens=False)[
        "input_ids"
    ]
    answer = _greedy(bundled_model, prompt + thought + closing, answer_tokens)
    r = thinking.chat.completions.create(
        model=NAME,
        messages=MESSAGES,
        temperature=0,
        max_tokens=budget + len(closing) + answer_tokens,
        extra_body={"thinking_token_budget": budget},
    )
    message = r.choices[0].message
    assert message.reasoning_content == text.strip()
    assert message.content == tok.decode(answer, skip_special_tokens=True).strip()
    details = r.usage.completion_tokens_details
    # the section's tokens, up to its closing tag (the blank line after it is the answer's)
    tag = tok(("" if text.endswith("\n") else "\n") + "</think>", add_special_tokens=False)["input_ids"]
    assert closing[: len(tag)] == tag
    assert details.reasoning_tokens == budget + len(tag)
    assert r.usage.completion_tokens == budget + len(closing) + len(answer)


def test_thinking_off_reaches_the_template(thinking):
    on = thinking.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=4)
    assert on.choices[0].message.reasoning_content  # inside <think> the whole reply is reasoning
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
        off = thinking.chat.completions.create(
            model=NAME, messages=MESSAGES, temperature=0, max_tokens=4, extra_body=extra
        )
        assert getattr(off.choices[0].message, "reasoning_content", None) is None
        assert off.choices[0].message.content
        rendered = _tokenizer().apply_chat_template(
            MESSAGES, add_generation_prompt=True, return_dict=False, enable_thinking=False
        )
        assert off.usage.prompt_tokens == len(rendered) != on.usage.prompt_tokens
        assert off.usage.completion_tokens_details.reasoning_tokens == 0
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        thinking.chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=4, extra_body={"reasoning_effort": "extreme"}
        )
    with pytest.raises(openai.BadRequestError, match="cannot set 'messages'"):
        thinking.chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=4, extra_body={"chat_template_kwargs": {"messages": []}}
        )


def test_a_schema_holds_the_answer_after_free_thinking(thinking):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    r = thinking.chat.completions.create(
        model=NAME,
        messages=MESSAGES,
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}},
        extra_body={"thinking_token_budget": 10},
    )
    message = r.choices[0].message
    assert message.reasoning_content and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(message.content), schema)


def test_strict_tools_leave_free_text_as_the_model_writes_it(bundled_model, shared_dir):
    """tool_choice "auto" with strict tools: the grammar holds calls only, so a reply in prose is the model's
    greedy reply, token for token."""
    template = (shared_dir / "chat_templates" / "templates_public" / "qwen2.5-7b-instruct.jinja").read_text()
    strict = copy.deepcopy(TOOLS)
    for tool in strict:
        tool["function"]["strict"] = True
        tool["function"]["parameters"]["additionalProperties"] = False
    messages = [{"role": "user", "content": "Tell me about Paris."}]
    tok = AutoTokenizer.from_pretrained(None)
    tok.chat_template = template
    prompt = tok.apply_chat_template(messages, tools=strict, add_generation_prompt=True, return_dict=False)
    expected = _greedy(bundled_model, prompt, 30)
    with running_server(bundled_model, chat_template=template) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model=NAME, messages=messages, tools=strict, temperature=0, max_tokens=30
        )
        assert "<tool_call>" not in tok.decode(expected)  # prose: the case this test is about
        assert r.choices[0].message.content == tok.decode(expected, skip_special_tokens=True).strip()
        # the bundled template has no tool-call syntax to hold: strict tools are refused, not ignored
    with running_server(bundled_model) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="strict tools need"):
            client.chat.completions.create(model=NAME, messages=messages, tools=strict, max_tokens=4)


def test_the_pipeline_takes_the_same_options(bundled_model):
    """pipe(chat, reasoning_budget=N, chat_template_kwargs=...): the same budget, the same switch."""
    from chatlm import pipeline

    tok = _tokenizer()
    pipe = pipeline("text-generation", bundled_model, tokenizer=tok)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    thought = _greedy(bundled_model, prompt, 6)
    text = tok.decode(thought)
    closing = tok(("" if text.endswith("\n") else "\n") + "</think>\n\n", add_special_tokens=False)[
        "input_ids"
    ]
    answer = _greedy(bundled_model, prompt + thought + closing, 8)
    out = pipe(MESSAGES, reasoning_budget=6, max_new_tokens=6 + len(closing) + 8, do_sample=False)
    message = out[0]["generated_text"][-1]
    assert message["reasoning_content"] == text.strip()
    assert message["content"].strip() == tok.decode(answer, skip_special_tokens=True).strip()
    off = pipe(MESSAGES, chat_template_kwargs={"enable_thinking": False}, max_new_tokens=4, do_sample=False)
    assert "reasoning_content" not in off[0]["generated_text"][-1]
    plain = pipeline("text-generation", bundled_model)
    with pytest.raises(ValueError, match="no thinking section"):
        plain(MESSAGES, reasoning_budget=6, max_new_tokens=4)
