"""GGUF at the edge: metadata becomes a Hugging Face config, tensors get their Hugging Face names and layout.

Quantized tensors are dequantized to float32 by the gguf package's reference dequantizers and then cast to the
requested dtype: the engine computes in float/bfloat16 until quantized kernels land (as transformers does).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# GGUF architecture -> Hugging Face model_type.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# llama.cpp's converter interleaves the rotary halves of q and k for these architectures; we undo it.
PERMUTED_QK = {"llama"}

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def field_value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, path: Path) -> dict[str, Any]:
    """The Hugging Face config.json equivalent of a GGUF file's metadata."""
    arch = field_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path.name}: GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )

    def meta(key: str, default: Any = None) -> Any:
        return field_value(reader, f"{arch}.{key}", default)

    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": meta("vocab_size") or (len(tokens.data) if tokens is not None else None),
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads),
        "head_dim": meta("attention.key_length", hidden // heads if hidden and heads else None),
        "max_position_embeddings": meta("context_length", 2048),
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta("rope.freq_base", 10000.0),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field_value(reader, "tokenizer.ggml.padding_token_id"),
    }
    scaling = meta("rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    elif scaling not in (None, "none"):
        raise ValueError(f"{path.name}: rope scaling {scaling!r} in GGUF is not supported yet")
    if arch == "qwen2":
        config["use_sliding_window"] = False
    missing = [
        k
        for k, v in config.items()
        if v is None and k not in ("bos_token_id", "eos_token_id", "pad_token_id")
    ]
    if missing:
        raise ValueError(f"{path.name}: GGUF metadata lacks {', '.join(missing)}")
    return config


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    return None


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major) order."""
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(
        shape
    )
    # Unquantized tensors come back as read-only views of the memory map; torch wants memory it may own.
    return data if data.flags.writeable else data.copy()


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp stores each head's rotary pairs interleaved; HF checkpoints keep the two halves apart.
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf_tensors(reader, config: dict[str, Any], path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    arch = field_value(reader, "general.architecture")
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise ValueError(f"{path.name}: unexpected tensor {tensor.name!r} for architecture {arch!r}")
        try:
            weight = torch.from_numpy(dequantize(tensor))
        except (NotImplementedError, ValueError) as e:
            raise ValueError(
                f"{path.name}: cannot dequantize {tensor.name} ({tensor.tensor_type.name}): {e}"
            ) from e
        if arch in PERMUTED_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = _unpermute(weight, config["num_attention_heads"])
        elif arch in PERMUTED_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = _unpermute(weight, config["num_key_value_heads"])
        yield name, weight
