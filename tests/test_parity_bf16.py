"""bfloat16 parity with transformers: the same casts at the same places (norms, rope tables, attention factor),
so logits agree to within bf16 rounding. Prefill is bit-identical on CPU today; decode steps run chatlm's own
attention kernel, which sums in another order than torch's, so a value can land one bf16 step away and the
logits move by a few ulps."""

from __future__ import annotations

import pytest
import torch
import transformers

from chatlm.auto import AutoModelForCausalLM
from test_parity import prompt

ATOL = 0.05  # ~1.5 bf16 ulps at the logits' magnitude (|logit| < 8 here)
DECODE_ATOL = 0.125  # ~4 ulps: chatlm's decode attention rounds differently from torch's (see above)


@pytest.fixture(
    scope="module", params=["llama", "qwen3", "phi3_longrope", "phi3_short_partial", "olmo2", "granite"]
)
def pair(request, tiny_checkpoints):
    path = tiny_checkpoints[request.param]
    ours = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return ours, theirs


def test_bf16_prefill_and_cached_decode(pair):
    ours, theirs = pair
    ids = prompt(20, ours.config.vocab_size, seed=1)
    with torch.no_grad():
        cache = ours.new_cache(1, 32)
        hf_out = theirs(ids, use_cache=True)
        torch.testing.assert_close(ours(ids, past_key_values=cache).logits, hf_out.logits, atol=ATOL, rtol=0)
        hf_cache = hf_out.past_key_values
        for step in range(5):
            token = hf_out.logits[:, -1:].argmax(-1)
            hf_out = theirs(token, past_key_values=hf_cache, use_cache=True)
            got = ours(token, past_key_values=cache).logits
            torch.testing.assert_close(
                got, hf_out.logits, atol=DECODE_ATOL, rtol=0, msg=f"decode step {step}"
            )


def test_bf16_greedy_generation(pair):
    ours, theirs = pair
    ids = prompt(7, ours.config.vocab_size, seed=3)
    expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert ours.generate(ids, max_new_tokens=12).tolist() == expected.tolist()
