"""Parity with transformers on tiny random checkpoints: logits of prefill and cached decode, greedy generations."""

from __future__ import annotations

import pytest
import torch
import transformers

from chatlm.auto import AutoModelForCausalLM
from checkpoints import VARIANTS

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tiny_checkpoints):
    path = tiny_checkpoints[request.param]
    ours = AutoModelForCausalLM.from_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


def prompt(length: int, vocab: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def test_prefill_and_cached_decode_logits(pair):
    ours, theirs = pair
    ids = prompt(20, ours.config.vocab_size, seed=1)  # longer than mistral's sliding window of 8
    with torch.no_grad():
        cache = ours.new_cache(1, 32)
        hf_out = theirs(ids, use_cache=True)
        our_logits = ours(ids, past_key_values=cache).logits
        torch.testing.assert_close(our_logits, hf_out.logits, atol=ATOL, rtol=0)
        hf_cache = hf_out.past_key_values
        for step in range(10):
            token = hf_out.logits[:, -1:].argmax(-1)
            hf_out = theirs(token, past_key_values=hf_cache, use_cache=True)
            our_logits = ours(token, past_key_values=cache).logits
            torch.testing.assert_close(
                our_logits, hf_out.logits, atol=ATOL, rtol=0, msg=f"decode step {step}"
            )


def test_forward_without_cache_matches_cached(pair):
    ours, _ = pair
    ids = prompt(12, ours.config.vocab_size, seed=2)
    with torch.no_grad():
        full = ours(ids).logits
        cache = ours.new_cache(1, 4)  # too small on purpose: the cache must grow
        parts = [
            ours(ids[:, :5], past_key_values=cache).logits,
            ours(ids[:, 5:9], past_key_values=cache).logits,
        ]
        parts += [ours(ids[:, i : i + 1], past_key_values=cache).logits for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=ATOL, rtol=0)


def test_greedy_generation_unbatched(pair):
    ours, theirs = pair
    ids = prompt(7, ours.config.vocab_size, seed=3)
    expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    got = ours.generate(ids, max_new_tokens=16)
    assert got.tolist() == expected.tolist()


def test_greedy_generation_batched_left_padding(pair):
    ours, theirs = pair
    vocab, pad = ours.config.vocab_size, ours.config.pad_token_id
    rows = [prompt(n, vocab, seed=10 + n)[0] for n in (9, 4, 6)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    expected = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=pad)
    assert got.tolist() == expected.tolist()
    # each row of the batch equals the same prompt generated alone (not with longrope: transformers switches its
    # factors when the padded batch outgrows the pre-training context, so a row's rope depends on the batch)
    if ours._longrope_context is not None:
        return
    for i, r in enumerate(rows):
        alone = ours.generate(r[None], max_new_tokens=12, pad_token_id=pad)[0, len(r) :]
        batched = got[i, width:]
        n = len(alone)
        assert batched[:n].tolist() == alone.tolist()


def test_batched_logits_with_padding_match_transformers(pair):
    ours, theirs = pair
    ids = prompt(10, ours.config.vocab_size, seed=5, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
