"""Phi-3 (and Phi-4-mini): Llama with fused projections kept fused as in its checkpoints (``qkv_proj``, and
``gate_up_proj`` with the gate first), longrope scaling and an optional partial rotary embedding (both handled in
the shared rope code)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import ACTIVATIONS
from .llama import Attention, DecoderLayer, LlamaForCausalLM


class Phi3Attention(Attention):
    def make_projections(self, hidden: int, bias: bool) -> None:
        self.qkv_proj = nn.Linear(hidden, self.q_dim + 2 * self.kv_dim, bias=bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv_proj(x).split((self.q_dim, self.kv_dim, self.kv_dim), dim=-1)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)


class Phi3MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation {config.hidden_act!r} is not supported")
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Phi3DecoderLayer(DecoderLayer):
    attention_class = Phi3Attention
    mlp_class = Phi3MLP

    def fusable_parts(self) -> None:
        return None  # fused qkv and gate_up projections: not the fused decode kernel's operands


class Phi3ForCausalLM(LlamaForCausalLM):
    layer_class = Phi3DecoderLayer

    def recompute_cache(self, cached: int, length: int) -> bool:
        # As transformers' Phi-3 generates: when the sequence first outgrows the pre-training context, the keys
        # cached with the short rope factors are recomputed with the long ones (only once, by the same rule).
        context = self._longrope_context
        return context is not None and length > context and cached <= context
