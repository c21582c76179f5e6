"""The Gemma family: gemma, gemma2 (sandwich norms, softcapping, alternating sliding window) and gemma3_text
(q/k norms, local and global layers with their own rope).

What sets Gemma apart from Llama: embeddings scaled by sqrt(hidden_size), RMSNorm weights stored as w - 1 (the
norm multiplies by 1 + w, in float32 before casting back), a tanh-approximated GELU, and attention scaled by
1/sqrt(query_pre_attn_scalar) (Gemma 2/3).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .base import CausalLM
from .cache import KVCache
from .config import ModelConfig
from .layers import FusableParts, GatedMLP, apply_rope, attention, rope_cos_sin, rope_inverse_frequencies
from .llama import Attention

_MULTIMODAL_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
_VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Unlike Llama's norm, the weight multiplies in float32 and only the product is cast back (matters in bf16).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)

    def kernel_weight(self) -> torch.Tensor:
        """What the normalised values are multiplied by (a fused kernel's operand), in float32 as here."""
        return 1.0 + self.weight.float()


class GemmaAttention(Attention):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__(config, layer_index, config.attention_bias)
        if config.model_type != "gemma":
            self.scale = config.query_pre_attn_scalar**-0.5
        # transformers applies attention softcapping in Gemma 2 only (Gemma 3's config key is unused there).
        self.softcap = config.attn_logit_softcapping if config.model_type == "gemma2" else None
        self.qk_norm = config.model_type == "gemma3_text"
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, cos, sin, masks, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        if isinstance(cos, dict):  # Gemma 3: this layer type's own rope
            cos, sin = cos[self.attention_type], sin[self.attention_type]
        q, k, v = self.project(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        out = attention(q, k, v, masks[self.attention_type], self.scale, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, mlp_config: ModelConfig):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.self_attn = GemmaAttention(config, layer_index)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.mlp = GatedMLP(mlp_config)
        # Gemma 2/3 wrap both blocks in norms ("sandwich"); Gemma's post_attention_layernorm is Llama's pre-MLP norm.
        self.sandwich = config.model_type != "gemma"
        if self.sandwich:
            self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def fusable_parts(self) -> FusableParts | None:
        """The pieces of this layer for the fused decode kernel (Gemma 2's attention softcapping is not its math)."""
        a = self.self_attn
        if a.softcap is not None:
            return None
        return FusableParts.of(
            a,
            self.mlp,
            input_norm=self.input_layernorm,
            post_attention_norm=self.post_attention_layernorm if self.sandwich else None,
            pre_mlp_norm=self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm,
            post_mlp_norm=self.post_feedforward_layernorm if self.sandwich else None,
            q_norm=a.q_norm if a.qk_norm else None,
            k_norm=a.k_norm if a.qk_norm else None,
        )

    def forward(self, x, cos, sin, masks, cache):
        if not self.sandwich:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks, cache)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, masks, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig, mlp_config: ModelConfig):
        super().__init__()
        # An explicit weight skips nn.Embedding's random init (the weights are loaded right after).
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, mlp_config) for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


class GemmaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        if config.extra.get("use_bidirectional_attention"):
            raise ValueError("Gemma with use_bidirectional_attention (an encoder) is not supported")
        if config.model_type == "gemma":
            # transformers reads the legacy "gelu" of Gemma's config.json as the tanh approximation.
            activation = "gelu_pytorch_tanh" if config.hidden_act == "gelu" else config.hidden_act
        else:
            activation = config.hidden_activation
        # The shared MLP reads hidden_act; Gemma's MLP has no biases whatever mlp_bias says.
        self.model = GemmaModel(config, dataclasses.replace(config, hidden_act=activation, mlp_bias=False))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._local_inv_freq: torch.Tensor | None = None
        self._embed_scale: torch.Tensor | None = None

    def hidden_states(self, input_ids, cos, sin, masks, cache) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self._embed_scale is None or self._embed_scale.dtype != x.dtype:
            # sqrt(hidden_size) rounded to float32, then to the model's dtype, as transformers' buffer is
            # (bf16 turns sqrt(640) = 25.298 into 25.25): the product is taken in the model's dtype.
            self._embed_scale = torch.tensor(self.config.hidden_size**0.5).to(x.dtype)
        x = x * self._embed_scale
        return self.model.norm(self.run_layers(x, cos, sin, masks, cache))

    def rope_tables(self, position_ids: torch.Tensor):
        if self.config.model_type != "gemma3_text":
            return super().rope_tables(position_ids)
        # Gemma 3: global layers rotate with rope_theta and its scaling, sliding ones with their own base, unscaled.
        if self._local_inv_freq is None or self._local_inv_freq.device != position_ids.device:
            local = dataclasses.replace(
                self.config, rope_theta=self.config.rope_local_base_freq, rope_scaling=None
            )
            self._local_inv_freq = rope_inverse_frequencies(local).to(position_ids.device)
        full = super().rope_tables(position_ids)
        sliding = rope_cos_sin(self._local_inv_freq, position_ids, self.dtype)
        return (
            {"full_attention": full[0], "sliding_attention": sliding[0]},
            {"full_attention": full[1], "sliding_attention": sliding[1]},
        )

    def checkpoint_slot(self, name: str) -> tuple[str | None, tuple]:
        # Gemma 3's image-text checkpoints keep the language model under language_model. (as the Hub's files and
        # transformers' save_pretrained write it; model.language_model. in transformers' own module tree).
        for prefix, ours in _MULTIMODAL_PREFIXES:
            if name.startswith(prefix):
                return ours + name[len(prefix) :], ()
        if name.startswith(_VISION_PREFIXES):
            return None, ()
        return name, ()

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        if cap is None or self.config.model_type == "gemma":
            return logits
        return torch.tanh(logits / cap) * cap
