"""chatlm: chat with open models on your own hardware, through the API of the transformers chat guide.

from chatlm import pipeline
pipe = pipeline("text-generation")          # the bundled SmolLM2-135M-Instruct
pipe([{"role": "user", "content": "Hi!"}])[0]["generated_text"][-1]["content"]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> module. Imported on first use, so `import chatlm` (and the CLI's error paths) stay fast.
_EXPORTS = {
    "pipeline": "pipeline",
    "TextGenerationPipeline": "pipeline",
    "AutoModelForCausalLM": "auto",
    "AutoTokenizer": "tokenizer",
    "PreTrainedTokenizerFast": "tokenizer",
    "GenerationConfig": "generation.config",
    "DynamicCache": "models.cache",
    "PrefixCache": "generation.prefix_cache",
    "TextStreamer": "generation.streamers",
    "TextIteratorStreamer": "generation.streamers",
    "QuantizationConfig": "quantization",
    "BitsAndBytesConfig": "quantization",
    "render_chat_template": "chat_template",
    "get_json_schema": "tool_schema",
    "set_seed": "utils",
}

__all__ = [
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "BitsAndBytesConfig",
    "DynamicCache",
    "GenerationConfig",
    "PreTrainedTokenizerFast",
    "PrefixCache",
    "QuantizationConfig",
    "TextGenerationPipeline",
    "TextIteratorStreamer",
    "TextStreamer",
    "__version__",
    "get_json_schema",
    "pipeline",
    "render_chat_template",
    "set_seed",
]

if TYPE_CHECKING:
    from .auto import AutoModelForCausalLM
    from .chat_template import render_chat_template
    from .generation.config import GenerationConfig
    from .generation.prefix_cache import PrefixCache
    from .generation.streamers import TextIteratorStreamer, TextStreamer
    from .models.cache import DynamicCache
    from .pipeline import TextGenerationPipeline, pipeline
    from .quantization import BitsAndBytesConfig, QuantizationConfig
    from .tokenizer import AutoTokenizer, PreTrainedTokenizerFast
    from .tool_schema import get_json_schema
    from .utils import set_seed


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'chatlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
