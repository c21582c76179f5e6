"""The pipeline hands back tool calls and reasoning as message fields.

A random model writes no tool calls, so these tests build a scripted one: a real checkpoint whose weights make
each token predict a fixed successor (the layers add nothing to the residual stream, and the output row of each
successor is the embedding of its predecessor). The engine runs it like any other model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer

from chatlm import AutoTokenizer, pipeline
from checkpoints import write_checkpoint
from test_reply_parsing import _template

EXTRA_VOCAB = 32


def scripted_checkpoint(path, template: str, script: list[str], special: set[str] = frozenset()):
    """A checkpoint that, after a prompt ending in a newline, writes the tokens of `script` and then stops."""
    write_checkpoint(path, "llama", vocab_size=400 + EXTRA_VOCAB, max_position_embeddings=2048)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    new = [t for t in script if tok.token_to_id(t) is None]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in new if t not in special])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new if t in special])
    assert tok.get_vocab_size() <= 400 + EXTRA_VOCAB
    tok.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))

    ids = [tok.token_to_id("Ċ")] + [tok.token_to_id(t) for t in script] + [tok.token_to_id("<|im_end|>")]
    assert None not in ids and len(set(ids)) == len(ids), "a script token may appear once"
    weights = load_file(path / "model.safetensors")
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name].zero_()  # each layer passes the residual stream through unchanged
    embed = weights["model.embed_tokens.weight"]
    head = torch.zeros_like(weights["lm_head.weight"])
    for current, following in zip(ids, ids[1:]):
        head[following] = 10 * embed[current] / embed[current].norm()
    weights["lm_head.weight"] = head
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


HERMES = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if tools %}tools: {{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL = '{"name": "get_weather", "arguments": {"location": "Paris"}}'
CHAT = [{"role": "user", "content": "Weather in Paris?"}]


def test_pipeline_returns_tool_calls(tmp_path):
    path = scripted_checkpoint(tmp_path, HERMES, ["Checking.", "<tool_call>", CALL, "</tool_call>"])
    pipe = pipeline("text-generation", str(path))
    out = pipe(CHAT, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert out[:-1] == CHAT
    assert out[-1] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}}
        ],
    }
    # the message goes back into the chat as it is: the template renders the call the model made
    tok = AutoTokenizer.from_pretrained(str(path))
    rendered = tok.apply_chat_template(out, tokenize=False)
    assert '<tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}</tool_call>' in rendered
    # the text output is untouched
    text = pipe(CHAT, max_new_tokens=10, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text == "Checking.<tool_call>" + CALL + "</tool_call>"


def test_tool_call_marker_that_is_a_special_token(tmp_path):
    """Llama 3.1 writes <|python_tag|>, a special token that decoding would drop: the parser still sees it."""
    template = _template("llama-3.1-8b-instruct.jinja")
    llama_call = '{"name": "get_weather", "parameters": {"location": "Paris"}}'
    path = scripted_checkpoint(
        tmp_path, template, ["Let me look.", "<|python_tag|>", llama_call], special={"<|python_tag|>"}
    )
    pipe = pipeline("text-generation", str(path))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    message = pipe(CHAT, max_new_tokens=10, do_sample=False, tools=tools)[0]["generated_text"][-1]
    assert message["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}}
    ]
    assert message["content"] == "Let me look."


def test_pipeline_separates_prefilled_reasoning(tmp_path):
    # the generation prompt opens the reasoning; the closing tag in the template is what tells the format
    template = HERMES.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}") + "{# </think> #}"
    path = scripted_checkpoint(tmp_path, template, ["The user asks.", "</think>", "Sunny."])
    pipe = pipeline("text-generation", str(path))
    message = pipe(CHAT, max_new_tokens=10, do_sample=False)[0]["generated_text"][-1]
    assert message == {"role": "assistant", "content": "Sunny.", "reasoning_content": "The user asks."}


def test_plain_reply_is_what_decoding_gives(tmp_path):
    path = scripted_checkpoint(tmp_path, HERMES, ["Hello", " there."])
    pipe = pipeline("text-generation", str(path))
    message = pipe(CHAT, max_new_tokens=10, do_sample=False)[0]["generated_text"][-1]
    assert message == {"role": "assistant", "content": "Hello there."}


@pytest.mark.parametrize("tools", [None, [{"type": "function", "function": {"name": "f"}}]])
def test_json_reply_is_a_call_only_when_tools_are_given(tmp_path, tools):
    template = HERMES.replace("<tool_call>", "").replace("</tool_call>", "")  # tools, but no markers
    path = scripted_checkpoint(tmp_path, template, [CALL])
    pipe = pipeline("text-generation", str(path))
    message = pipe(CHAT, max_new_tokens=10, do_sample=False, tools=tools)[0]["generated_text"][-1]
    if tools:
        assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    else:
        assert message == {"role": "assistant", "content": CALL}


def test_tokenizer_parse_response(tmp_path):
    """transformers' API: text or ids, one or a batch, with the prompt as prefix."""
    path = scripted_checkpoint(tmp_path, HERMES, ["Checking.", "<tool_call>", CALL, "</tool_call>"])
    tok = AutoTokenizer.from_pretrained(str(path))
    reply = "Checking.<tool_call>" + CALL + "</tool_call>"
    expected = {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}}
        ],
    }
    assert tok.parse_response(reply, prefix="") == expected
    ids = tok.encode(reply, add_special_tokens=False) + [tok.eos_token_id, tok.pad_token_id]
    assert tok.parse_response(ids, prefix="") == expected
    assert tok.parse_response(torch.tensor([ids, ids]), prefix="") == [expected, expected]
    assert tok.parse_response(["Hi", reply], prefix=["", ""]) == [
        {"role": "assistant", "content": "Hi"},
        expected,
    ]
    with pytest.raises(ValueError, match="prefix"):
        tok.parse_response(reply)
    with pytest.raises(ValueError, match="response_template"):
        tok.parse_response(reply, {"fields": {}}, prefix="")


def test_cli_shows_reasoning_apart_and_keeps_the_parsed_message(tmp_path):
    """`chatlm run` streams the answer to stdout and the reasoning to stderr; in a chat, the next prompt gets the
    parsed message (reasoning_content apart), as the template expects."""
    from test_cli import chatlm

    template = HERMES.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}") + "{# </think> #}"
    path = scripted_checkpoint(tmp_path, template, ["The user asks.", "</think>", "Sunny."])
    result = chatlm("run", str(path), "Weather in Paris?", "--max-new-tokens", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Sunny."
    assert result.stderr.strip() == "The user asks."

    from chatlm.cli import Session, build_parser

    args = build_parser().parse_args(["chat", str(path), "--max-new-tokens", "10", "--temperature", "0"])
    session = Session(str(path), args)
    shown, thoughts = [], []
    assert session.reply("Weather in Paris?", shown.append, thoughts.append) == "Sunny."
    assert "".join(shown) == "Sunny." and "".join(thoughts) == "The user asks."
    assert session.messages[-1] == {
        "role": "assistant",
        "content": "Sunny.",
        "reasoning_content": "The user asks.",
    }
