"""The architectures, found by the Hugging Face ``model_type``: one module each, look-alikes by alias."""

from __future__ import annotations

import importlib

from .config import ModelConfig

# model_type -> (module, class). A new architecture is one file here plus one line.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("llama", "LlamaForCausalLM"),
    "qwen2": ("llama", "LlamaForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "olmo2": ("olmo2", "Olmo2ForCausalLM"),
    "granite": ("granite", "GraniteForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma", "GemmaForCausalLM"),
    "gemma3_text": ("gemma", "GemmaForCausalLM"),
    "mixtral": ("moe", "MoeForCausalLM"),
    "qwen2_moe": ("moe", "MoeForCausalLM"),
    "qwen3_moe": ("moe", "Qwen3MoeForCausalLM"),
}


def model_class(config: ModelConfig):
    if config.model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {config.model_type!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    module, name = ARCHITECTURES[config.model_type]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
