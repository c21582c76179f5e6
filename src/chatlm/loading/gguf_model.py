"""GGUF at the edge: metadata becomes a Hugging Face config, tensors get their Hugging Face names and layout.

Files are read by our own parser (`gguf_file`, shared with the tokenizer through its cache). Quantized tensors
are dequantized to float32 by `gguf_dequant` (bit-identical to the gguf package's numpy reference, which remains
the fallback for rarer types) and then cast to the requested dtype: the engine computes in float/bfloat16 until
quantized kernels land (as transformers does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import gguf_dequant
from .gguf_file import GGUFFile, GGUFFormatError, GGUFTensor, open_gguf_file

# GGUF architecture -> Hugging Face model_type.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# Per GGUF architecture: config.json keys beyond the common ones, from `meta(key, default)` (the arch's metadata).
CONFIG_EXTRAS: dict[str, Callable[[Callable[..., Any]], dict[str, Any]]] = {
    "qwen2": lambda meta: {"use_sliding_window": False},
}
# Per GGUF architecture: a fix applied to each tensor after dequantizing, (hf_name, tensor) -> tensor, for what
# llama.cpp's converter changed (e.g. norms stored as 1 + weight).
TENSOR_FIXES: dict[str, Callable[[str, torch.Tensor], torch.Tensor]] = {}

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


def open_gguf(path: Path) -> GGUFFile:
    try:
        return open_gguf_file(path)
    except GGUFFormatError as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e.reason}") from e
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def field_value(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.metadata.get(key, default)


def gguf_config(reader: GGUFFile, path: Path) -> dict[str, Any]:
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
    tokens = reader.metadata.get("tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": meta("vocab_size") or (len(tokens) if tokens is not None else None),
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
    if arch in CONFIG_EXTRAS:
        config.update(CONFIG_EXTRAS[arch](meta))
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


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major) order, in memory of its own."""
    return _dequantize(tensor).numpy()


def _dequantize(tensor: GGUFTensor) -> torch.Tensor:
    return gguf_dequant.dequantize(tensor.torch_bytes(), tensor.ggml_type, tensor.shape)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp stores each head's rotary pairs interleaved; HF checkpoints keep the two halves apart.
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """`_unpermute` on a matrix's rows of raw (possibly quantized) bytes: the same row order, before dequantizing.

    A quantized row is whole blocks, so moving rows commutes with dequantizing them; it moves a fraction of the
    bytes of the float matrix. Copied head by head: small copies stay on this thread (see gguf_dequant).
    """
    half = rows.shape[0] // heads // 2
    src = rows.view(heads, half, 2, -1)
    out = torch.empty_like(rows)
    dst = out.view(heads, 2, half, -1)
    for head in range(heads):
        for part in range(2):
            dst[head, part].copy_(src[head, :, part])
    return out


def read_gguf_tensors(
    reader: GGUFFile, config: dict[str, Any], path: Path
) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        yield from _read_tensors(reader, config, path)
    finally:
        reader.close()  # the weights are copies: the map of the file is not needed any more


def _read_tensors(reader: GGUFFile, config: dict[str, Any], path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    arch = field_value(reader, "general.architecture")
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise ValueError(f"{path.name}: unexpected tensor {tensor.name!r} for architecture {arch!r}")
        heads = None
        if arch in PERMUTED_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = config["num_attention_heads"]
        elif arch in PERMUTED_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = config["num_key_value_heads"]
        shape = tensor.shape
        try:
            if heads is not None and len(shape) == 2 and shape[0] % (2 * heads) == 0:
                raw = _unpermute_rows(tensor.torch_bytes().view(shape[0], -1), heads)
                weight = gguf_dequant.dequantize(raw, tensor.ggml_type, shape)
            else:
                weight = _dequantize(tensor)
                if heads is not None:
                    weight = _unpermute(weight, heads)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(
                f"{path.name}: cannot dequantize {tensor.name} ({tensor.ggml_type.name}): {e}"
            ) from e
        if arch in TENSOR_FIXES:
            weight = TENSOR_FIXES[arch](name, weight)
        yield name, weight
