"""GGUF weights kept as stored (`chatlm.gguf_layers`, `kernels/gguf_kernels.c`): the block kernels against the
reference dequantizers, on both instruction sets, and whole models against the same file dequantized to float32."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from chatlm import kernels
from chatlm.auto import AutoModelForCausalLM
from chatlm.gguf_layers import KEPT_TYPES, GGUFEmbedding, GGUFExperts, GGUFExpertStack, GGUFLinear
from chatlm.kernels import native
from chatlm.loading import gguf_dequant
from chatlm.models.moe import Experts
from chatlm.quantization import QuantizationConfig
from checkpoints import write_checkpoint
from gguf_export import export_gguf

# byte offsets of each type's f16 fields: random bytes there could be inf or NaN
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "IQ4_NL": [0]}
F16_FIELDS |= {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}
K_TYPES = ("Q4_K", "Q5_K", "Q6_K", "IQ4_XS")  # 256-value blocks; activations rounded per 256 values


def random_blocks(type_name: str, rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """(rows, bytes per row) of valid random blocks: random bits, finite f16 scales in [0.001, 0.05]."""
    g = torch.Generator().manual_seed(seed)
    per, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    raw = torch.randint(0, 256, (rows, k // per, size), dtype=torch.uint8, generator=g)
    for at in F16_FIELDS[type_name]:
        d = (torch.rand(rows, k // per, generator=g) * 0.049 + 0.001).half()
        raw[:, :, at : at + 2] = d.view(torch.uint8).view(rows, k // per, 2)
    return raw.view(rows, -1).contiguous()


def int8_activations(x: torch.Tensor, group: int, levels: int = 127) -> torch.Tensor:
    """x rounded as the kernel rounds it: int8 in groups (scale max|x| / 127; int16: ``levels`` 32767), back to
    float."""
    xg = x.view(x.shape[0], -1, group)
    top = xg.abs().amax(-1, keepdim=True)
    inv = (
        torch.full_like(top, levels) / top
    )  # a true division (torch computes ``127 / top`` as 127 * (1 / top))
    q = torch.round(xg * torch.where(top > 0, inv, torch.zeros_like(top)))
    return (q * (top / levels)).view_as(x)


def _has_avx2() -> bool:
    try:
        return " avx2 " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


@pytest.fixture(params=["native", "x86-64-v3"])
def isa(request, tmp_path, monkeypatch):
    """The kernels as built for this CPU, and built for AVX2 only (what most laptops run)."""
    if request.param != "native":
        if not _has_avx2():
            pytest.skip("this CPU has no AVX2")
        monkeypatch.setenv("CHATLM_CACHE", str(tmp_path))
        monkeypatch.setattr(
            native, "FLAGS", [f if not f.startswith("-march") else "-march=x86-64-v3" for f in native.FLAGS]
        )
        monkeypatch.setattr(native, "_state", {})
    if not kernels.gguf_supported(KEPT_TYPES["Q8_0"]):
        pytest.skip("no native GGUF kernels here (no compiler, or no AVX2)")
    return request.param


@pytest.mark.parametrize("type_name", sorted(KEPT_TYPES))
def test_dequantize_is_bit_for_bit_the_reference(isa, type_name):
    n, k = 48, 512
    raw = random_blocks(type_name, n, k)
    ggml_type = GGMLQuantizationType[type_name]
    ours = kernels.gguf_dequantize(raw, ggml_type.value, k)
    theirs = gguf.quants.dequantize(raw.numpy(), ggml_type).reshape(n, k)
    assert np.array_equal(ours.numpy(), theirs)
    assert torch.equal(ours, gguf_dequant.dequantize(raw, ggml_type, (n, k)))
    # for a bfloat16 matmul (prompts): the same values rounded to nearest even, as torch rounds them
    assert torch.equal(kernels.gguf_dequantize(raw, ggml_type.value, k, torch.bfloat16), ours.bfloat16())


@pytest.mark.parametrize("type_name", sorted(KEPT_TYPES))
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k", [768, 800])
def test_block_matmul_is_the_dequantized_weights_times_int8_activations(isa, type_name, m, k):
    """k = 800: an odd number of 32-value blocks (the AVX-512 path takes two at a time)."""
    if k % GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]:
        pytest.skip("256-value blocks")
    n = 40
    raw = random_blocks(type_name, n, k, seed=m)
    ggml_type = GGMLQuantizationType[type_name]
    w = gguf_dequant.dequantize(raw, ggml_type, (n, k)).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7))
    x[0, :32] *= 20  # an outlier group: each group keeps its own scale
    y = kernels.gguf_linear(x, raw, ggml_type.value, k)
    expected = int8_activations(x, 256 if type_name in K_TYPES else 32).double() @ w.T
    scale = expected.abs().max()
    assert ((y.double() - expected).abs().max() / scale).item() < 2e-6
    # and the rounding of the activations costs what int8 costs, no more
    assert ((y.double() - x.double() @ w.T).abs().max() / scale).item() < 0.05


@pytest.mark.parametrize("type_name", sorted(KEPT_TYPES))
@pytest.mark.parametrize("precise", [False, True])
def test_each_row_is_computed_alone(isa, type_name, precise):
    """Rows computed together (prefill: four tokens per decoded block) give bit for bit what each gives alone, so a
    prompt computed whole or in pieces gets the same numbers."""
    n, k = 20, 512
    raw = random_blocks(type_name, n, k, seed=9)
    ggml_type = GGMLQuantizationType[type_name].value
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(4))
    together = kernels.gguf_linear(x, raw, ggml_type, k, precise)
    alone = torch.cat([kernels.gguf_linear(x[i : i + 1], raw, ggml_type, k, precise) for i in range(7)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("type_name", sorted(KEPT_TYPES))
def test_precise_block_matmul_rounds_activations_to_int16(isa, type_name):
    """The head's variant: int16 activations per 32 values, float32's precision for all practical purposes."""
    n, k = 24, 512
    raw = random_blocks(type_name, n, k, seed=5)
    ggml_type = GGMLQuantizationType[type_name]
    w = gguf_dequant.dequantize(raw, ggml_type, (n, k)).double()
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(8))
    y = kernels.gguf_linear(x, raw, ggml_type.value, k, precise=True)
    expected = int8_activations(x, 32, levels=32767).double() @ w.T
    scale = expected.abs().max()
    assert ((y.double() - expected).abs().max() / scale).item() < 2e-6
    assert ((y.double() - x.double() @ w.T).abs().max() / scale).item() < 1e-4


def test_k_quant_encoders_of_the_tests_round_trip():
    """The tests' own Q4_K / Q6_K writers (the gguf package has none) against its dequantizer."""
    from gguf_export import encode_q4_k, encode_q6_k

    w = np.random.default_rng(0).normal(size=(6, 512)).astype(np.float32)
    for encode, name, levels in ((encode_q4_k, "Q4_K", 15), (encode_q6_k, "Q6_K", 63)):
        back = gguf.quants.dequantize(encode(w), GGMLQuantizationType[name]).reshape(w.shape)
        assert np.abs(back - w).max() < 2.5 * np.abs(w).max() / levels


