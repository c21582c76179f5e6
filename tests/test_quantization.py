"""Weight-only int8 / int4: layers against theory, models against float, GGUF blocks kept as they are, configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from chatlm import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    QuantizationConfig,
    pipeline,
    quality,
)
from chatlm.loading import gguf_dequant
from chatlm.loading.gguf_blocks import GGUFBlocks
from chatlm.quantization import (
    KERNEL_MAX_ROWS,
    QuantizedEmbedding,
    QuantizedLinear,
    quantize_int4,
    quantize_int8,
)
from gguf_export import export_gguf, quantize_dequantize

BF16_EPS = 2.0**-8  # relative rounding of bfloat16
ROWS = sorted({1, KERNEL_MAX_ROWS[8] + 1, KERNEL_MAX_ROWS[4] + 1, 300})  # the kernels and the tiled paths


def quantized(weight: torch.Tensor, bits: int, group: int = 32, compute=torch.bfloat16, bias=None):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer = QuantizedLinear(linear, bits, group, compute)
    layer.load_weight(weight)
    layer.bias = None if bias is None else nn.Parameter(bias)
    return layer


def random_weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


# --- layers ---------------------------------------------------------------------------------------------------


def test_int8_weights_within_half_a_step():
    w = random_weight(384, 256)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()  # round to nearest: at most half a step


@pytest.mark.parametrize("group", [32, 128])
def test_int4_weights_within_half_a_step(group):
    w = random_weight(256, 512)
    q, scales, zeros = quantize_int4(w, group)
    assert int(q.min()) == 0 and int(q.max()) == 15
    step = scales.repeat_interleave(group, dim=1)
    deq = (q.float() - 8) * step + zeros.repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", ROWS)
def test_linear_equals_matmul_on_its_dequantized_weight(bits, rows):
    """Every path (kernel for few rows, dequantized tiles for many) computes x @ W^T for the W it stores: within
    float32 rounding in float32 compute, within bfloat16 rounding of x, W and y in bfloat16 compute."""
    w, b = random_weight(1536, 576), torch.randn(1536) * 0.1
    x = torch.randn(2, rows, 576, generator=torch.Generator().manual_seed(1))
    for compute in (torch.float32, torch.bfloat16):
        layer = quantized(w, bits, compute=compute, bias=b)
        deq = layer.dequantize()
        y, ref = layer(x), x @ deq.T + b
        assert y.shape == ref.shape and y.dtype == torch.float32
        if compute == torch.float32:
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        else:
            bound = 3 * BF16_EPS * (x.abs() @ deq.abs().T)  # x, the weight (int4 scales) and y rounded
            assert ((y - ref).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_output_error_follows_the_quantization_step(bits):
    """Against the float weight: |y - x @ W^T| <= sum_k |x_k| * step / 2, plus bfloat16 rounding."""
    w = random_weight(512, 256)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    layer = quantized(w, bits)
    if bits == 8:
        half_step = (quantize_int8(w)[1] / 2)[None, :] * x.abs().sum(-1, keepdim=True)
    else:
        step = quantize_int4(w, 32)[1].repeat_interleave(32, dim=1)
        half_step = x.abs() @ (step / 2).T
    err = (layer(x) - x @ w.T).abs()
    assert (err <= half_step * 1.001 + 3 * BF16_EPS * (x.abs() @ w.abs().T)).all()
    # and in practice far below the worst case: errors of independent weights partly cancel
    assert err.mean() < 0.25 * half_step.mean()


@pytest.mark.parametrize(
    ("n", "k", "bits", "expect"),
    [
        (80, 64, 4, 4),  # 64 + a tail of 16 channels
        (48, 64, 4, 4),  # a channel count whose packed layout is not read: the kernel does all
        (40, 64, 4, 8),  # out % 16 != 0: int4 kernel impossible, int8 instead
        (64, 48, 4, 8),  # in % group != 0
        (40, 48, 8, 8),
    ],
)
def test_odd_shapes(n, k, bits, expect):
    w = random_weight(n, k)
    for compute in (torch.float32, torch.bfloat16):
        layer = quantized(w, bits, compute=compute)
        assert layer.bits == expect
        for rows in (1, 200):
            x = torch.randn(rows, k)
            y, ref = layer(x), x @ layer.dequantize().T
            assert ((y - ref).abs() <= 3 * BF16_EPS * (x.abs() @ layer.dequantize().abs().T) + 1e-6).all()


def test_embedding_int8_rows():
    w = random_weight(300, 64)
    emb = QuantizedEmbedding(nn.Embedding(300, 64), torch.float32)
    emb.load_weight(w)
    ids = torch.tensor([[0, 5, 299, 5]])
    out = emb(ids)
    q, scales = quantize_int8(w)
    torch.testing.assert_close(out, (q.float() * scales[:, None])[ids], atol=0, rtol=0)
    assert ((out - w[ids]).abs() <= scales[ids][..., None] / 2 * (1 + 1e-5)).all()


# --- models ---------------------------------------------------------------------------------------------------


def sample_ids(n=12, seed=0):
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def as_float_model(quantized_model, path):
    """A float model of the same checkpoint whose weights are the quantized model's, dequantized."""
    model = AutoModelForCausalLM.from_pretrained(path)
    modules = dict(quantized_model.named_modules())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and hasattr(modules[name], "dequantize"):
                m.weight = nn.Parameter(modules[name].dequantize())
    return model


