"""Gemma beyond the shared parity suite: trained-looking norm weights (the suite's stay at zero, i.e. 1 + 0), half
precision, config.json files in the older spellings, and GGUF round trips as llama.cpp's converter writes them."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from chatlm.auto import AutoModelForCausalLM
from chatlm.loading.gguf_model import _gemma_extras
from chatlm.models.config import ModelConfig
from checkpoints import write_checkpoint
from gguf_export import export_gguf

GEMMAS = ["gemma", "gemma2", "gemma3_text"]


def with_random_norms(path, seed: int = 0):
    """Give every norm (including Gemma 3's q/k norms) random weights, so that 1 + w and its float32 product matter."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gemma")
    return {v: with_random_norms(write_checkpoint(root / v, v)) for v in GEMMAS}


def ids(length: int = 20, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", GEMMAS)
def test_random_norms_prefill_and_decode_match_transformers(checkpoints, variant):
    ours = AutoModelForCausalLM.from_pretrained(checkpoints[variant])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoints[variant], dtype=torch.float32
    ).eval()
    x = ids()
    with torch.no_grad():
        cache = ours.new_cache(1, 32)
        expected = theirs(x, use_cache=True)
        torch.testing.assert_close(ours(x, past_key_values=cache).logits, expected.logits, atol=1e-4, rtol=0)
        for step in range(4):
            token = expected.logits[:, -1:].argmax(-1)
            expected = theirs(token, past_key_values=expected.past_key_values, use_cache=True)
            got = ours(token, past_key_values=cache).logits
            torch.testing.assert_close(got, expected.logits, atol=1e-4, rtol=0, msg=f"decode step {step}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", GEMMAS)
def test_half_precision_matches_transformers(checkpoints, variant, dtype):
    """Same operations in the same order and dtypes (norm products in float32, the embedding scale rounded to the
    dtype, softmax in float32): bit-identical logits here. The tolerance leaves one bf16 step at these magnitudes
    (1/32) for other BLAS builds; a Llama-style norm (cast before the weight) is already off by ~0.1."""
    ours = AutoModelForCausalLM.from_pretrained(checkpoints[variant], torch_dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[variant], dtype=dtype).eval()
    x = ids(batch=2)
    with torch.no_grad():
        a, b = ours(x).logits.float(), theirs(x).logits.float()
    assert ours.dtype == dtype
    torch.testing.assert_close(a, b, atol=0.04, rtol=0)
    prompt = ids(7, seed=3)
    expected = theirs.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False
    )
    assert ours.generate(prompt, max_new_tokens=10).tolist() == expected.tolist()


def rewrite_config(path, drop: tuple[str, ...], **keys) -> None:
    file = path / "config.json"
    raw = {k: v for k, v in json.loads(file.read_text()).items() if k not in drop}
    file.write_text(json.dumps({**raw, **keys}))


@pytest.mark.parametrize(
    "variant, drop, keys",
    [
        # Gemma 2 as first released: no layer_types (alternating from layer 0 = sliding), default softcaps 50 / 30.
        ("gemma2", ("layer_types", "attn_logit_softcapping", "final_logit_softcapping"), {}),
        # Gemma 3 before transformers 5: rope_theta + rope_scaling (global layers), rope_local_base_freq, a pattern.
        (
            "gemma3_text",
            ("layer_types", "rope_parameters", "query_pre_attn_scalar"),
            dict(
                rope_theta=1000.0,
                rope_scaling={"rope_type": "linear", "factor": 4.0},
                rope_local_base_freq=30.0,
                sliding_window_pattern=3,
                num_hidden_layers=3,
            ),
        ),
        # Gemma 3 with every default: theta 1e6 / 1e4, pattern 6, query_pre_attn_scalar 256, no final softcap.
        (
            "gemma3_text",
            ("layer_types", "rope_parameters", "query_pre_attn_scalar", "final_logit_softcapping"),
            {},
        ),
        # Gemma's legacy "gelu" means the tanh approximation.
        ("gemma", (), dict(hidden_act="gelu")),
    ],
)
def test_older_config_spellings_mean_what_transformers_reads(tmp_path, variant, drop, keys):
    path = with_random_norms(write_checkpoint(tmp_path / variant, variant))
    rewrite_config(path, drop, **keys)
    ours = AutoModelForCausalLM.from_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if variant != "gemma":
        assert ours.config.layer_types == theirs.config.layer_types
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-4, rtol=0)


