"""Whether a model fits, decided before any weight is allocated.

`check_memory` runs in the loader once the model is built on the meta device (quantized or GGUF modules already
in place): it adds up what the weights will take in the chosen dtype and format, plus a KV cache of
``KV_PLAN_TOKENS`` tokens, and compares that with the memory available on the device (Linux's ``MemAvailable``,
CUDA's free memory). When it does not fit, loading stops at once with a `NotEnoughMemoryError` that says what is
needed, what is free, and which options fit (an 8B Q4_K_M file asked for in float32 needs 32 GB; kept as stored,
4.9 GB). ``CHATLM_MEMORY_CHECK=0`` skips the check (swap, or memory the estimate does not see).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

KV_PLAN_TOKENS = 4096  # the context the plan reserves a KV cache for (less where the model's own is shorter)
# Bytes per weight of the quantized formats (chatlm.quantization): int8 with a float32 scale per row (~1 byte);
# int4 packed two to a byte with a bfloat16 scale and zero point per 32 weights (0.625 bytes)
BYTES_PER_WEIGHT = {8: 1.0, 4: 0.625}


class NotEnoughMemoryError(MemoryError):
    """Raised before loading when the model, as asked for, does not fit in the memory available."""


@dataclass
class MemoryPlan:
    weights: int  # bytes of the weights as they will be held
    kv_cache: int  # bytes of a KV cache of `tokens` tokens
    tokens: int
    parameters: int  # every weight, counted once

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a model on ``device`` (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def plan_memory(model: nn.Module, dtype: torch.dtype, stored_bytes: dict[str, int]) -> MemoryPlan:
    """The plan for a model built on the meta device: float parameters at ``dtype``, quantized modules at their
    format's size, GGUF modules kept as stored at their tensor's bytes in the file (``stored_bytes``, by weight
    name). Shared tensors (a tied head) count once."""
    config = model.config
    seen: set[int] = set()
    weights = parameters = 0
    for name, module in model.named_modules():
        if hasattr(module, "load_weight"):  # quantized, or GGUF blocks as stored
            if name == "lm_head" and config.tie_word_embeddings:
                continue  # shares the embedding's table
            count = module.num_weights()
            parameters += count
            key = name + getattr(module, "weight_suffix", ".weight")
            if key in stored_bytes:
                weights += stored_bytes[key]
            else:
                weights += round(count * BYTES_PER_WEIGHT[getattr(module, "bits", 8)])
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            parameters += p.numel()
            weights += p.numel() * dtype.itemsize
    tokens = min(KV_PLAN_TOKENS, config.max_position_embeddings or KV_PLAN_TOKENS)
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize * tokens
    return MemoryPlan(weights, kv, tokens, parameters)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_memory(
    plan: MemoryPlan, device: torch.device, asked: str, source: str, gguf_bytes: int | None = None
) -> None:
    """Raise `NotEnoughMemoryError` if ``plan`` does not fit the memory available on ``device``. ``asked``
    describes the load (``float32``, ``4-bit``, ...); ``gguf_bytes``: the file's weights as stored, an option
    where the file is a GGUF."""
    if os.environ.get("CHATLM_MEMORY_CHECK", "1") == "0":
        return
    free = available_bytes(device)
    if free is None or plan.total <= free:
        return
    options = {
        "quantization_config=QuantizationConfig(keep_gguf_blocks=True) (the file's blocks as stored)": gguf_bytes,
        "quantization_config=QuantizationConfig(load_in_4bit=True)": plan.parameters * BYTES_PER_WEIGHT[4],
        "quantization_config=QuantizationConfig(load_in_8bit=True)": plan.parameters * BYTES_PER_WEIGHT[8],
        "torch_dtype=torch.bfloat16": plan.parameters * 2,
    }
    fits = [
        f"{option} (~{_gb(size + plan.kv_cache)})"
        for option, size in options.items()
        if size is not None and size + plan.kv_cache <= free and size < plan.weights
    ]
    advice = f"options that fit: {'; '.join(fits)}" if fits else "no smaller format fits either"
    raise NotEnoughMemoryError(
        f"{source}: loading it {asked} needs about {_gb(plan.total)} (weights {_gb(plan.weights)} + a KV cache "
        f"of {plan.tokens:,} tokens {_gb(plan.kv_cache)}), but {_gb(free)} is available on {device.type}; "
        f"{advice} (CHATLM_MEMORY_CHECK=0 skips this check)"
    )