@pytest.mark.parametrize("variant", ["llama", "llama_tied_llama3", "qwen2"])
@pytest.mark.parametrize("bits", [8, 4])
def test_tiny_models_load_quantized(tiny_checkpoints, variant, bits):
    path = tiny_checkpoints[variant]
    config = QuantizationConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    reference = AutoModelForCausalLM.from_pretrained(path)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and {m.bits for m in layers if m is not model.lm_head} == {bits} and model.lm_head.bits == 8
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    if model.config.tie_word_embeddings:  # one int8 table for both
        assert model.lm_head.qweight is model.model.embed_tokens.qweight
    assert model.num_parameters() == reference.num_parameters()
    x = sample_ids()
    exact = QuantizationConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4, compute_dtype=torch.float32)
    exact = AutoModelForCausalLM.from_pretrained(path, quantization_config=exact)
    with torch.no_grad():
        a, b = model(x).logits, reference(x).logits
        # the float model of its dequantized weights: to float32 rounding in float32 compute, and within
        # bfloat16 rounding (amplified by the random layers) in bfloat16 compute
        c = as_float_model(model, path)(x).logits
        torch.testing.assert_close(
            exact(x).logits, as_float_model(exact, path)(x).logits, atol=1e-4, rtol=1e-4
        )
    assert (a - c).pow(2).mean().sqrt() < 0.03 * c.pow(2).mean().sqrt()
    # against the float weights: random tiny models amplify weight errors about 5x (int8 ~3.5%, int4 ~40%)
    rel = ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
    assert rel < (0.06 if bits == 8 else 0.6)
    out = model.generate(x, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)


def test_memory_footprint(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    full = AutoModelForCausalLM.from_pretrained(path).get_memory_footprint()
    int8 = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=QuantizationConfig(load_in_8bit=True)
    )
    int4 = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=QuantizationConfig(load_in_4bit=True)
    )
    # int8: a quarter, plus a scale per row and the float norms; int4: an eighth plus scales and zero points,
    # with the (here large) embedding and lm_head in int8
    assert 0.25 < int8.get_memory_footprint() / full < 0.28
    assert 0.125 < int4.get_memory_footprint() / full < 0.21


def test_skip_modules_stay_float(tiny_checkpoints):
    path = tiny_checkpoints["llama_tied_llama3"]
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "o_proj"])
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: kept float together
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)


def test_moe_routers_and_experts_stay_float(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["qwen2_moe"], quantization_config=QuantizationConfig(load_in_4bit=True)
    )
    block = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    assert isinstance(block.gate, nn.Linear) and isinstance(block.shared_expert_gate, nn.Linear)
    assert isinstance(block.shared_expert.up_proj, QuantizedLinear)
    model.generate(sample_ids(), max_new_tokens=3, do_sample=False)


