"""GGUF at the edge: metadata becomes a Hugging Face config, tensors get their Hugging Face names and layout.

Files are read by our own parser (`gguf_file`, shared with the tokenizer through its cache). Quantized tensors
are dequantized to float32 by `gguf_dequant` (bit-identical to the gguf package's numpy reference, which remains
the fallback for rarer types) and then cast to the requested dtype, as transformers does. With a
``quantization_config``, the weights of quantized modules come as raw blocks instead (`GGUFBlocks`), and 4-bit
blocks stay 4-bit (see `chatlm.quantization`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import gguf_dequant
from .gguf_blocks import GGUFBlocks
from .gguf_file import GGUFFile, GGUFFormatError, GGUFTensor, open_gguf_file

# GGUF architecture -> Hugging Face model_type.
ARCHITECTURES = {
    "llama": "llama",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "granite": "granite",
    "qwen2": "qwen2",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
}

# Per GGUF architecture: config.json keys beyond the common ones, from `meta(key, default)` (the arch's metadata).
CONFIG_EXTRAS: dict[str, Callable[[Callable[..., Any]], dict[str, Any]]] = {
    "qwen2": lambda meta: {"use_sliding_window": False},
    "phi3": lambda meta: _phi3_extras(meta),
    "granite": lambda meta: _granite_extras(meta),
    "gemma2": lambda meta: _gemma_extras(meta, layers_27b=46),
    "gemma3": lambda meta: _gemma_extras(meta, layers_27b=62),
    # llama.cpp writes Mixtral as llama with experts
    "llama": lambda meta: _moe_extras(meta, "mixtral") if meta("expert_count") else {},
    "qwen2moe": lambda meta: _moe_extras(meta, "qwen2_moe"),
    "qwen3moe": lambda meta: _moe_extras(meta, "qwen3_moe"),
}
# Per GGUF architecture: a fix applied to each tensor after dequantizing, (hf_name, tensor) -> tensor, for what
# llama.cpp's converter changed (e.g. norms stored as 1 + weight).
TENSOR_FIXES: dict[str, Callable[[str, torch.Tensor], torch.Tensor]] = {
    # Gemma's norms multiply by 1 + w; llama.cpp stores 1 + w for every one of them (q/k norms too).
    **dict.fromkeys(
        ["gemma", "gemma2", "gemma3"], lambda name, w: w - 1 if name.endswith("norm.weight") else w
    ),
    # The shared expert's gate is one row, (1, hidden) in HF; some GGUF files store it as a vector.
    "qwen2moe": lambda name, w: w.reshape(1, -1) if name.endswith("shared_expert_gate.weight") else w,
}

# llama.cpp's converter interleaves the rotary halves of q and k for these architectures; we undo it.
PERMUTED_QK = {"llama", "granite"}

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
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",  # OLMo 2 norms after, not before
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    # Mixture of experts: the router, each projection of all experts stacked (E, out, in), the shared expert.
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# Mixtral GGUF files from before llama.cpp stacked the experts (early 2024): blk.N.ffn_gate.E.weight
_PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")


# Per GGUF architecture: layer tensor names that mean something else there than in LAYER_NAMES.
ARCH_LAYER_NAMES = {
    # Gemma 2/3 wrap attention and MLP in norms: ffn_norm is the MLP's pre-norm, not post_attention_layernorm.
    arch: {
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
    }
    for arch in ("gemma2", "gemma3")
}
# Phi-3's fused gate and up projection (gate rows first, in both layouts) is its ffn_up.
ARCH_LAYER_NAMES["phi3"] = {"ffn_up.weight": "mlp.gate_up_proj.weight"}
# Tensors that are config, not weights: llama.cpp keeps Phi-3's longrope factors as tensors.
ROPE_FACTOR_TENSORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # Llama 3.1+'s rope scaling, as a divisor per frequency


def _gemma_extras(meta: Callable[..., Any], layers_27b: int) -> dict[str, Any]:
    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    # No query_pre_attn_scalar in GGUF: llama.cpp scales scores by 1/sqrt(key_length), except for the 27B models
    # (known by their layer count), whose scalar is hidden_size / heads.
    head_dim, big = meta("attention.key_length", hidden // heads), meta("block_count") == layers_27b
    extras = {"query_pre_attn_scalar": hidden // heads if big else head_dim}
    keys = {
        "attention.sliding_window": "sliding_window",
        "attn_logit_softcapping": "attn_logit_softcapping",
        "final_logit_softcapping": "final_logit_softcapping",
        "rope.freq_base_swa": "rope_local_base_freq",
    }
    # Absent keys keep the defaults of transformers' config class (and llama.cpp's): see MODEL_TYPE_DEFAULTS.
    extras.update({hf: meta(key) for key, hf in keys.items() if meta(key) is not None})
    pattern = meta("attention.sliding_window_pattern")
    if isinstance(pattern, int):
        extras["sliding_window_pattern"] = pattern
    elif pattern is not None:  # one flag per layer, true for sliding-window layers
        extras["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    return extras


def _phi3_extras(meta: Callable[..., Any]) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if meta("attention.sliding_window"):  # 0 is none (Phi-4)
        extras["sliding_window"] = meta("attention.sliding_window")
    if meta("rope.scaling.original_context_length") is not None:
        extras["original_max_position_embeddings"] = meta("rope.scaling.original_context_length")
    head_dim = meta("embedding_length") // meta("attention.head_count")
    rotary = meta("rope.dimension_count", head_dim)
    if rotary != head_dim:  # Phi-4-mini rotates 3/4 of each head
        extras["partial_rotary_factor"] = rotary / head_dim
    return extras


def _granite_extras(meta: Callable[..., Any]) -> dict[str, Any]:
    # The converter renames Granite's multipliers to scales and writes only those that are not zero.
    keys = {
        "embedding_scale": "embedding_multiplier",
        "residual_scale": "residual_multiplier",
        "attention.scale": "attention_multiplier",
        "logit_scale": "logits_scaling",
    }
    return {hf: meta(key) for key, hf in keys.items() if meta(key) is not None}


def _moe_extras(meta: Callable[..., Any], model_type: str) -> dict[str, Any]:
    extras = {
        "model_type": model_type,
        "num_experts": meta("expert_count"),
        "num_experts_per_tok": meta("expert_used_count"),
        "use_sliding_window": False,
    }
    if model_type != "mixtral":  # Mixtral's experts are feed_forward_length wide
        extras["moe_intermediate_size"] = meta("expert_feed_forward_length")
        # llama.cpp renormalises the top-k weights for qwen3moe, not for qwen2moe, unless the file says
        extras["norm_topk_prob"] = meta("expert_weights_norm", model_type == "qwen3_moe")
    if model_type == "qwen2_moe":
        extras["shared_expert_intermediate_size"] = meta("expert_shared_feed_forward_length")
    return extras


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
    factors = {
        ROPE_FACTOR_TENSORS[t.name]: _dequantize(t).tolist()
        for t in reader.tensors
        if t.name in ROPE_FACTOR_TENSORS
    }
    if factors:
        config["rope_scaling"] = {"rope_type": "longrope", **factors}
    freqs = [t for t in reader.tensors if t.name == ROPE_FREQS_TENSOR]
    if freqs:  # Llama 3.1+: the converter writes llama3 rope scaling as each frequency's divisor
        config["rope_scaling"] = {"rope_type": "freq_factors", "factors": _dequantize(freqs[0]).tolist()}
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


def check_tensors(reader: GGUFFile, config, path: Path) -> None:
    """The file's tensors agree with its metadata (``config``, a checked `ModelConfig`), before anything is
    allocated or read: one block of tensors per layer, and a token embedding of the vocabulary's size."""
    blocks = {
        int(n.split(".")[1])
        for n in (t.name for t in reader.tensors)
        if n.split(".")[0] == "blk" and n.split(".")[1].isdigit()
    }
    if blocks != set(range(config.num_hidden_layers)):
        held = f"blk.0 to blk.{max(blocks)}" if blocks else "none"
        raise ValueError(
            f"{path.name}: block_count says {config.num_hidden_layers} layers, but the file holds tensors for "
            f"{len(blocks)} ({held})"
        )
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError(f"{path.name}: the file has no token embedding (token_embd.weight)")
    expected = (config.vocab_size, config.hidden_size)
    if embedding.shape != expected:
        raise ValueError(
            f"{path.name}: the token embedding is {list(embedding.shape)}, but the metadata says a vocabulary of "
            f"{config.vocab_size} tokens of width {config.hidden_size}"
        )


