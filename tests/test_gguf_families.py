"""GGUF round trips of the families beyond llama (and of Llama 3.1+'s rope scaling): a tiny HF checkpoint written as llama.cpp's converter writes it
(tests/gguf_export.py), loaded by our GGUF loader, against transformers on the HF directory."""

from __future__ import annotations

import pytest
import torch
import transformers

from chatlm.auto import AutoModelForCausalLM
from checkpoints import write_checkpoint
from gguf_export import export_gguf, quantize_dequantize

# variant -> checkpoint overrides: llama.cpp's qwen3 has no sliding window, so that checkpoint goes without one.
FAMILIES = {
    "llama_tied_llama3": {},  # Llama 3.1+'s rope scaling: the converter writes a rope_freqs tensor
    "qwen3": dict(use_sliding_window=False),
    "phi3_longrope": {},
    "phi3_short_partial": {},
    "olmo2": {},
    "granite": {},
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    variant = request.param
    root = tmp_path_factory.mktemp(variant)
    ckpt = write_checkpoint(root / "hf", variant, **FAMILIES[variant])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    path = export_gguf(ckpt, root / f"{variant}.gguf", theirs.config.model_type, tokenizer_dir=ckpt)
    return variant, ckpt, path, theirs


def ids(length: int = 20, seed: int = 0) -> torch.Tensor:  # 20: past phi3_longrope's original context of 16
    return torch.randint(3, 300, (1, length), generator=torch.Generator().manual_seed(seed))


def test_f32_round_trip_matches_transformers(exported):
    variant, ckpt, path, theirs = exported
    ours = AutoModelForCausalLM.from_pretrained(path)
    direct = AutoModelForCausalLM.from_pretrained(ckpt)
    for key in ("head_dim", "partial_rotary_factor", "sliding_window", "layer_types", "tie_word_embeddings"):
        assert getattr(ours.config, key) == getattr(direct.config, key), key
    assert (ours._longrope_context, ours._rope_scale) == (direct._longrope_context, direct._rope_scale)
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        expected = direct.config.extra.get(key)  # GGUF keeps float32: 0.1 comes back as 0.10000000149...
        assert ours.config.extra.get(key) == (
            expected if expected is None else pytest.approx(expected, rel=1e-7)
        )
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-4, rtol=0)
        # and the generation path, longrope's switch of factors included
        prompt = ids(7, seed=1)
        expected = theirs.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False
        )
    assert ours.generate(prompt, max_new_tokens=16).tolist() == expected.tolist()


@pytest.mark.parametrize("variant", ["qwen3", "phi3_longrope"])
def test_q8_0_weights_are_the_gguf_dequantization(variant, tmp_path):
    """Fused (phi3) and per-head norm (qwen3) tensors land in the right parameters: each weight equals the gguf
    package's dequantization of what the converter wrote, and the rope factors come back exactly."""
    ckpt = write_checkpoint(tmp_path / "hf", variant, **FAMILIES[variant])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    path = export_gguf(ckpt, tmp_path / "q8.gguf", theirs.config.model_type, tensor_type="Q8_0")
    ours = AutoModelForCausalLM.from_pretrained(path)
    state = theirs.state_dict()
    for name, weight in ours.state_dict().items():
        expected = torch.from_numpy(quantize_dequantize(state[name].numpy(), "Q8_0"))
        torch.testing.assert_close(weight, expected, atol=0, rtol=0, msg=name)
    if variant.startswith("phi3"):
        rope = theirs.config.rope_parameters
        for key in ("short_factor", "long_factor"):
            got = torch.tensor(ours.config.rope_scaling[key], dtype=torch.float32)
            assert torch.equal(got, torch.tensor(rope[key], dtype=torch.float32)), key
