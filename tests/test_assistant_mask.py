"""apply_chat_template(..., return_assistant_tokens_mask=True), checked against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatlm.chat_template import _render_with_generation_spans, render_chat_template
from chatlm.loading.resolve import bundled_model_path
from chatlm.tokenizer import AutoTokenizer
from checkpoints import write_tokenizer

transformers = pytest.importorskip("transformers")

# ChatML with each assistant turn's content and end marker in a generation block.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# SmolLM2's template with generation blocks added, written with whitespace control as Qwen's is.
SMOLLM2 = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' }}{%- endgeneration -%}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Generation blocks whose output is buffered (in a macro): transformers places their spans where the output stood
# when they ran, not where they land. Odd, but what it does.
MACRO = (
    "{% macro turn(m) %}<|im_start|>{{ m.role }}\n{% generation %}{{ m.content }}{% endgeneration %}"
    "<|im_end|>\n{% endmacro %}{% for m in messages %}{{ turn(m) }}{% endfor %}"
)
# Blocks that start and end inside tokens, and empty blocks (transformers masks a token that one is inside).
SPLIT = (
    "{% for m in messages %}{{ m.role[:2] }}{% generation %}{% endgeneration %}{{ m.role[2:] }}:{% generation %}{{ m.content[:3] }}{% endgeneration %}"
    "{{ m.content[3:6] }}{% generation %}{{ m.content[6:] }}{% endgeneration %}"
    "{% generation %}{% endgeneration %}|{% endfor %}"
)
NO_GENERATION = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")

CHATS = [
    [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "I am fine, thank you."}],
    [
        {"role": "system", "content": "You are a robot who loves tea."},
        {"role": "user", "content": "Hello world! How are you today?"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
    ],
    [{"role": "user", "content": "Numbers: 0 1 2 10 100"}],
    [
        {"role": "user", "content": "Café, naïve?"},
        {"role": "assistant", "content": "你好 🙂 e\u0301 naïve\u00a0café 🇫🇷"},
        {"role": "user", "content": "🙂"},
        {"role": "assistant", "content": ""},
    ],
]
TEMPLATES = {"chatml": CHATML, "smollm2": SMOLLM2, "macro": MACRO, "split": SPLIT}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple:
    directory = tmp_path_factory.mktemp("mask")
    write_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(
        str(directory)
    )


def _plain(value):
    """Tensors and BatchEncodings as plain lists and dicts (tensors tagged with their dtype), for comparison."""
    if hasattr(value, "tolist"):
        return (str(value.dtype), value.tolist())
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _both(ours, theirs, conversation, **kwargs) -> dict:
    """Our output, after checking that it is transformers'."""
    kwargs = {"return_assistant_tokens_mask": True, **kwargs}
    out, ref = (
        ours.apply_chat_template(conversation, **kwargs),
        theirs.apply_chat_template(conversation, **kwargs),
    )
    assert "assistant_masks" in out
    assert _plain(out) == _plain(ref), kwargs
    return out


@pytest.mark.parametrize("name", TEMPLATES)
def test_single_chats_match_transformers(tokenizers, name):
    ours, theirs = tokenizers
    for chat in CHATS:
        for kwargs in (
            {},
            {"add_generation_prompt": True},
            {"return_tensors": "pt"},
            {"return_tensors": "np"},
        ):
            out = _both(ours, theirs, chat, chat_template=TEMPLATES[name], **kwargs)
            mask = out["assistant_masks"]
            if "return_tensors" in kwargs:
                assert mask.shape == out["input_ids"].shape == (1, len(mask[0]))
            else:
                assert len(mask) == len(out["input_ids"]) and set(mask) <= {0, 1}