def hf_name(gguf_name: str, arch: str | None = None) -> str | None:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    names = {**LAYER_NAMES, **ARCH_LAYER_NAMES[arch]} if arch in ARCH_LAYER_NAMES else LAYER_NAMES
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}"
    if m := _PER_EXPERT.fullmatch(gguf_name):
        return f"model.layers.{m[1]}.mlp.experts.{m[3]}.{m[2]}_proj.weight"
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


def _keepable(tensor: GGUFTensor, arch: str, name: str) -> bool:
    """Whether a tensor can go to a quantized module as raw blocks: block-quantized, a matrix, rows that can be
    unpermuted whole, and no fix to apply to its float values."""
    stack = len(tensor.shape) == 3 and ".mlp.experts." in name  # an MoE layer's experts, stacked
    if (len(tensor.shape) != 2 and not stack) or tensor.ggml_type not in gguf_dequant.FAST_TYPES:
        return False
    if tensor.ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return False
    probe = torch.empty(0, device="meta")
    return arch not in TENSOR_FIXES or TENSOR_FIXES[arch](name, probe) is probe


def kept_names(reader: GGUFFile, config: dict[str, Any], types: Collection[str]) -> set[str]:
    """Hugging Face names of the tensors that can come as raw blocks of one of ``types`` (type names)."""
    arch = field_value(reader, "general.architecture")
    names = set()
    for tensor in reader.tensors:
        name = hf_name(tensor.name, arch)
        if name is None or tensor.ggml_type.name not in types:
            continue
        heads = _permuted_heads(arch, name, config)
        if (heads is None or tensor.shape[0] % (2 * heads) == 0) and _keepable(tensor, arch, name):
            names.add(name)
    return names