# Checkpoints that GGUF can describe: llama.cpp stores no query_pre_attn_scalar (it uses key_length), and for Gemma 3
# neither the sliding layers' rope base (10000) nor the pattern (6).
GGUF_VARIANTS = {
    "gemma": {},
    "gemma2": dict(query_pre_attn_scalar=16),
    "gemma3_text": dict(
        num_hidden_layers=6,
        sliding_window_pattern=6,
        query_pre_attn_scalar=16,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
}


@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0"])
@pytest.mark.parametrize("variant", sorted(GGUF_VARIANTS))
def test_gguf_round_trip_matches_transformers(tmp_path, variant, tensor_type):
    overrides = dict(GGUF_VARIANTS[variant])
    if variant == "gemma3_text":
        overrides["final_logit_softcapping"] = None  # Gemma 3's converter writes none
    ckpt = with_random_norms(write_checkpoint(tmp_path / "hf", variant, **overrides))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    path = export_gguf(
        ckpt, tmp_path / f"{variant}.gguf", variant, tensor_type=tensor_type, tokenizer_dir=ckpt
    )
    ours = AutoModelForCausalLM.from_pretrained(path)
    direct = AutoModelForCausalLM.from_pretrained(ckpt)
    for key in (
        "model_type",
        "layer_types",
        "sliding_window",
        "query_pre_attn_scalar",
        "rope_theta",
        "rope_scaling",
    ):
        assert getattr(ours.config, key) == getattr(direct.config, key), key
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "rope_local_base_freq"):
        assert getattr(ours.config, key) == getattr(direct.config, key) or variant == "gemma", key
    x = ids()
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
    if tensor_type == "F32":
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    else:  # 8-bit weights: close, and the norms (kept in float32) come back as w + 1 - 1
        assert (a - b).pow(2).mean().sqrt() < 0.06 * b.pow(2).mean().sqrt()
        for name, w in ours.state_dict().items():
            if name.endswith("norm.weight"):
                torch.testing.assert_close(w, direct.state_dict()[name], atol=1e-6, rtol=0, msg=name)


def test_gguf_gemma_metadata_as_llama_cpp_reads_it():
    def meta_of(values):
        return lambda key, default=None: values.get(key, default)

    base = {"embedding_length": 4608, "attention.head_count": 32, "attention.key_length": 128}
    # Gemma 2 27B (46 layers): scores scale by 1/sqrt(hidden / heads) = 1/sqrt(144), not 1/sqrt(key_length)
    assert _gemma_extras(meta_of({**base, "block_count": 46}), layers_27b=46)["query_pre_attn_scalar"] == 144
    assert _gemma_extras(meta_of({**base, "block_count": 42}), layers_27b=46)["query_pre_attn_scalar"] == 128
    extras = _gemma_extras(
        meta_of({**base, "block_count": 4, "attention.sliding_window_pattern": [True, False, True, False]}),
        62,
    )
    assert extras["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert "attn_logit_softcapping" not in extras  # absent: the config class's default (50 for Gemma 2)
    config = ModelConfig.from_dict(
        {
            "model_type": "gemma2",
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 8,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
        }
    )
    assert (config.attn_logit_softcapping, config.final_logit_softcapping, config.head_dim) == (
        50.0,
        30.0,
        256,
    )
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]


def test_gemma3_image_text_checkpoint_loads_its_language_model(tmp_path):
    """A Gemma 3 image-text checkpoint (model_type gemma3: text_config + vision_config, tensors under
    language_model.): the language model loads, the vision tower is skipped, text logits match transformers'."""
    from checkpoints import BASE, VARIANTS, write_tokenizer

    vocab = write_tokenizer(tmp_path)
    text = {**BASE, **VARIANTS["gemma3_text"][1], "vocab_size": vocab}
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config={**vision, "patch_size": 14},
        mm_tokens_per_image=4,
        boi_token_index=vocab - 3,
        eoi_token_index=vocab - 2,
        image_token_index=vocab - 1,  # past the ids below: a text-only prompt
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if name.endswith("norm.weight") else 0.2)
    model.save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (
        ours.config.model_type == "gemma3_text"
        and ours.config.layer_types == model.config.text_config.layer_types
    )
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, model(x).logits, atol=1e-4, rtol=0)
