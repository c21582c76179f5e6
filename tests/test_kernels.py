"""chatlm's native CPU kernels against torch: int8 matrix-vector products, decode attention and RMSNorm, the
build cache, and the fallback to torch when no compiler is there."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from chatlm import kernels
from chatlm.kernels import native
from chatlm.models import model_class
from chatlm.models.config import ModelConfig
from chatlm.models.layers import RMSNorm
from chatlm.quantization import quantize_int8
from checkpoints import BASE, VARIANTS

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler to build the kernels"
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def built():
    assert native.library() is not None, native.status()


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k", [(64, 32), (1536, 576), (100, 48)])
def test_int8_linear_matches_dequantized_float64(m, n, k):
    w = torch.randn(n, k, generator=gen(0)) * 0.05
    q, scales = quantize_int8(w)
    x = torch.randn(m, k, generator=gen(1))
    expected = x.double() @ (q.double() * scales.double()[:, None]).T
    got = kernels.int8_linear(x, q, scales)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    bound = 4 * 2.0**-24 * k * (x.abs().double() @ (q.double().abs() * scales.double()[:, None]).T)
    assert ((got.double() - expected).abs() <= bound + 1e-30).all()


def test_int8_linear_declines_shapes_it_does_not_take():
    q, scales = quantize_int8(torch.randn(30, 64))  # 30 rows: not a multiple of 4
    assert kernels.int8_linear(torch.randn(1, 64), q, scales) is None
    q, scales = quantize_int8(torch.randn(32, 40))  # 40 inputs: not a multiple of 16
    assert kernels.int8_linear(torch.randn(1, 40), q, scales) is None


def cached(dtype, batch, kv_heads, capacity, length, d, seed):
    """Keys and values as generation holds them: views of the first `length` slots of a larger cache."""
    k = torch.randn(batch, kv_heads, capacity, d, generator=gen(seed)).to(dtype)
    v = torch.randn(batch, kv_heads, capacity, d, generator=gen(seed + 1)).to(dtype)
    return k[:, :, :length], v[:, :, :length]


@pytest.mark.parametrize("batch,heads,kv_heads,length", [(1, 9, 3, 500), (2, 4, 4, 1), (3, 8, 2, 37)])
def test_attention_of_one_token_matches_sdpa_float32(batch, heads, kv_heads, length):
    d = 64
    k, v = cached(torch.float32, batch, kv_heads, length + 20, length, d, seed=2)
    q = torch.randn(batch, heads, 1, d, generator=gen(4))
    for scale in (None, 0.3):
        expected = F.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), enable_gqa=True, scale=scale
        )
        got = kernels.attend_one(q, k, v, scale)
        assert got.shape == q.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


def test_attention_of_one_token_bfloat16_within_rounding():
    k, v = cached(torch.bfloat16, 1, 2, 300, 257, 128, seed=5)
    q = torch.randn(1, 8, 1, 128, generator=gen(6)).bfloat16()
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    got = kernels.attend_one(q, k, v, None)
    assert got.dtype == torch.bfloat16
    # the weights meet v in bfloat16 (as in torch's kernel), then one rounding of the output
    torch.testing.assert_close(got.double(), exact, atol=2 * 2.0**-8 * v.abs().max().item(), rtol=0)
    ours_err = (got.double() - exact).abs().mean()
    torch_err = (F.scaled_dot_product_attention(q, k, v, enable_gqa=True).double() - exact).abs().mean()
    assert ours_err <= 1.5 * torch_err


def test_attention_declines_what_it_does_not_do():
    k, v = cached(torch.float32, 1, 2, 10, 10, 16, seed=7)
    assert kernels.attend_one(torch.randn(1, 4, 2, 16), k, v, None) is None  # two queries
    assert kernels.attend_one(torch.randn(1, 3, 1, 16), k, v, None) is None  # 3 heads over 2 kv heads
    assert kernels.attend_one(torch.randn(1, 4, 1, 16).double(), k.double(), v.double(), None) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 64), (1, 1, 9, 128)])
def test_rms_norm_matches_torch_formula(dtype, shape):
    norm = RMSNorm(shape[-1], 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen(8)) * 0.5 + 1)
    x = (torch.randn(*shape, generator=gen(9)) * 3).to(dtype)
    h = x.float()
    expected = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
    with torch.no_grad():
        got = norm(x)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    else:  # the same roundings; the float32 sum of squares may differ in its last bit, moving a value a step
        assert (got.float() - expected.float()).abs().le(2.0**-7 * expected.float().abs()).all()
        assert (got == expected).float().mean() > 0.98


def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATLM_CACHE", str(tmp_path))
    compiler = native._compiler()
    first = native._build(compiler)
    assert first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native._build(compiler) == first and first.stat().st_mtime_ns == stamp  # no rebuild
    edited = tmp_path / "edited.c"
    edited.write_text(native.SOURCES[-1].read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCES", [*native.SOURCES[:-1], edited])
    assert native._build(compiler) != first


def test_without_a_compiler_the_model_runs_on_torch(monkeypatch, tiny_checkpoints):
    from chatlm import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=gen(10))
    fast = model.generate(ids, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    assert native.library() is None and "no C compiler" in native.status()
    slow = model.generate(ids, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    assert slow.sequences.tolist() == fast.sequences.tolist()
    for a, b in zip(slow.scores, fast.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "dtype,table_dtype,rotary",
    [
        (torch.float32, torch.float32, 64),
        (torch.bfloat16, torch.bfloat16, 64),
        (torch.bfloat16, torch.float32, 64),  # OLMo 2: float32 tables on bfloat16 activations
        (torch.float32, torch.float32, 32),  # partial rotary (Phi-3 style)
    ],
)
def test_decode_attention_matches_rope_cache_and_sdpa(dtype, table_dtype, rotary):
    from chatlm.models.layers import apply_rope, rope_cos_sin

    B, H, KV, D, capacity, offset = 2, 6, 2, 64, 40, 23
    # q, k and v as the projections hand them out: heads split from one fused (B, 1, N) output
    fused = torch.randn(B, 1, (H + 2 * KV) * D, generator=gen(11)).to(dtype)
    q, k, v = (
        part.view(B, 1, -1, D).transpose(1, 2) for part in fused.split([H * D, KV * D, KV * D], dim=-1)
    )
    positions = torch.tensor([[offset], [offset - 5]])  # rows at different positions (left padding)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
    cos, sin = rope_cos_sin(inv_freq, positions, table_dtype)
    k_cache = torch.randn(B, KV, capacity, D, generator=gen(12)).to(dtype)
    v_cache = torch.randn(B, KV, capacity, D, generator=gen(13)).to(dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()

    got = kernels.decode_attention(q, k, v, cos, sin, k_cache, v_cache, offset, None)

    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ref_k[:, :, offset : offset + 1], ref_v[:, :, offset : offset + 1] = rk, v
    assert torch.equal(k_cache, ref_k) and torch.equal(
        v_cache, ref_v
    )  # the rotated k exactly as torch rounds it
    expected = F.scaled_dot_product_attention(
        rq.double(), ref_k[:, :, : offset + 1].double(), ref_v[:, :, : offset + 1].double(), enable_gqa=True
    )
    expected = expected.transpose(1, 2).reshape(B, 1, H * D)
    assert got.shape == (B, 1, H * D) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)
    else:  # weights rounded to bfloat16 before they meet v (as torch does), and the output rounded
        torch.testing.assert_close(got.double(), expected, atol=3 * 2.0**-8, rtol=2.0**-7)


def test_decode_attention_declines_what_it_does_not_do():
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    cos, sin = torch.ones(1, 1, 16), torch.zeros(1, 1, 16)
    cache = torch.zeros(1, 2, 8, 16)
    assert kernels.decode_attention(q, k, v, cos, sin, cache, cache.clone(), 8, None) is None  # cache full
    assert (
        kernels.decode_attention(q, k, v, cos.double(), sin.double(), cache, cache.clone(), 0, None) is None
    )
    two = torch.randn(1, 4, 2, 16)
    assert kernels.decode_attention(two, k, v, cos, sin, cache, cache.clone(), 0, None) is None


@pytest.mark.parametrize(
    "group,scale_dtype", [(32, torch.bfloat16), (128, torch.float32), (64, torch.bfloat16)]
)
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_int4_linear_reads_torch_layout_exactly(group, scale_dtype, m):
    from chatlm.quantization import layout_known, pack_int4, quantize_int4

    n, k = 192, 512
    if not layout_known(n):
        pytest.skip("torch packs int4 differently on this CPU: chatlm's kernel is not used")
    q, scales, zeros = quantize_int4(torch.randn(n, k, generator=gen(14)) * 0.05, group)
    packed, sz = pack_int4(q, scales, zeros, scale_dtype)
    x = torch.randn(m, k, generator=gen(15))
    got = kernels.int4_linear(x, packed, sz, group)
    if got is None:
        pytest.skip("no AVX-512 here: torch's int4 kernel does the work")
    s, z = sz[..., 0].T.double(), sz[..., 1].T.double()  # (n, groups): the values the kernel computes with
    w = ((q.double().view(n, -1, group) - 8) * s[..., None] + z[..., None]).view(n, k)
    expected = x.double() @ w.T
    bound = 8 * 2.0**-24 * k * (x.abs().double() @ w.abs().T)  # float32 sums, x as it is (not bfloat16)
    assert ((got.double() - expected).abs() <= bound).all()
    # rows go two at a time over each weight block: in a batch (a server's), every row gets the bits it gets alone
    alone = torch.cat([kernels.int4_linear(x[t : t + 1], packed, sz, group) for t in range(m)])
    assert torch.equal(got, alone)
    assert (
        kernels.int4_linear(x.bfloat16(), packed, sz, group) is None
    )  # bfloat16 activations: torch's kernel


FUSED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "olmo2")


@pytest.mark.parametrize(
    "variant,bits",
    [("llama", 4), ("llama", 8), ("qwen2", 4), ("qwen2", 8)]
    + [(v, 8) for v in ("mistral", "qwen3", "gemma", "gemma3_text", "olmo2")],
)
def test_fused_decode_layer_matches_the_modules(tmp_path, monkeypatch, variant, bits):
    """A decoding step through one native call per layer gives the module path's scores and tokens: Llama's layer
    and the families that declare their differences (q/k norms per head or over all heads, norms after attention
    and the MLP, Gemma's 1 + w norms and GELU, sliding windows, Gemma 3's two ropes)."""
    from chatlm import AutoModelForCausalLM, QuantizationConfig
    from chatlm.kernels import fused_layer
    from checkpoints import write_checkpoint

    # head_dim 64 and widths that are multiples of 64: what the native int4 kernel takes
    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    if bits == 8:
        shape["head_dim"] = 32
    path = write_checkpoint(tmp_path / variant, variant, **shape)
    config = QuantizationConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    plans = [fused_layer.plan(layer) for layer in model.model.layers]
    if not all(plans):
        assert bits == 4, "int8 layers always fuse where the kernels are built"
        pytest.skip("this CPU has no native int4 kernel (AVX-512): the modules run every layer")
    windowed = any(w is not None for w in model.config.attention_windows.values())
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=gen(16))
    options = dict(max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    if not windowed:  # rows of different lengths: each attends from its own first slot (row starts)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        options["attention_mask"] = mask
    runs = []
    run = fused_layer.LayerPlan.run
    monkeypatch.setattr(
        fused_layer.LayerPlan, "run", lambda self, *a: runs.append(a[-1] is not None) or run(self, *a)
    )
    fused = model.generate(ids, **options)
    assert all(model.__dict__["_plans"])  # every layer ran natively, padded rows too (or past the window)
    assert len(runs) == 7 * len(plans) and (windowed or any(runs))

    monkeypatch.setattr(fused_layer, "plan", lambda layer: None)
    model.__dict__.pop("_plans")
    modules = model.generate(ids, **options)
    assert not any(model.__dict__["_plans"])
    assert fused.sequences.tolist() == modules.sequences.tolist()
    for a, b in zip(fused.scores, modules.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layers_declare_fusable_parts_where_the_fused_kernel_is_their_math(variant):
    """The fused decode layer computes a pre-norm (or post-norm) attention and gated-MLP layer: the families whose
    layers are that declare their parts; the others (fused projections, scaled residuals, experts, attention
    softcapping) declare that they are not that math."""
    model_type, options = VARIANTS[variant]
    config = ModelConfig.from_dict({**BASE, "vocab_size": 64, "model_type": model_type, **options})
    with torch.device("meta"):
        model = model_class(config)(config)
    declared = [getattr(layer, "fusable_parts", lambda: None)() is not None for layer in model.model.layers]
    assert declared == [model_type in FUSED_FAMILIES] * len(declared)
