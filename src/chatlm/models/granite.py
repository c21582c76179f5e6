"""Granite: Llama with four scalars from its config: embeddings times ``embedding_multiplier``, each residual
branch times ``residual_multiplier``, ``attention_multiplier`` as the softmax scale, logits divided by
``logits_scaling``."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .llama import Attention, DecoderLayer, LlamaForCausalLM


class GraniteAttention(Attention):
    def __init__(self, config: ModelConfig, layer_index: int, qkv_bias: bool):
        super().__init__(config, layer_index, qkv_bias)
        self.scale = config.extra.get("attention_multiplier", 1.0)


class GraniteDecoderLayer(DecoderLayer):
    attention_class = GraniteAttention

    def __init__(self, config: ModelConfig, layer_index: int, qkv_bias: bool):
        super().__init__(config, layer_index, qkv_bias)
        self.residual_multiplier = config.extra.get("residual_multiplier", 1.0)

    def fusable_parts(self) -> None:
        return None  # scaled residuals and softmax: not the fused decode kernel's math

    def forward(self, x, cos, sin, masks, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks, cache) * self.residual_multiplier
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier


class GraniteForCausalLM(LlamaForCausalLM):
    layer_class = GraniteDecoderLayer

    def hidden_states(self, input_ids, cos, sin, masks, cache) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids) * self.config.extra.get("embedding_multiplier", 1.0)
        for layer in self.active_layers():
            x = layer(x, cos, sin, masks, cache)
        return self.model.norm(x)

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.config.extra.get("logits_scaling", 1.0)