def test_unsupported_types_and_shapes_decline():
    raw = random_blocks("Q4_K", 4, 256)
    assert kernels.gguf_linear(torch.randn(1, 256), raw, GGMLQuantizationType.Q2_K.value, 256) is None
    assert not kernels.gguf_supported(GGMLQuantizationType.Q2_K.value)


# --- whole models ---------------------------------------------------------------------------------------------

# name -> (checkpoint variant, overrides)
ARCHITECTURES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),  # the head reads the embedding's blocks
    "mistral": ("mistral", dict(sliding_window=8, head_dim=64)),
    "qwen2": ("qwen2", dict(use_sliding_window=False)),
    "qwen3": ("qwen3", dict(use_sliding_window=False, head_dim=64)),
    "gemma": ("gemma", dict(head_dim=64)),
    "gemma2": ("gemma2", dict(head_dim=64)),
    "gemma3": ("gemma3_text", dict(head_dim=64)),
    # head_dim 16, which its rope factors are made for
    "phi3": ("phi3_longrope", dict(num_attention_heads=16, num_key_value_heads=4)),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    # experts whose stacks the 256-value blocks take, and a shared expert (every layer sparse, as llama.cpp's)
    "qwen2_moe": (
        "qwen2_moe",
        dict(moe_intermediate_size=256, shared_expert_intermediate_size=256, mlp_only_layers=[]),
    ),
}
SHAPES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def mixed_gguf(request, tmp_path_factory) -> Path:
    """A tiny model written as a Q4_K_M-like mix: Q4_K, Q6_K (v and down projections), Q8_0 (embeddings), in
    widths the 256-value blocks take."""
    variant, overrides = ARCHITECTURES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    ckpt = write_checkpoint(root / "hf", variant, std=0.1, **{**SHAPES, **overrides})
    model_type = json.loads((ckpt / "config.json").read_text())["model_type"]
    return export_gguf(ckpt, root / "model.gguf", model_type, tensor_type="Q4_K_M", tokenizer_dir=ckpt)


