"""Qwen3: Llama with an RMSNorm over each head of q and k before rope (and an explicit head_dim)."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .layers import RMSNorm
from .llama import Attention, DecoderLayer, LlamaForCausalLM


class Qwen3Attention(Attention):
    def __init__(self, config: ModelConfig, layer_index: int, qkv_bias: bool):
        super().__init__(config, layer_index, qkv_bias)
        # One weight of head_dim shared by all heads: the norm runs over each head's channels.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        return self.q_norm(q), self.k_norm(k), v


class Qwen3DecoderLayer(DecoderLayer):
    attention_class = Qwen3Attention  # its q_norm and k_norm are part of the fusable parts


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_class = Qwen3DecoderLayer
