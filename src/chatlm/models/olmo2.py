"""OLMo 2: Llama with norms on the outputs of attention and MLP instead of their inputs, and an RMSNorm over the
whole q and k projections (all heads at once) before rope."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import FusableParts, GatedMLP, RMSNorm, rope_cos_sin
from .llama import Attention, LlamaForCausalLM


class Olmo2RMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Unlike Llama's, the weight multiplies in float32, before the cast back (it matters in bf16).
        h = x.float()
        return (self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


class Olmo2Attention(Attention):
    def __init__(self, config: ModelConfig, layer_index: int, qkv_bias: bool):
        super().__init__(config, layer_index, qkv_bias)
        self.q_norm = Olmo2RMSNorm(self.q_dim, config.rms_norm_eps)
        self.k_norm = Olmo2RMSNorm(self.kv_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x))
        return self.split_heads(q), self.split_heads(k), self.split_heads(self.v_proj(x))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, qkv_bias: bool):
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_index, qkv_bias)
        self.post_attention_layernorm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)
        self.post_feedforward_layernorm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def fusable_parts(self) -> FusableParts:
        """Norms after attention and after the MLP, none before; q and k normalised over all heads."""
        a = self.self_attn
        return FusableParts.of(
            a,
            self.mlp,
            post_attention_norm=self.post_attention_layernorm,
            post_mlp_norm=self.post_feedforward_layernorm,
            q_norm=a.q_norm,
            k_norm=a.k_norm,
        )

    def forward(self, x, cos, sin, masks, cache):
        x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, masks, cache))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2ForCausalLM(LlamaForCausalLM):
    layer_class = Olmo2DecoderLayer

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model.norm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def rope_tables(self, position_ids: torch.Tensor):
        # OLMo 2 keeps cos and sin in float32 and rotates q and k in float32 whatever the model's dtype.
        return rope_cos_sin(
            self._rope_frequencies(position_ids), position_ids, torch.float32, self._rope_scale
        )
