"""The real bundled model end to end: chat -> our template and tokenizer -> our engine, against transformers'
reference outputs in shared/reference."""

from __future__ import annotations

import json

import pytest
import torch

from chatlm import AutoTokenizer


@pytest.fixture(scope="module")
def reference(shared_dir):
    return json.loads((shared_dir / "reference" / "smollm2_greedy.json").read_text())["chats"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(None)


def test_every_reference_chat_greedy_float32(bundled_model, tokenizer, reference):
    assert bundled_model.dtype == torch.float32
    for name, case in reference.items():
        prompt = tokenizer.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True)
        assert prompt == case["formatted_prompt"], name
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        assert ids["input_ids"][0].tolist() == case["prompt_ids"], name
        out = bundled_model.generate(**ids, max_new_tokens=48, do_sample=False)
        generated = out[0, ids["input_ids"].shape[1] :].tolist()
        assert generated == case["generated_ids"], name
        assert tokenizer.decode(generated, skip_special_tokens=True) == case["text"], name


def test_reference_chats_batched_with_left_padding(bundled_model, tokenizer, reference):
    """All chats in one left-padded batch: each row equals its reference up to where its greedy path may part
    from the unbatched one (padding changes float rounding), and in practice all the way."""
    cases = list(reference.values())
    prompts = [c["prompt_ids"] for c in cases]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(cases), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = bundled_model.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False)
    for i, case in enumerate(cases):
        row = out[i, width:].tolist()[: len(case["generated_ids"])]
        assert row == case["generated_ids"]
