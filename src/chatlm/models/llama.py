"""The Llama family: llama (GQA, llama3 rope scaling, tied embeddings), mistral (sliding window), qwen2 (qkv bias)."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .base import CausalLM
from .cache import KVCache
from .config import ModelConfig
from .layers import FusableParts, GatedMLP, RMSNorm, apply_rope, attention


class Attention(nn.Module):
    """Grouped-query attention with rope. Families change it by overriding ``make_projections`` (fused weights)
    and ``project`` (norms on q and k), or by setting ``scale``."""

    def __init__(self, config: ModelConfig, layer_index: int, qkv_bias: bool):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_type = config.layer_types[layer_index]
        self.window = config.attention_windows[
            self.attention_type
        ]  # the latest positions it sees (None: all)
        self.scale: float | None = None  # the softmax scale; None is 1/sqrt(head_dim)
        self.q_dim, self.kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.make_projections(config.hidden_size, qkv_bias)
        self.o_proj = nn.Linear(self.q_dim, config.hidden_size, bias=config.attention_bias)

    def make_projections(self, hidden: int, bias: bool) -> None:
        self.q_proj = nn.Linear(hidden, self.q_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_dim, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, heads * head_dim) -> (B, heads, T, head_dim)"""
        return x.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v of x (B, T, hidden), split into heads, before rope."""
        return (
            self.split_heads(self.q_proj(x)),
            self.split_heads(self.k_proj(x)),
            self.split_heads(self.v_proj(x)),
        )

    def forward(self, x, cos, sin, masks, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        starts = getattr(masks, "row_starts", None)
        if T == 1 and cache is not None and (masks[self.attention_type] is None or starts is not None):
            i = (
                self.layer_index
            )  # decoding: one native call (rows of different lengths start at their own slot)
            out = kernels.decode_attention(
                q, k, v, cos, sin, cache.keys[i], cache.values[i], cache.offset, self.scale, starts
            )
            if out is not None:
                return self.o_proj(out)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        out = attention(q, k, v, masks[self.attention_type], self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    attention_class = Attention
    mlp_class = GatedMLP

    def __init__(self, config: ModelConfig, layer_index: int, qkv_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_class(config, layer_index, qkv_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.mlp_class(config)

    def forward(self, x, cos, sin, masks, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def fusable_parts(self) -> FusableParts | None:
        """This layer's pieces for the fused decode kernel (see `FusableParts`). A subclass that changes the math
        (its attention, MLP, norms or residuals) overrides this, to return None unless it still is that."""
        a = self.self_attn
        return FusableParts.of(
            a,
            self.mlp,
            input_norm=self.input_layernorm,
            pre_mlp_norm=self.post_attention_layernorm,
            q_norm=getattr(a, "q_norm", None),  # Qwen3's, over each head
            k_norm=getattr(a, "k_norm", None),
        )


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool, layer_class: type[nn.Module] = DecoderLayer):
        super().__init__()
        # An explicit weight skips nn.Embedding's random init (which costs a one-off ~1 s import of torch._dynamo).
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(layer_class(config, i, qkv_bias) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    # Qwen2 is Llama with biases on q, k and v; Mistral is Llama with a sliding window (from its config).
    QKV_BIAS = {"qwen2": True}
    layer_class: type[nn.Module] = DecoderLayer  # the other families built on Llama swap in their layers

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        qkv_bias = self.QKV_BIAS.get(config.model_type, config.attention_bias)
        self.model = LlamaModel(config, qkv_bias, self.layer_class)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def hidden_states(self, input_ids, cos, sin, masks, cache) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        return self.model.norm(self.run_layers(x, cos, sin, masks, cache))
