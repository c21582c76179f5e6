"""Model configuration: a dataclass whose fields are the config.json keys."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# freq_factors: a divisor per frequency ("factors"), as GGUF files store Llama 3.1+'s llama3 scaling
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "su", "freq_factors")


MAX_SIZE = 1 << 24  # past any real model's width, layer count, vocabulary or context (16M)


def _check_size(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
        raise ValueError(f"the model's {name} must be a whole number from 1 to {MAX_SIZE:,}, not {value!r}")


@dataclass
class ModelConfig:
    """The keys of a Hugging Face ``config.json`` that the engine reads; unknown keys are kept in ``extra``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool | None = None
    max_window_layers: int | None = None
    layer_types: list[str] | None = None
    partial_rotary_factor: float = (
        1.0  # the share of each head's channels that rope rotates (Phi-4-mini: 0.75)
    )
    # Gemma 2/3: hidden_activation is their name for the MLP activation; scores scale by
    # 1/sqrt(query_pre_attn_scalar); a softcap maps scores (attn_) or logits (final_) to cap * tanh(x / cap);
    # sliding layers rotate with rope_local_base_freq; every sliding_window_pattern-th layer is global.
    hidden_activation: str | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_base_freq: float | None = None
    sliding_window_pattern: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        raw = dict(raw)
        if "model_type" not in raw:
            raise ValueError("config.json has no model_type")
        if raw["model_type"] == "gemma3" and isinstance(raw.get("text_config"), dict):
            # Gemma 3's image-text checkpoints: the language model is text_config (the vision tower is not loaded).
            # transformers' image-text model applies no final softcapping (Gemma 3's releases have none anyway).
            outer = {k: raw[k] for k in _OUTER_KEYS if raw.get(k) is not None}
            outer.update(model_type="gemma3_text", final_logit_softcapping=None)
            raw = {**raw["text_config"], **outer}
        # transformers 5 writes rope settings as rope_parameters; older files use rope_theta + rope_scaling.
        rope = raw.pop("rope_parameters", None)
        if rope and ("full_attention" in rope or "sliding_attention" in rope):
            # Per attention type (Gemma 3): sliding layers have a base of their own, global ones the usual keys.
            local = rope.get("sliding_attention") or {}
            if local.get("rope_type", local.get("type", "default")) != "default":
                raise ValueError("rope scaling on sliding-window layers is not supported")
            if "rope_theta" in local:
                raw.setdefault("rope_local_base_freq", local["rope_theta"])
            rope = rope.get("full_attention")
        if rope:
            rope = dict(rope)
            raw.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            if "partial_rotary_factor" in rope:
                raw.setdefault("partial_rotary_factor", rope.pop("partial_rotary_factor"))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raw.setdefault("rope_scaling", rope)
        if raw.get("dtype") is not None:
            raw.setdefault("torch_dtype", raw["dtype"])
        for key, value in MODEL_TYPE_DEFAULTS.get(raw["model_type"], {}).items():
            raw.setdefault(key, value)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        missing = [f.name for f in dataclasses.fields(cls) if f.name in _REQUIRED and f.name not in known]
        if missing:
            raise ValueError(f"config.json lacks required keys: {', '.join(missing)}")
        return cls(**known, extra={k: v for k, v in raw.items() if k not in names})

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        return cls.from_dict(raw)

    def __post_init__(self) -> None:
        # sizes first, before anything divides by them or allocates by them (a broken or hostile file)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            _check_size(name, getattr(self, name))
        for name in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) is not None:
                _check_size(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                    f"({self.num_attention_heads}), and no head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps >= 0):
            raise ValueError(f"rms_norm_eps must be a number, 0 or more, not {self.rms_norm_eps!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"rope scaling type {kind!r} is not supported yet (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
                )
        if self.layer_types is None:
            self.layer_types = [self._default_layer_type(i) for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must name one attention type per layer")

    def _default_layer_type(self, index: int) -> str:
        if self.sliding_window is None or self.use_sliding_window is False:
            return "full_attention"
        if self.sliding_window_pattern:  # Gemma 2/3: layers pattern-1, 2*pattern-1, ... are global
            return "sliding_attention" if (index + 1) % self.sliding_window_pattern else "full_attention"
        if self.use_sliding_window and self.max_window_layers is not None and index < self.max_window_layers:
            return "full_attention"
        return "sliding_attention"

    @property
    def attention_windows(self) -> dict[str, int | None]:
        """Per attention type in ``layer_types``: how many of the latest tokens its layers attend to, None for
        every token. The models' masks and ``chatlm info`` both read this, so they agree on each layer."""
        window = None if self.use_sliding_window is False else self.sliding_window
        return {kind: window if kind == "sliding_attention" else None for kind in self.layer_types}

    @property
    def sliding_window_layers(self) -> list[int]:
        """The indices of the layers that attend to the last ``sliding_window`` tokens only."""
        windows = self.attention_windows
        return [i for i, kind in enumerate(self.layer_types) if windows[kind] is not None]

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}


# What transformers' config class for a model_type assumes when config.json omits a key, where that differs from
# the defaults above: a sparse config.json must mean the same model here as there.
_GEMMA = dict(head_dim=256, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")
MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(_GEMMA, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192),
    "gemma2": dict(
        _GEMMA,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        sliding_window_pattern=2,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=8192,
    ),
    "gemma3_text": dict(
        _GEMMA,
        # the Hub's image-text configs give only what differs from these (the 4B's size)
        vocab_size=262_208,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        sliding_window_pattern=6,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        max_position_embeddings=131_072,
    ),
    # Qwen's window is off unless use_sliding_window, and then spares the first max_window_layers layers.
    "qwen2": dict(use_sliding_window=False, max_window_layers=28),
    "qwen3": dict(use_sliding_window=False, max_window_layers=28),
    # (the number of experts, which has two names, defaults in models/moe.py)
    "mixtral": dict(num_experts_per_tok=2, rope_theta=1_000_000.0, rms_norm_eps=1e-5),
    "qwen2_moe": dict(
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        use_sliding_window=False,
    ),
    "qwen3_moe": dict(num_experts_per_tok=8, moe_intermediate_size=768, use_sliding_window=False),
}

# What a composite config (gemma3: text_config + vision_config) says for the whole model, over text_config.
_OUTER_KEYS = ("tie_word_embeddings", "dtype", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id")

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