def _keep(compute_dtype=None) -> QuantizationConfig:
    return QuantizationConfig(keep_gguf_blocks=True, compute_dtype=compute_dtype)


def prompt(length: int = 20) -> torch.Tensor:
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(3))


def test_float32_compute_is_the_dequantized_model(mixed_gguf):
    dequantized = AutoModelForCausalLM.from_pretrained(mixed_gguf)
    kept = AutoModelForCausalLM.from_pretrained(mixed_gguf, quantization_config=_keep(torch.float32))
    types = {m.type_name for m in kept.modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))}
    assert types == {"Q4_K", "Q6_K", "Q8_0"}
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(kept(ids).logits, dequantized(ids).logits, atol=1e-4, rtol=1e-4)
    a = dequantized.generate(ids, max_new_tokens=8, do_sample=False)
    b = kept.generate(ids, max_new_tokens=8, do_sample=False)
    assert a.tolist() == b.tolist()


def test_default_compute_is_the_dequantized_weights_with_int8_activations(mixed_gguf):
    """The default: decoding through the block kernel, which rounds each linear layer's input to int8 as
    llama.cpp does (the head's largest logits again with int16); a prompt through dequantized tiles, in bfloat16
    where the CPU has it natively (weights and input rounded to bfloat16, products summed in float32, the sums
    rounded to bfloat16), else float32. Every call of every kept layer during generation (the fused decode
    layer's calls aside, which run the same kernel) against the file's dequantized weight times its input so
    rounded, in float64."""
    kept = AutoModelForCausalLM.from_pretrained(mixed_gguf, quantization_config=_keep())
    kept.decode_fusion = None  # the modules, one by one (test_fused_decode_layer_reads_blocks_too: the rest)
    calls = []
    bf16 = kernels.fast_bfloat16_matmul()

    def check(module, args, out):
        x = args[0].reshape(-1, module.in_features)
        w = module.dequantize().double()
        if (
            x.shape[0] > 16 and bf16
        ):  # a prompt: bfloat16 tiles; the sums' rounding allows 2^-9 of the largest
            expected = x.bfloat16().double() @ w.bfloat16().double().T
            tolerance = 2**-8
        elif x.shape[0] > 16:  # float32 tiles
            expected, tolerance = x.double() @ w.T, 1e-5
        else:
            expected = int8_activations(x, 256 if module.type_name in K_TYPES else 32).double() @ w.T
            tolerance = 1e-5
        if module.refine_top and x.shape[0] <= 16:  # the head: its largest logits with int16 activations
            top = expected.topk(module.refine_top, dim=-1).indices
            refined = int8_activations(x, 32, levels=32767).double() @ w.T
            expected.scatter_(1, top, refined.gather(1, top))
        if module.bias is not None:
            expected += module.bias.double()
        error = (out.reshape(expected.shape).double() - expected).abs().max() / expected.abs().max()
        calls.append((x.shape[0], error.item() / tolerance))

    for m in kept.modules():
        if isinstance(m, GGUFLinear):
            m.register_forward_hook(check)
    for length in (12, 40):  # a prompt through the kernel, and one through tiles
        kept.generate(prompt(length), max_new_tokens=4, do_sample=False)
    assert {rows for rows, _ in calls} >= {1, 12, 40}
    assert max(error for _, error in calls) < 1  # errors in units of each call's tolerance
    assert kept.lm_head.refine_top
    assert not any(m.refine_top for m in kept.model.modules() if isinstance(m, GGUFLinear))


