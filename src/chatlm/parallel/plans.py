"""Tensor-parallel plans, as data: module-path patterns ("*" is one path component) to how the module's linear
layer is split across ranks.

- "colwise": the output features are split (the weight's rows, and the bias); each rank computes its slice of
  the heads or of the MLP's hidden units, and nothing is communicated.
- "rowwise": the input features are split (the weight's columns); each rank's partial output is summed over the
  ranks by one all-reduce (the bias is added once, by rank 0's share).

Splitting q, k and v by columns splits the attention heads (and the KV cache with them); o_proj by rows sums the
heads' contributions. Splitting gate and up by columns and down by rows does the same for the MLP. So a decoder
block costs two all-reduces: one per half.
"""

from __future__ import annotations

DENSE_LLAMA_LIKE = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}

# By model_type. Architectures not listed (fused qkv projections, norms over all heads, experts) refuse
# tp_plan="auto" with an error that says so.
TP_PLANS: dict[str, dict[str, str]] = {
    "llama": DENSE_LLAMA_LIKE,
    "mistral": DENSE_LLAMA_LIKE,
    "qwen2": DENSE_LLAMA_LIKE,
    "qwen3": DENSE_LLAMA_LIKE,
    "granite": DENSE_LLAMA_LIKE,
    "gemma": DENSE_LLAMA_LIKE,
    "gemma2": DENSE_LLAMA_LIKE,
    "gemma3_text": DENSE_LLAMA_LIKE,
}