# --- GGUF blocks kept quantized -------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor_type", ["Q4_0", "Q4_1"])
def test_gguf_q4_kept_lossless(tmp_path, tiny_checkpoints, tensor_type):
    """Q4_0 / Q4_1 blocks become int4 group-32 weights with no requantization: in float32 compute every layer
    computes with exactly the gguf package's dequantized weight, and the model equals the float GGUF load."""
    path = export_gguf(tiny_checkpoints["llama"], tmp_path / "tiny.gguf", "llama", tensor_type=tensor_type)
    keep = QuantizationConfig(load_in_4bit=True, compute_dtype=torch.float32, skip_modules=["embed_tokens"])
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=keep)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    expected = {
        k: torch.from_numpy(quantize_dequantize(v.numpy(), tensor_type))
        for k, v in reference.state_dict().items()
    }
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and n != "lm_head"}
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer.bits == 4 and layer.group_size == 32
        torch.testing.assert_close(layer.dequantize(), expected[f"{name}.weight"], atol=0, rtol=0, msg=name)
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        # float32 sums in another order: a few ulps of the terms' magnitude (a cancelling sum was 1.6e-6 off)
        torch.testing.assert_close(layer(x), x @ expected[f"{name}.weight"].T, atol=1e-5, rtol=1e-5)
    floats = AutoModelForCausalLM.from_pretrained(path)
    x = sample_ids()
    with torch.no_grad():
        a, b = model(x).logits, floats(x).logits
    # only the lm_head differs: int8 per row against the Q4 blocks of the file
    assert (a - b).pow(2).mean().sqrt() < 0.02 * b.pow(2).mean().sqrt()
    skip_head = QuantizationConfig(
        load_in_4bit=True, compute_dtype=torch.float32, skip_modules=["embed_tokens", "lm_head"]
    )
    exact = AutoModelForCausalLM.from_pretrained(path, quantization_config=skip_head)
    with torch.no_grad():
        torch.testing.assert_close(exact(x).logits, b, atol=1e-4, rtol=1e-4)
    # bfloat16 compute: scales and zero points rounded to bfloat16
    fast = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=QuantizationConfig(load_in_4bit=True, skip_modules=["embed_tokens", "lm_head"]),
    )
    with torch.no_grad():
        c = fast(x).logits
    assert (c - b).pow(2).mean().sqrt() < 0.02 * b.pow(2).mean().sqrt()


def test_gguf_q8_0_to_int8_per_channel(tmp_path, tiny_checkpoints):
    """Q8_0 has a scale per 32 values, the int8 kernel one per output channel: the blocks are requantized, each
    weight within half a channel step of the file's value."""
    path = export_gguf(tiny_checkpoints["llama"], tmp_path / "tiny-q8.gguf", "llama", tensor_type="Q8_0")
    config = QuantizationConfig(load_in_8bit=True, compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    state = reference.state_dict()
    for name, layer in model.named_modules():
        if isinstance(layer, (QuantizedLinear, QuantizedEmbedding)):
            file_weight = torch.from_numpy(quantize_dequantize(state[f"{name}.weight"].numpy(), "Q8_0"))
            err = (layer.dequantize() - file_weight).abs()
            assert (err <= layer.scales[:, None] / 2 * (1 + 1e-5)).all(), name
    floats = AutoModelForCausalLM.from_pretrained(path)
    x = sample_ids()
    with torch.no_grad():
        a, b = model(x).logits, floats(x).logits
    assert (a - b).pow(2).mean().sqrt() < 0.06 * b.pow(2).mean().sqrt()


def test_gguf_other_types_are_requantized(tmp_path, tiny_checkpoints):
    path = export_gguf(tiny_checkpoints["qwen2"], tmp_path / "tiny-q5.gguf", "qwen2", tensor_type="Q5_0")
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=QuantizationConfig(load_in_4bit=True)
    )
    assert model.model.layers[0].mlp.up_proj.bits == 4
    model.generate(sample_ids(), max_new_tokens=3, do_sample=False)


def random_blocks(ggml_type, n_blocks, seed=0):
    """Random blocks of a type with finite f16 scales at the given byte offsets."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, (n_blocks, 2)).astype(np.float16)
    raw[:, :4] = scales.view(np.uint8).reshape(n_blocks, 4)
    return torch.from_numpy(raw)


@pytest.mark.parametrize("ggml_type", [gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q4_1])
def test_gguf_blocks_to_int4_match_dequantization(ggml_type):
    """Q4_K's 6-bit sub-block scales and mins become group-32 scales and zero points: the same values as the
    dequantizer's, within float32 rounding (the zero point is computed, not stored)."""
    n, k = 128, 512
    block_size, _ = gguf.GGML_QUANT_SIZES[ggml_type]
    raw = random_blocks(ggml_type, n * k // block_size).reshape(n, -1)
    expected = gguf_dequant.dequantize(raw, ggml_type, (n, k))
    layer = QuantizedLinear(nn.Linear(k, n, bias=False), 4, 128, torch.float32)
    layer.load_weight(GGUFBlocks(raw, ggml_type, (n, k)))
    assert layer.bits == 4 and layer.group_size == 32
    torch.testing.assert_close(
        layer.dequantize(), expected, atol=2e-7 * float(expected.abs().max()), rtol=1e-6
    )


# --- the bundled model ----------------------------------------------------------------------------------------

# Five short paragraphs of plain English (about 600 tokens), written for this test: a text this long averages
# out the token-to-token noise of small perplexity differences.
TEXT = (Path(__file__).parent / "quantization_text.txt").read_text(encoding="utf-8")


def perplexity(model, ids: torch.Tensor) -> float:
    return quality.perplexity(
        model, text=ids[0]
    ).perplexity  # one window: the text is shorter than the context


@pytest.fixture(scope="module")
def bundled_int8():
    return AutoModelForCausalLM.from_pretrained(
        None, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )


def test_bundled_int8_perplexity_within_one_percent(bundled_model, bundled_int8):
    tokenizer = AutoTokenizer.from_pretrained(None)
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] > 500
    base, int8 = perplexity(bundled_model, ids), perplexity(bundled_int8, ids)
    assert abs(int8 - base) < 0.01 * base
    int4 = AutoModelForCausalLM.from_pretrained(
        None, quantization_config=QuantizationConfig(load_in_4bit=True)
    )
    assert abs(perplexity(int4, ids) - base) < 0.03 * base  # the file's own Q4_1 blocks; int8 embeddings