def test_fused_decode_layer_reads_blocks_too(mixed_gguf, monkeypatch):
    """The fused decode layer (one native call per layer) takes GGUF blocks as stored, and decodes what the
    modules decode. The two round their float32 sums apart, which can move an activation across an int8
    rounding boundary: the scores agree to such a step (a wrong weight would be off by the whole)."""
    from chatlm.kernels import fused_layer

    kept = AutoModelForCausalLM.from_pretrained(mixed_gguf, quantization_config=_keep())
    if kept.model.layers[0].fusable_parts() is None:
        pytest.skip("this family's layers are not the fused kernel's math")
    assert all(fused_layer.plan(layer) for layer in kept.model.layers)
    options = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    fused = kept.generate(prompt(20), **options)
    assert all(kept.__dict__["_plans"])
    kept.decode_fusion = None
    modules = kept.generate(prompt(20), **options)
    assert fused.sequences.tolist() == modules.sequences.tolist()
    for a, b in zip(fused.scores, modules.scores):
        assert (a - b).abs().max() < 0.02 * b.abs().max()


def test_experts_read_their_own_blocks_as_stored(mixed_gguf):
    """An MoE layer's expert stacks stay as stored, in place; each chosen expert computes with its own blocks:
    in float32, the dequantized model's logits; by default, every expert's call is its dequantized rows times
    the int8-rounded input (decoding) or the tiles' product (a prompt)."""
    kept = AutoModelForCausalLM.from_pretrained(mixed_gguf, quantization_config=_keep())
    stacks = [m for m in kept.modules() if isinstance(m, GGUFExpertStack)]
    if not stacks:
        assert not any(isinstance(m, Experts) for m in kept.modules())
        pytest.skip("no experts in this family")
    assert all(isinstance(m, GGUFExperts) for m in kept.modules() if isinstance(m, Experts))
    assert all(_mapped_file(m.qweight.data_ptr()) == str(mixed_gguf.resolve()) for m in stacks)
    assert not any(p.dim() == 3 for p in kept.parameters())  # no float copy of a stack

    exact = AutoModelForCausalLM.from_pretrained(mixed_gguf, quantization_config=_keep(torch.float32))
    dequantized = AutoModelForCausalLM.from_pretrained(mixed_gguf)
    with torch.no_grad():
        torch.testing.assert_close(exact(prompt()).logits, dequantized(prompt()).logits, atol=1e-4, rtol=1e-4)

    bf16 = kernels.fast_bfloat16_matmul()
    calls = []

    def check(module, args, out):
        e, x, prompt = args
        n = module.weight_shape[1]
        w = module.dequantize()[e].double()
        assert prompt == (tokens[-1] > 16)  # a prompt by the call's tokens, not the expert's share of them
        if prompt:
            expected = (x.bfloat16().double() @ w.bfloat16().double().T) if bf16 else x.double() @ w.T
            tolerance = 2**-8 if bf16 else 1e-5
        else:
            group = 256 if module.type_name in K_TYPES else 32
            expected, tolerance = int8_activations(x, group).double() @ w.T, 1e-5
        assert out.shape == (x.shape[0], n)
        calls.append(((out.double() - expected).abs().max() / expected.abs().max()).item() / tolerance)

    tokens = []
    for m in kept.modules():
        if isinstance(m, GGUFExperts):
            m.register_forward_pre_hook(lambda module, args: tokens.append(args[0].shape[0]))
    for m in stacks:
        m.register_forward_hook(check)
    kept.generate(prompt(40), max_new_tokens=4, do_sample=False)
    assert set(tokens) == {40, 1}
    assert calls and max(calls) < 1