def test_mask_covers_the_assistant_text(tokenizers):
    """Not only the same as transformers, but right: the masked tokens are exactly the assistant's turns."""
    ours, _ = tokenizers
    chat = CHATS[1]
    out = ours.apply_chat_template(chat, chat_template=CHATML, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert ours.decode(masked) == "".join(
        m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"
    )
    unmasked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if not m]
    assert "I am fine" not in ours.decode(unmasked) and "Hello world" in ours.decode(unmasked)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batches_match_transformers(tokenizers, side):
    ours, theirs = tokenizers
    ours.padding_side = theirs.padding_side = side
    try:
        for template in TEMPLATES.values():
            for kwargs in (
                {},
                {"padding": True},
                {"padding": True, "return_tensors": "pt"},
                {"padding": "max_length", "max_length": 120},
                {
                    "padding": True,
                    "add_generation_prompt": True,
                    "tokenizer_kwargs": {"return_attention_mask": False},
                },
                {"padding": True, "tokenizer_kwargs": {"pad_to_multiple_of": 16}},
            ):
                out = _both(ours, theirs, CHATS, chat_template=template, **kwargs)
                assert len(out["assistant_masks"]) == len(CHATS)
    finally:
        ours.padding_side = theirs.padding_side = "right"


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_keeps_what_is_left_of_a_span(tokenizers, side):
    ours, theirs = tokenizers
    ours.truncation_side = theirs.truncation_side = side
    try:
        for max_length in (5, 20, 31, 40):
            for chat in (CHATS[1], CHATS):
                _both(ours, theirs, chat, chat_template=CHATML, truncation=True, max_length=max_length)
                _both(
                    ours,
                    theirs,
                    chat,
                    chat_template=SMOLLM2,
                    truncation=True,
                    max_length=max_length,
                    padding=True,
                )
    finally:
        ours.truncation_side = theirs.truncation_side = "right"


def test_template_without_generation_blocks(tokenizers):
    ours, theirs = tokenizers
    for chat in (CHATS[1], CHATS):
        with pytest.warns(UserWarning, match="generation"):
            out = _both(ours, theirs, chat, chat_template=NO_GENERATION, padding=True)
        rows = out["assistant_masks"] if chat is CHATS else [out["assistant_masks"]]
        assert all(not any(row) for row in rows)


def test_refusals_match_transformers(tokenizers):
    ours, theirs = tokenizers
    chat = CHATS[0]
    for kwargs in (
        {"tokenize": False},
        {"return_dict": False},
        {"tokenize": False, "return_dict": True},
        {"continue_final_message": True},
        {"sanitize_control_tokens": True},
    ):
        kwargs = {"chat_template": CHATML, "return_assistant_tokens_mask": True, **kwargs}
        with pytest.raises(ValueError) as ref:
            theirs.apply_chat_template(chat, **kwargs)
        with pytest.raises(ValueError) as error:
            ours.apply_chat_template(chat, **kwargs)
        assert ("continue_final_message" in str(ref.value)) == ("continue_final_message" in str(error.value))
    with pytest.raises(NotImplementedError, match="sanitize_control_tokens"):
        ours.apply_chat_template(chat, chat_template=CHATML, sanitize_control_tokens=True)


def test_generation_spans():
    chat = CHATS[1]
    text, spans = _render_with_generation_spans(CHATML, chat)
    assert text == render_chat_template(CHATML, chat)
    assert [text[a:b] for a, b in spans] == [
        m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"
    ]
    # continue_final_message cuts the text, and the last span with it
    text, spans = _render_with_generation_spans(CHATML, chat, continue_final_message=True)
    assert text.endswith(chat[-1]["content"]) and [text[a:b] for a, b in spans][-1] == chat[-1]["content"]
    # a template variable may be called "spans"
    assert _render_with_generation_spans("{{ spans }}", chat, spans=3) == ("3", [])
    assert render_chat_template(MACRO, chat) == _render_with_generation_spans(MACRO, chat)[0]


def test_bundled_smollm2_tokenizer(tmp_path):
    """The bundled GGUF's tokenizer (SmolLM2), with its own template given generation blocks."""
    try:
        path = bundled_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ours = AutoTokenizer.from_pretrained()
    theirs = transformers.AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    for chat in CHATS:
        _both(ours, theirs, chat, chat_template=SMOLLM2, add_generation_prompt=True)
    _both(ours, theirs, CHATS, chat_template=SMOLLM2, padding=True, return_tensors="pt")
    out = _both(ours, theirs, CHATS[1], chat_template=SMOLLM2)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert (
        ours.decode(masked)
        == "I am fine, thank you.<|im_end|>The quick brown fox jumps over the lazy dog.<|im_end|>"
    )