def test_bundled_int8_generates_sensible_text(bundled_int8):
    pipe = pipeline("text-generation", bundled_int8, tokenizer=AutoTokenizer.from_pretrained(None))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    reply = pipe(chat, max_new_tokens=20, do_sample=False)[0]["generated_text"][-1]["content"]
    assert "Paris" in reply
    assert bundled_int8.get_memory_footprint() < 0.26 * 538_060_032  # float32: 538 MB


def test_guide_snippets():
    """The guide's BitsAndBytesConfig code, with the bundled model."""
    for config in (
        BitsAndBytesConfig(load_in_8bit=True),
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
    ):
        pipe = pipeline(
            "text-generation", None, device_map="auto", model_kwargs={"quantization_config": config}
        )
        out = pipe([{"role": "user", "content": "Say hello."}], max_new_tokens=5)
        assert out[0]["generated_text"][-1]["role"] == "assistant"


MEMORY_SCRIPT = """
import os, resource, sys
import torch
from chatlm import AutoModelForCausalLM, QuantizationConfig
from chatlm.loading.resolve import bundled_model_path
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = AutoModelForCausalLM.from_pretrained(None, quantization_config=QuantizationConfig(load_in_4bit=True))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(after - before, os.path.getsize(bundled_model_path()) // 1024, model.get_memory_footprint() // 1024)
"""


def test_bundled_4bit_loads_within_one_and_a_half_file_sizes():
    """Peak RSS growth of a fresh process over the load (parse, weights, transients) < 1.5x the GGUF file."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, check=True, timeout=300
    )
    grown, file_kib, footprint_kib = map(int, out.stdout.split())
    assert footprint_kib < file_kib  # the Q4_1 blocks as they are, the Q8_0 embedding as int8
    assert grown < 1.5 * file_kib, (
        f"peak RSS grew {grown / 1024:.0f} MiB for a {file_kib / 1024:.0f} MiB file"
    )


# --- configs --------------------------------------------------------------------------------------------------


def test_config_fields_map():
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"]
    )
    assert config.bits == 4 and config.compute_dtype == torch.float32 and config.skip_modules == ["lm_head"]
    assert BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0).compute_dtype == torch.bfloat16
    assert QuantizationConfig(load_in_4bit=True, group_size=128, compute_dtype="bfloat16").group_size == 128


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), ValueError, "nf4"),
        (lambda: BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.0), ValueError, "outlier"),
        (lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True), ValueError, "scales"),
        (
            lambda: BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True),
            ValueError,
            "offload",
        ),
        (
            lambda: BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True),
            ValueError,
            "training",
        ),
        (
            lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16),
            ValueError,
            "float16",
        ),
        (lambda: BitsAndBytesConfig(load_in_4bit=True, bogus=1), TypeError, "bogus"),
        (lambda: QuantizationConfig(load_in_4bit=True, group_size=48), ValueError, "group_size"),
        (lambda: QuantizationConfig(load_in_8bit=True, group_size=32), ValueError, "4-bit"),
        (lambda: QuantizationConfig(load_in_8bit=True, load_in_4bit=True), ValueError, "choose one of"),
        (lambda: QuantizationConfig(load_in_4bit=True, keep_gguf_blocks=True), ValueError, "choose one of"),
        (lambda: QuantizationConfig(load_in_8bit=True, skip_modules="lm_head"), TypeError, "list"),
    ],
)
def test_bad_config_fields(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_no_bits_means_float(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"], quantization_config=QuantizationConfig()
    )
    assert isinstance(model.lm_head, nn.Linear)
