"""Blocks shared by the architectures: norms, rotary embeddings, attention masks, gated MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as transformers does (matters in bf16).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, after any rope scaling (float32, shape (head_dim/2,))."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_frequencies(inv_freq, scaling)
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


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin tables for positions (B, T): each (B, T, head_dim), computed in float32."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by the (B, T, head_dim) tables, in the half-split layout of HF checkpoints."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with grouped K/V heads: q (B, heads, T, D), k and v (B, kv_heads, S, D).
    No mask means plain causal attention: over a fresh prompt, or one new token seeing every cached key."""
    causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
    )


def attention_masks(
    padding_mask: torch.Tensor | None,
    query_length: int,
    offset: int,
    sliding_window: int | None,
    layer_types: frozenset[str],
) -> dict[str, torch.Tensor | None]:
    """Boolean masks (B or 1, 1, T, K) per attention type; None where plain causal attention over all keys will do.

    The T queries sit at cache slots offset..offset+T-1, the K = offset+T keys at slots 0..K-1. ``padding_mask``
    (B, K) marks real tokens (left padding is False).
    """
    kv_length = offset + query_length
    masks: dict[str, torch.Tensor | None] = {}
    device = padding_mask.device if padding_mask is not None else None
    q = torch.arange(offset, kv_length, device=device)[:, None]
    k = torch.arange(kv_length, device=device)[None, :]
    for kind in layer_types:
        windowed = kind == "sliding_attention" and sliding_window is not None and kv_length > sliding_window
        if padding_mask is None and not windowed and (query_length == 1 or offset == 0):
            masks[kind] = (
                None  # plain causal: SDPA's is_causal on a fresh prompt, or one token seeing every key
            )
            continue
        allowed = k <= q
        if windowed:
            allowed = allowed & (q - k < sliding_window)
        mask = allowed[None, None]
        if padding_mask is not None:
            mask = mask & padding_mask[:, None, None, :].bool()
            # A padding query sees no key at all; let it see itself so that softmax stays finite.
            mask = mask | (q == k)[None, None]
        masks[kind] = mask
    return masks
