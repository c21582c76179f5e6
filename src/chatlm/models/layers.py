"""Blocks shared by the architectures: norms, rotary embeddings, attention masks, gated MLP."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .config import ModelConfig

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = kernels.rms_norm(x, self.weight, self.eps)  # one call instead of seven small ops
        if fused is not None:
            return fused
        # Normalise in float32 and cast back before the weight, as transformers does (matters in bf16).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def kernel_weight(self) -> torch.Tensor:
        """What the normalised values are multiplied by (a fused kernel's operand)."""
        return self.weight


@dataclass(frozen=True)
class FusableParts:
    """A decoder layer as the fused decode kernel runs it, declared by its ``fusable_parts()``:
    ``x += post_attention(o(attention(rope(q_norm(q), k_norm(k), v of input(x)))))``, then
    ``x += post_mlp(down(activation(gate(h)) * up(h)))`` with ``h = pre_mlp(x)``. Each norm is an RMSNorm module
    with ``kernel_weight()`` (the float32 weight it multiplies by), ``eps``, or None where the layer has none.
    The kernel checks the rest (dtypes, devices, the projections' formats) itself."""

    input_norm: nn.Module | None
    post_attention_norm: nn.Module | None
    pre_mlp_norm: nn.Module | None
    post_mlp_norm: nn.Module | None
    q_norm: nn.Module | None  # over each head (its weight has head_dim values) or over all heads
    k_norm: nn.Module | None
    projections: tuple[nn.Module, ...]  # q, k, v, o, gate, up, down
    activation: str  # the MLP's, by its name in ACTIVATIONS
    heads: int
    kv_heads: int
    head_dim: int
    scale: float | None  # None: 1/sqrt(head_dim)
    window: int | None  # the latest positions each query sees (None: all)

    @classmethod
    def of(cls, attention: nn.Module, mlp: GatedMLP, **norms: nn.Module | None) -> FusableParts:
        """The parts of a layer with Llama's attention (``models.llama.Attention``) and a gated MLP; ``norms``
        names the norms it has (the fields ending in ``_norm``; the others are None)."""
        unknown = set(norms) - NORM_FIELDS
        if unknown:
            raise TypeError(f"not a norm of FusableParts: {', '.join(sorted(unknown))}")
        a, m = attention, mlp
        return cls(
            **{name: norms.get(name) for name in sorted(NORM_FIELDS)},
            projections=(a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj),
            activation=m.act_name,
            heads=a.num_heads,
            kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            scale=a.scale,
            window=a.window,
        )


NORM_FIELDS = {"input_norm", "post_attention_norm", "pre_mlp_norm", "post_mlp_norm", "q_norm", "k_norm"}


class GatedMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation {config.hidden_act!r} is not supported")
        self.act = ACTIVATIONS[config.hidden_act]
        self.act_name = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rope_inverse_frequencies(config: ModelConfig, long: bool = False) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, after any rope scaling (float32, shape (rotary_dim/2,)).
    ``long`` picks longrope's long factors (see `longrope_context`)."""
    dim = int(config.head_dim * config.partial_rotary_factor)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("longrope", "su"):  # "su": Phi-3's first name for longrope
        # Each frequency is divided by its own factor; 1 / (factor * base**e) rounds as transformers does.
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * config.rope_theta**exponents)
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_frequencies(inv_freq, scaling)
    elif kind == "freq_factors":  # llama3's scaling as a GGUF file stores it: the divisor of each frequency
        inv_freq = inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def longrope_context(config: ModelConfig) -> int | None:
    """The pre-training context of a longrope model (None for other rope types). As in transformers, a forward
    call whose positions reach past it rotates with the long factors, any other with the short ones."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
        return None
    # A top-level original_max_position_embeddings (Phi-3's config.json) wins over the one in rope_scaling.
    original = config.extra.get("original_max_position_embeddings")
    return original or scaling.get("original_max_position_embeddings") or config.max_position_embeddings


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor on the cos and sin tables: longrope's attention factor (from the context extension when the
    config gives none), 1 for the other rope types."""
    original = longrope_context(config)
    if original is None:
        return 1.0
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    factor = scaling.get("factor") or config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos and sin tables for positions (B, T): each (B, T, rotary_dim), computed in float32 (and scaled by
    ``scale`` there, before the cast)."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by the (B, T, rotary_dim) tables, in the half-split layout of HF
    checkpoints. A partial rotary embedding (rotary_dim < head_dim) rotates the first rotary_dim channels only.
    Float32 tables on a bf16 x rotate in float32 (OLMo 2 does); the result has x's dtype."""
    if cos.shape[-1] != x.shape[-1]:
        rotary = cos.shape[-1]
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped K/V heads: q (B, heads, T, D), k and v (B, kv_heads, S, D).
    No mask means plain causal attention: over a fresh prompt, or one new token seeing every cached key.
    ``scale`` multiplies q.k before the softmax (None: 1/sqrt(D)); ``softcap`` maps the scaled scores s to
    softcap * tanh(s / softcap) first (Gemma 2)."""
    if softcap is not None:
        return _softcapped_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale, softcap)
    if mask is None and q.shape[2] == 1:  # decoding: one token over the whole cache
        out = kernels.attend_one(q, k, v, scale)
        if out is not None:
            return out
    causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1], scale=scale
    )


def _softcapped_attention(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    # SDPA cannot transform the scores, so they are computed explicitly, in the order transformers' eager path
    # uses (scale, cap, mask, softmax in float32, back to the input dtype before multiplying with v).
    B, H, T, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    # Grouped heads without copying k and v: each kv head's group of query heads becomes one larger batch entry.
    q = q.reshape(B, kv_heads, H // kv_heads * T, D)
    scores = torch.matmul(q, k.transpose(-1, -2)).view(B, kv_heads, H // kv_heads, T, S) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and T > 1:  # a fresh prompt: plain causal
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        # (B or 1, 1, T, S) -> (B or 1, 1, 1, T, S), against scores of (B, kv_heads, group, T, S)
        mask = mask if mask.dim() == 2 else mask.unsqueeze(2)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(B, kv_heads, H // kv_heads * T, S), v)
    return out.view(B, H, T, D)


class AttentionMasks(dict):
    """Masks by attention type; ``plain_causal`` when every one is plain causal attention (no padding and no
    sliding window cut in), whether or not it had to be written out as a tensor. ``row_starts`` (B,) when one
    new token per row attends, in every attention type, to one run of slots from row_starts[b] to itself (rows of
    different lengths, as a server's batch holds them): native kernels take that instead of the mask.
    ``unpadded``: no padding, so the masks are causal within each type's window (a native kernel that applies
    the windows itself takes that too)."""

    plain_causal = False
    unpadded = False
    row_starts: torch.Tensor | None = None


def _row_starts(padding: torch.Tensor) -> torch.Tensor | None:
    """Per row, the first slot of its keys, if each row's real slots are one run up to the new token's; a row
    whose new token is padding sees only itself (as the mask makes it). None if a row has holes."""
    length = padding.shape[1]
    last = padding[:, -1]
    first = padding.to(torch.uint8).argmax(-1)
    one_run = padding.sum(-1) == length - first
    if not bool((one_run | ~last).all()):
        return None
    return torch.where(last, first, length - 1).to(torch.int64).contiguous()


def attention_masks(
    padding_mask: torch.Tensor | None,
    query_length: int,
    offset: int,
    windows: dict[str, int | None],
) -> AttentionMasks:
    """Boolean masks (B or 1, 1, T, K) per attention type; None where plain causal attention over all keys will do.
    ``windows`` (`ModelConfig.attention_windows`): per attention type, the latest keys a query sees (None: all).

    The T queries sit at cache slots offset..offset+T-1, the K = offset+T keys at slots 0..K-1. ``padding_mask``
    (B, K) marks real tokens (False for left padding, or any slot a row does not use).
    """
    kv_length = offset + query_length
    masks = AttentionMasks()
    masks.plain_causal = padding_mask is None
    masks.unpadded = padding_mask is None  # plain causal but for sliding windows
    device = padding_mask.device if padding_mask is not None else None
    q = torch.arange(offset, kv_length, device=device)[:, None]
    k = torch.arange(kv_length, device=device)[None, :]
    any_window = False
    for kind, window in windows.items():
        windowed = window is not None and kv_length > window
        any_window = any_window or windowed
        masks.plain_causal = masks.plain_causal and not windowed
        if padding_mask is None and not windowed and (query_length == 1 or offset == 0):
            masks[kind] = (
                None  # plain causal: SDPA's is_causal on a fresh prompt, or one token seeing every key
            )
            continue
        allowed = (k <= q)[None, None]
        if windowed and padding_mask is None:
            allowed = allowed & (q - k < window)
        elif windowed:
            # The window counts the row's tokens, not slots: a row's cache may hold masked slots between them
            # (left padding, or guesses speculative decoding rejected in that row only).
            position = padding_mask.long().cumsum(-1)
            between = position[:, offset:kv_length, None] - position[:, None, :]
            allowed = allowed & (between < window)[:, None]
        mask = allowed
        if padding_mask is not None:
            mask = mask & padding_mask[:, None, None, :].bool()
            # A padding query sees no key at all; let it see itself so that softmax stays finite.
            mask = mask | (q == k)[None, None]
        masks[kind] = mask
    if padding_mask is not None and query_length == 1 and not any_window:
        masks.row_starts = _row_starts(padding_mask.bool())
    return masks