def tensor_bytes(reader: GGUFFile) -> dict[str, int]:
    """Hugging Face name -> bytes of that tensor in the file."""
    arch = field_value(reader, "general.architecture")
    named = ((hf_name(t.name, arch), t.n_bytes) for t in reader.tensors)
    return {name: n for name, n in named if name is not None}


def _permuted_heads(arch: str, name: str, config: dict[str, Any]) -> int | None:
    """Heads of a q/k projection that llama.cpp stores with its rows permuted (None: stored as it is)."""
    if arch in PERMUTED_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
        return config["num_attention_heads"]
    if arch in PERMUTED_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
        return config["num_key_value_heads"]
    return None


def read_gguf_tensors(
    reader: GGUFFile,
    config: dict[str, Any],
    path: Path,
    keep_quantized: Collection[str] = (),
    in_place: bool = False,
) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
    """(Hugging Face name, float32 tensor) per tensor; block-quantized tensors named in ``keep_quantized`` come
    as their raw blocks (`GGUFBlocks`, rows already in Hugging Face order) for a quantized module to keep.
    ``in_place``: the modules keep those blocks as they are, views on the file's memory map (its pages stay)."""
    try:
        yield from _read_tensors(reader, config, path, keep_quantized, in_place)
    finally:
        reader.close()  # this reader's map; views handed out (in_place) keep the file mapped


def _read_tensors(
    reader: GGUFFile,
    config: dict[str, Any],
    path: Path,
    keep_quantized: Collection[str] = (),
    in_place: bool = False,
) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
    arch = field_value(reader, "general.architecture")
    for tensor in reader.tensors:
        if tensor.name in ROPE_FACTOR_TENSORS or tensor.name == ROPE_FREQS_TENSOR:
            continue  # read into the config
        name = hf_name(tensor.name, arch)
        if name is None:
            raise ValueError(f"{path.name}: unexpected tensor {tensor.name!r} for architecture {arch!r}")
        heads = _permuted_heads(arch, name, config)
        shape = tensor.shape
        whole_rows = heads is None or shape[0] % (2 * heads) == 0
        if name in keep_quantized and whole_rows and _keepable(tensor, arch, name):
            raw = tensor.torch_bytes().view(math.prod(shape[:-1]), -1)  # a row of blocks per output
            if heads is not None:
                raw = _unpermute_rows(raw, heads)
            yield name, GGUFBlocks(raw, tensor.ggml_type, shape)
            if not in_place or heads is not None:
                reader.release(tensor)  # its blocks are in the model now (a copy)
            continue
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
        reader.release(tensor)
