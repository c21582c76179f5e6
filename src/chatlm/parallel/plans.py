"""Tensor-parallel plans, as data: module-path patterns ("*" is one path component) to how the module's linear
layer is split across ranks.

- "colwise": the output features are split (the weight's rows, and the bias); each rank computes its slice of
  the heads or of the MLP's hidden units, and nothing is communicated.
- "rowwise": the input features are split (the weight's columns); each rank's partial output is summed over the
  ranks by one all-reduce (the bias is added once, by rank 0's share).
- "rowwise_partial": split as rowwise, but the sum waits for an enclosing module marked "reduce".
- "experts": a mixture-of-experts layer's experts are dealt out, E / N to each rank; a token's chosen experts
  that live elsewhere contribute nothing here, and the enclosing "reduce" sums every rank's share.
- "reduce": the module's output is summed over the ranks (one all-reduce).

Splitting q, k and v by columns splits the attention heads (and the KV cache with them); o_proj by rows sums the
heads' contributions. Splitting gate and up by columns and down by rows does the same for the MLP. So a decoder
block costs two all-reduces: one per half.
"""

from __future__ import annotations

from dataclasses import dataclass

DENSE_LLAMA_LIKE = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}

# The MLP half of an MoE model sums once per layer: the experts' shares, the shared expert's partial sums (Qwen2
# MoE) and, in dense layers (mlp_only_layers), the MLP's partial sums, all in the "reduce" of the mlp module.
MOE = {
    **{k: v for k, v in DENSE_LLAMA_LIKE.items() if ".self_attn." in k},
    "model.layers.*.mlp": "reduce",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise_partial",
    "model.layers.*.mlp.experts": "experts",
    "model.layers.*.mlp.shared_expert.gate_proj": "colwise",
    "model.layers.*.mlp.shared_expert.up_proj": "colwise",
    "model.layers.*.mlp.shared_expert.down_proj": "rowwise_partial",
}


@dataclass(frozen=True)
class Plan:
    layers: dict[str, str]
    # config sizes each rank takes 1/N of (heads, MLP widths); "experts": the number of experts too
    divides: tuple[str, ...] = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


HEADS = ("num_attention_heads", "num_key_value_heads")
DENSE = Plan(DENSE_LLAMA_LIKE)

# By model_type. Architectures not listed (fused qkv projections, norms over all heads) refuse tp_plan="auto"
# with an error that says so.
TP_PLANS: dict[str, Plan] = {
    "llama": DENSE,
    "mistral": DENSE,
    "qwen2": DENSE,
    "qwen3": DENSE,
    "granite": DENSE,
    "gemma": DENSE,
    "gemma2": DENSE,
    "gemma3_text": DENSE,
    # Mixtral's experts are as wide as its intermediate_size: they are dealt out whole, not narrowed.
    "mixtral": Plan(MOE, (*HEADS, "experts")),
    "qwen2_moe": Plan(MOE, (*HEADS, "intermediate_size", "shared_expert_intermediate_size", "experts")),
    "qwen3_moe": Plan(MOE, (*HEADS, "intermediate_size", "experts")),
}
