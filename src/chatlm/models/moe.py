"""Mixture-of-experts families: mixtral (top-2 of 8), qwen2_moe (plus a gated shared expert) and qwen3_moe.

Each token's MLP is the weighted sum of a few experts chosen by a router. The experts of a layer are stacked in
two parameters, ``gate_up_proj`` (E, 2 * I, H) and ``down_proj`` (E, H, I), and tokens are grouped by expert:
one matmul per expert that has tokens, on those tokens only. Decoding one token reads only its chosen experts'
weights, so decode time follows the active parameters, not the total.

Checkpoints hold one tensor per expert and projection (Mixtral's ``experts.3.w1.weight``, Qwen's
``experts.3.gate_proj.weight``), transformers 5's fused stacks, or (GGUF) one stack per projection:
``checkpoint_slot`` says where each goes, and loading (`loading.parts`) assembles the stacks.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import ACTIVATIONS, GatedMLP
from .llama import DecoderLayer, LlamaForCausalLM
from .qwen3 import Qwen3Attention


@dataclasses.dataclass(frozen=True)
class MoeTraits:
    default_experts: int  # when config.json names neither num_experts nor num_local_experts
    intermediate_key: str  # config key of one expert's intermediate size
    always_renormalise: bool  # mixtral renormalises the top-k probabilities; qwen only with norm_topk_prob
    float_weights: bool  # mixtral weighs expert outputs in float32; qwen in the model's dtype
    shared_expert: bool  # qwen2_moe: a dense expert every token goes through, scaled by sigmoid(a gate)


TRAITS = {
    "mixtral": MoeTraits(8, "intermediate_size", True, True, False),
    "qwen2_moe": MoeTraits(60, "moe_intermediate_size", False, False, True),
    "qwen3_moe": MoeTraits(128, "moe_intermediate_size", False, False, False),
}


def _option(config: ModelConfig, key: str):
    value = getattr(config, key, None)
    value = config.extra.get(key) if value is None else value
    if value is None:
        raise ValueError(f"a {config.model_type} config needs {key}")
    return value


def num_experts(config: ModelConfig) -> int:
    # Two names for one number: transformers aliases num_experts to num_local_experts (and saves the latter).
    extra = config.extra
    return extra.get("num_local_experts", extra.get("num_experts", TRAITS[config.model_type].default_experts))


def is_sparse_layer(config: ModelConfig, index: int) -> bool:
    """Whether layer ``index`` has experts: qwen's ``mlp_only_layers`` and ``decoder_sparse_step`` leave some
    layers dense; every Mixtral layer is sparse."""
    extra = config.extra
    if index in (extra.get("mlp_only_layers") or []):
        return False
    return num_experts(config) > 0 and (index + 1) % extra.get("decoder_sparse_step", 1) == 0


class Experts(nn.Module):
    """E gated-MLP experts, stacked: ``gate_up_proj`` (E, 2I, H) holds each expert's gate rows then its up rows.
    Under tensor parallelism a rank holds experts offset..offset+E-1 of the router's; tokens routed to the others
    get nothing from this rank (another rank adds their share)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act, offset: int = 0):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.act = act
        self.offset = offset

    def num_held(self) -> int:
        """The experts this module holds."""
        return self.gate_up_proj.shape[0]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        # gate_up_proj[e] is a contiguous view: no weight is copied, only expert e's are read.
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H); token n goes to experts ``chosen[n]`` (N, k) with ``weights[n]``; returns (N, H)."""
        held = self.num_held()
        if x.shape[0] == 1:  # one token (decode): no grouping needed
            out = torch.zeros_like(x)
            for slot, e in enumerate(chosen[0].tolist()):
                if 0 <= e - self.offset < held:
                    out += (self.expert(e - self.offset, x) * weights[:, slot, None]).to(x.dtype)
            return out
        k = chosen.shape[1]
        flat = chosen.flatten() - self.offset
        if self.offset or held < int(flat.max()) + 1:  # experts held elsewhere: their pairs sort last, unused
            flat = torch.where((flat >= 0) & (flat < held), flat, held)
        order = flat.argsort(stable=True)  # the (token, slot) pairs, grouped by expert
        counts = torch.bincount(flat, minlength=held).tolist()[:held]
        tokens, pair_weights = order // k, weights.flatten()[order, None]
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = tokens[start : start + count]
                y = self.expert(e, x[rows]) * pair_weights[start : start + count]
                out.index_add_(0, rows, y.to(x.dtype))
                start += count
        return out


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        traits = TRAITS[config.model_type]
        hidden, experts = config.hidden_size, num_experts(config)
        self.top_k = _option(config, "num_experts_per_tok")
        self.renormalise = traits.always_renormalise or bool(config.extra.get("norm_topk_prob", False))
        self.float_weights = traits.float_weights
        self.gate = nn.Linear(hidden, experts, bias=False)  # the router
        rank, world = config.extra.get("expert_parallel", (0, 1))  # tensor parallel: this rank's share
        self.experts = Experts(
            experts // world,
            hidden,
            _option(config, traits.intermediate_key),
            ACTIVATIONS[config.hidden_act],
            offset=rank * (experts // world),
        )
        self.shared_expert = self.shared_expert_gate = None
        if traits.shared_expert:
            shared = _option(config, "shared_expert_intermediate_size")
            self.shared_expert = GatedMLP(dataclasses.replace(config, intermediate_size=shared))
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # Softmax over all experts in float32, then the top k (renormalised to sum to 1 where the family does).
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float_weights:
            weights = weights.to(x.dtype)
        out = self.experts(x, chosen, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


class MoeDecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, layer_index: int, qkv_bias: bool):
        super().__init__(config, layer_index, qkv_bias)
        if is_sparse_layer(config, layer_index):
            # Replaces the dense MLP the base class built (on the meta device, where models are built, for free).
            self.mlp = SparseMoeBlock(config)

    def fusable_parts(self) -> None:
        return None  # experts (and the dense layers among them run as modules too)


class Qwen3MoeDecoderLayer(MoeDecoderLayer):
    attention_class = Qwen3Attention  # q and k normalised per head, as dense Qwen3


# A checkpoint tensor of expert weights: per expert (HF: w1/w3/w2 in Mixtral, gate/up/down_proj in Qwen) or
# stacked over experts (GGUF's ffn_*_exps, read as mlp.experts.gate_proj / up_proj / down_proj).
_EXPERT_TENSOR = re.compile(
    r"(?P<prefix>model\.layers\.\d+\.mlp\.experts)\.(?:(?P<expert>\d+)\.)?"
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)(?(expert)\.weight)$"
)
_HALF = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}  # gate rows first, then up rows


class MoeForCausalLM(LlamaForCausalLM):
    # Qwen1.5-MoE has q/k/v biases; mixtral and qwen3_moe follow attention_bias
    QKV_BIAS = {"qwen2_moe": True}

    layer_class = MoeDecoderLayer

    def __init__(self, config: ModelConfig):
        if config.model_type not in TRAITS:
            raise ValueError(f"{config.model_type!r} is not a mixture-of-experts model_type")
        super().__init__(config)
        self.expert_intermediate = _option(config, TRAITS[config.model_type].intermediate_key)

    def checkpoint_slot(self, name: str) -> tuple[str, tuple]:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for the MoE block
        m = _EXPERT_TENSOR.match(name)
        if m is None:
            return name, ()
        expert = () if m["expert"] is None else (int(m["expert"]),)
        rank, world = self.config.extra.get("expert_parallel", (0, 1))
        if expert and world > 1:  # tensor parallel: this rank keeps its own experts, renumbered from 0
            held = num_experts(self.config) // world
            if not 0 <= expert[0] - rank * held < held:
                return None, ()
            expert = (expert[0] - rank * held,)
        if m["proj"] in _HALF:
            size = self.expert_intermediate
            rows = slice(_HALF[m["proj"]] * size, (_HALF[m["proj"]] + 1) * size)
            return f"{m['prefix']}.gate_up_proj", (*(expert or (slice(None),)), rows)
        return f"{m['prefix']}.down_proj", expert


class Qwen3MoeForCausalLM(MoeForCausalLM):
    layer_class = Qwen3MoeDecoderLayer
