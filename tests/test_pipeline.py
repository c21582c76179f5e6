"""The pipeline as the guide uses it, on the bundled model and on a tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from chatlm import BitsAndBytesConfig, pipeline, set_seed


@pytest.fixture(scope="module")
def pipe(bundled_model):
    return pipeline("text-generation", bundled_model)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_in_chat_out_and_continue(pipe, shared_dir):
    import json

    ref = json.loads((shared_dir / "reference" / "smollm2_greedy.json").read_text())["chats"]
    case = ref["capital"]
    response = pipe(case["messages"], max_new_tokens=48, do_sample=False)
    chat = response[0]["generated_text"]
    assert chat[:-1] == case["messages"]
    assert chat[-1] == {"role": "assistant", "content": case["text"]}
    chat.append({"role": "user", "content": "And of Germany?"})
    again = pipe(chat, max_new_tokens=16, do_sample=False)[0]["generated_text"]
    assert again[:-1] == chat and again[-1]["role"] == "assistant" and again[-1]["content"]


def test_plain_string_and_return_full_text(pipe):
    full = pipe("The capital of France is", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    new = pipe("The capital of France is", max_new_tokens=5, do_sample=False, return_full_text=False)
    assert full == "The capital of France is" + new[0]["generated_text"]


def test_batch_of_chats_equals_one_by_one(pipe):
    chats = [CHAT, [{"role": "user", "content": "Name a colour."}]]
    batched = pipe(chats, max_new_tokens=12, do_sample=False)
    assert len(batched) == 2
    for chat, result in zip(chats, batched):
        alone = pipe(chat, max_new_tokens=12, do_sample=False)
        assert result[0]["generated_text"] == alone[0]["generated_text"]


def test_assistant_prefill_is_continued(pipe):
    chat = [*CHAT, {"role": "assistant", "content": "The capital"}]
    out = pipe(chat, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert len(out) == 2 and out[-1]["content"].startswith("The capital") and len(out[-1]["content"]) > 11


def test_sampling_is_seeded(pipe):
    set_seed(7)
    a = pipe(CHAT, max_new_tokens=10)
    set_seed(7)
    b = pipe(CHAT, max_new_tokens=10)
    assert a == b


def test_model_kwargs_and_dtype(tiny_checkpoints):
    p = pipeline(
        "text-generation", str(tiny_checkpoints["llama"]), model_kwargs={"torch_dtype": torch.bfloat16}
    )
    assert p.model.dtype == torch.bfloat16
    out = p("hello", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("hello")
    quantized = pipeline(
        "text-generation",
        str(tiny_checkpoints["llama"]),
        model_kwargs={"quantization_config": BitsAndBytesConfig(load_in_4bit=True)},
    )
    assert quantized.model.quantization_config.bits == 4
    with pytest.raises(ValueError, match="nf4"):
        pipeline(
            "text-generation",
            str(tiny_checkpoints["llama"]),
            quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        )


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        ([], ValueError, "empty"),
        ([{"content": "hi"}], ValueError, "role"),
        ([{"role": "user"}], ValueError, "content"),
        ([{"role": "user", "content": 3}], TypeError, "content"),
        (42, TypeError, "int"),
    ],
)
def test_malformed_chats(pipe, inputs, error, match):
    with pytest.raises(error, match=match):
        pipe(inputs, max_new_tokens=2)


def test_unknown_role_where_the_template_forbids_it(tiny_checkpoints, tmp_path):
    import json
    import shutil

    path = tmp_path / "m"
    shutil.copytree(tiny_checkpoints["llama"], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
        "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    p = pipeline("text-generation", str(path))
    with pytest.raises(Exception, match="Unknown role: wizard"):
        p([{"role": "wizard", "content": "hi"}], max_new_tokens=2)


def test_model_without_chat_template(tiny_checkpoints, tmp_path):
    import json
    import shutil

    path = tmp_path / "m"
    shutil.copytree(tiny_checkpoints["llama"], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    p = pipeline("text-generation", str(path))
    with pytest.raises(ValueError, match="chat template"):
        p(CHAT, max_new_tokens=2)
    assert p("plain text works", max_new_tokens=2, do_sample=False)[0]["generated_text"]


def test_bad_task_and_options(tiny_checkpoints):
    with pytest.raises(ValueError, match="summarization"):
        pipeline("summarization", str(tiny_checkpoints["llama"]))
    p = pipeline("text-generation", str(tiny_checkpoints["llama"]))
    with pytest.raises(TypeError, match="bogus"):
        p("hi", bogus=1)


def test_a_streamer_gets_the_reply_as_in_transformers(bundled_model):
    """pipe(chat, streamer=TextStreamer(tok)) streams the reply the pipeline returns (transformers takes it)."""
    from chatlm import AutoTokenizer, TextStreamer

    tok = AutoTokenizer.from_pretrained(None)
    pieces: list[str] = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pieces.append(text)

    pipe = pipeline("text-generation", bundled_model, tokenizer=tok)
    chat = [{"role": "user", "content": "Name a colour."}]
    out = pipe(
        chat,
        max_new_tokens=8,
        do_sample=False,
        streamer=Collect(tok, skip_prompt=True, skip_special_tokens=True),
    )
    assert "".join(pieces).strip() == out[0]["generated_text"][-1]["content"].strip()
    with pytest.raises(ValueError, match="a streamer takes one sequence"):
        pipe([chat, chat], max_new_tokens=2, streamer=Collect(tok))