def _mapped_file(address: int) -> str | None:
    """The file mapped at ``address`` in this process (Linux's /proc/self/maps), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5].strip() if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_blocks_are_used_in_place(mixed_gguf):
    """The kept weights are the file's pages (its memory map): loading copies nothing but Llama's permuted q/k."""
    kept = AutoModelForCausalLM.from_pretrained(mixed_gguf, quantization_config=_keep())
    where = {
        name: _mapped_file(m.qweight.data_ptr())
        for name, m in kept.named_modules()
        if isinstance(m, (GGUFLinear, GGUFEmbedding))
    }
    assert where
    for name, path in where.items():
        permuted = name.endswith(("q_proj", "k_proj")) and kept.config.model_type in ("llama", "granite")
        assert (path == str(mixed_gguf.resolve())) != permuted, name


def test_keeping_blocks_needs_a_gguf_file_and_a_compute_dtype_it_has(tiny_checkpoints):
    with pytest.raises(ValueError, match="is not a GGUF file"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_keep())
    with pytest.raises(ValueError, match="int8 activations"):
        _keep(torch.bfloat16)


def test_a_prompt_in_pieces_gives_the_whole_prompts_scores(mixed_gguf):
    """A prompt in one call, or a cached prefix and the rest (both more rows than decoding: float32 tiles): the
    same logits."""
    from chatlm import DynamicCache

    kept = AutoModelForCausalLM.from_pretrained(mixed_gguf, quantization_config=_keep())
    kept.decode_fusion = None  # the fused layer sums in another order: compare the modules with themselves
    ids = prompt(40)
    with torch.no_grad():
        whole = kept(ids).logits[0, -1]
        cache = DynamicCache()
        kept(ids[:, :20], past_key_values=cache, use_cache=True)
        pieces = kept(ids[:, 20:], past_key_values=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)


def test_a_model_that_does_not_fit_is_refused_before_loading(mixed_gguf, monkeypatch):
    """The memory plan (only the free-memory reading is replaced): float32 does not fit, the file's own blocks
    do, and the error says so before any weight is read."""
    from chatlm.loading import gguf_model, memory_plan

    stored = memory_plan.plan_memory  # the real plans, to pick a free amount between the two
    sizes = {}

    def remember(model, dtype, stored_bytes):
        plan = stored(model, dtype, stored_bytes)
        sizes["kept" if stored_bytes else "float32"] = plan.total
        return plan

    monkeypatch.setattr(memory_plan, "plan_memory", remember)
    AutoModelForCausalLM.from_pretrained(mixed_gguf, quantization_config=_keep())
    AutoModelForCausalLM.from_pretrained(mixed_gguf)
    assert sizes["kept"] < sizes["float32"] / 3
    free = (sizes["kept"] + sizes["float32"]) // 2
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device: free)

    def no_reading(*args, **kwargs):
        raise AssertionError("weights read before the memory check")

    monkeypatch.setattr(gguf_model, "read_gguf_tensors", no_reading)
    with pytest.raises(memory_plan.NotEnoughMemoryError) as refused:
        AutoModelForCausalLM.from_pretrained(mixed_gguf)
    message = str(refused.value)
    assert "float32" in message and "available" in message and "keep_gguf_blocks=True" in message
    assert f"{free / 1e9:.1f} GB is available" in message
    monkeypatch.setenv("CHATLM_MEMORY_CHECK", "0")
    with pytest.raises(AssertionError, match="before the memory check"):  # the check skipped: loading starts
        AutoModelForCausalLM.from_pretrained(mixed_gguf)
