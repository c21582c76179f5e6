"""Quantization configs, with the names of transformers' so that the guide's code runs.

Weight-only 8/4-bit loading is not built yet: a config that asks for it is refused with a clear error rather
than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QuantizationConfig:
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("choose one of load_in_8bit and load_in_4bit, not both")

    @property
    def requested(self) -> str | None:
        return "8-bit" if self.load_in_8bit else "4-bit" if self.load_in_4bit else None


class BitsAndBytesConfig(QuantizationConfig):
    """transformers' ``BitsAndBytesConfig``; the bitsandbytes-specific fields are accepted only at their defaults."""

    def __init__(self, load_in_8bit: bool = False, load_in_4bit: bool = False, **kwargs):
        unknown = sorted(set(kwargs) - _BNB_FIELDS)
        if unknown:
            raise TypeError(f"BitsAndBytesConfig got unexpected arguments: {', '.join(unknown)}")
        self.bnb_options = kwargs
        super().__init__(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)


_BNB_FIELDS = {
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
}


def check_quantization(config) -> None:
    """Refuse what cannot be honoured yet, naming it."""
    if config is None:
        return
    if isinstance(config, dict):
        config = QuantizationConfig(
            **{k: v for k, v in config.items() if k in ("load_in_8bit", "load_in_4bit")}
        )
    if not isinstance(config, QuantizationConfig):
        raise TypeError(
            f"quantization_config must be a chatlm QuantizationConfig or BitsAndBytesConfig, not {type(config).__name__}"
        )
    if config.requested:
        raise ValueError(
            f"{config.requested} weight quantization is not supported yet; load the model in float32, bfloat16 or "
            "float16 (torch_dtype=...), or use a GGUF file"
        )
