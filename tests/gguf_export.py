"""Write a tiny Hugging Face checkpoint to GGUF the way llama.cpp's ``convert_hf_to_gguf.py`` does (a test helper).

The gguf package is the independent oracle: tensor names come from its own tables
(``gguf.get_tensor_name_map`` / ``TensorNameMap.get_name``), never from chatlm's maps, so that a round trip
HF -> GGUF -> chatlm tests chatlm's reading of names, layouts and metadata.

    export_gguf(tiny_checkpoints["llama"], tmp_path / "tiny.gguf", "llama", tensor_type="Q8_0",
                tokenizer_dir=tiny_checkpoints["llama"])

Adding an architecture: add an ``ArchHooks`` entry to ``ARCHS`` keyed by the Hugging Face ``model_type``.

- ``arch``: the ``gguf.MODEL_ARCH`` whose tensor table and metadata prefix the file uses.
- ``tensors(state, config)``: turns the HF state dict (numpy float32, HF layout) into what the converter writes,
  ``{name: array}``. A name may stay a Hugging Face name (mapped through gguf's ``TensorNameMap``) or already be
  a GGUF name of the arch (``gguf_tensor_name(...)`` builds one from gguf's tables). This is where the converter's
  quirks go: q/k row permutation (llama), norms stored as 1 + weight (gemma), fused qkv / gate_up (phi3),
  experts stacked into one 3-D tensor per layer (MoE: ``blk.N.ffn_{gate,up,down}_exps``).
- ``metadata(writer, config)``: keys beyond the common ones (sliding window, expert counts, softcaps, ...).

Tensor types follow the converter: 1-D tensors (norms, biases) stay F32; other tensors get ``tensor_type``, with
F16 as the fallback where a Q8_0 row is not a whole number of 32-value blocks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class ArchHooks:
    arch: gguf.MODEL_ARCH
    tensors: Callable[[State, Any], State] = lambda state, config: state
    metadata: Callable[[gguf.GGUFWriter, Any], None] = lambda writer, config: None


def gguf_tensor_name(
    arch: gguf.MODEL_ARCH, tensor: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight"
) -> str:
    """A GGUF tensor name from gguf's own tables (for hooks that emit tensors HF has no name for)."""
    if tensor not in gguf.MODEL_TENSORS[arch]:
        raise ValueError(f"{tensor.name} is not a tensor of {arch.name} in gguf's tables")
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + suffix


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: interleave each head's two rotary halves (rows; biases too)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_tensors(state: State, config: Any) -> State:
    out = {}
    for name, w in state.items():
        if ".self_attn.q_proj." in name:
            w = permute_rows(w, config.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            w = permute_rows(w, config.num_key_value_heads)
        out[name] = w
    rope = _rope_parameters(config) or (getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type") == "llama3":  # Llama 3.1+: the converter writes each frequency's divisor
        out[gguf_tensor_name(gguf.MODEL_ARCH.LLAMA, gguf.MODEL_TENSOR.ROPE_FREQS)] = _llama3_divisors(
            config, rope
        )
    return out


def _llama3_divisors(config: Any, rope: dict) -> np.ndarray:
    """llama3 rope scaling as a divisor per frequency: 1 for short wavelengths, ``factor`` for long ones, and
    between them the inverse of the smooth blend (what transformers multiplies the frequency by)."""
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / _rope_theta(config) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blended))
    return divisors.astype(np.float32)


def _gemma_tensors(state: State, config: Any) -> State:
    # Gemma's norms multiply by 1 + weight; the converter stores that factor (every *norm.weight, q/k norms too).
    return {name: w + 1 if name.endswith("norm.weight") else w for name, w in state.items()}


def _gemma2_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    # No query_pre_attn_scalar: llama.cpp takes 1/sqrt(key_length) (hidden/heads for the 27B).
    writer.add_sliding_window(config.sliding_window)
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _gemma3_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    # The converter writes neither the sliding layers' rope base (llama.cpp: 10000) nor the pattern (6).
    writer.add_sliding_window(config.sliding_window)


# --- mixture of experts: the converter stacks each projection of a layer's experts into one (E, out, in) tensor
_EXPERT = re.compile(
    r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\."
    r"(?:(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight|(gate_up_proj|down_proj))"
)
_EXPERT_TENSOR = {
    "w1": gguf.MODEL_TENSOR.FFN_GATE_EXP,
    "gate_proj": gguf.MODEL_TENSOR.FFN_GATE_EXP,
    "w3": gguf.MODEL_TENSOR.FFN_UP_EXP,
    "up_proj": gguf.MODEL_TENSOR.FFN_UP_EXP,
    "w2": gguf.MODEL_TENSOR.FFN_DOWN_EXP,
    "down_proj": gguf.MODEL_TENSOR.FFN_DOWN_EXP,
}


def _stacked_experts(
    arch: gguf.MODEL_ARCH, then: Callable[[State, Any], State] = lambda state, config: state
):
    """A tensors hook: per-expert HF tensors (a checkpoint's) or transformers 5's fused stacks (a model's) become
    blk.N.ffn_{gate,up,down}_exps; ``then`` runs on the rest."""

    def tensors(state: State, config: Any) -> State:
        rest, out, pieces = {}, {}, {}
        for name, w in state.items():
            m = _EXPERT.fullmatch(name)
            if m is None:
                rest[name] = w
            elif m[4] == "gate_up_proj":  # gate rows, then up rows
                gate, up = np.split(w, 2, axis=1)
                out[gguf_tensor_name(arch, gguf.MODEL_TENSOR.FFN_GATE_EXP, int(m[1]))] = gate
                out[gguf_tensor_name(arch, gguf.MODEL_TENSOR.FFN_UP_EXP, int(m[1]))] = up
            elif m[4] == "down_proj":
                out[gguf_tensor_name(arch, gguf.MODEL_TENSOR.FFN_DOWN_EXP, int(m[1]))] = w
            else:
                pieces.setdefault(gguf_tensor_name(arch, _EXPERT_TENSOR[m[3]], int(m[1])), {})[int(m[2])] = w
        out.update({name: np.stack([e[i] for i in sorted(e)]) for name, e in pieces.items()})
        return {**then(rest, config), **out}

    return tensors


def _moe_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_expert_count(config.num_experts)  # mixtral and qwen3_moe alias it to num_local_experts
    writer.add_expert_used_count(config.num_experts_per_tok)
    if hasattr(config, "moe_intermediate_size"):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if hasattr(config, "shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def _phi3_tensors(state: State, config: Any) -> State:
    # qkv_proj and gate_up_proj keep their fused layout (attn_qkv, ffn_up); longrope factors become two tensors.
    rope = _rope_parameters(config)
    if rope.get("rope_type") != "longrope":
        return state
    arch = gguf.MODEL_ARCH.PHI3
    return {
        **state,
        gguf_tensor_name(arch, gguf.MODEL_TENSOR.ROPE_FACTORS_LONG): np.asarray(
            rope["long_factor"], np.float32
        ),
        gguf_tensor_name(arch, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT): np.asarray(
            rope["short_factor"], np.float32
        ),
    }


def _phi3_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    rope = _rope_parameters(config)
    original = config.original_max_position_embeddings
    rotary = int(rope.get("partial_rotary_factor", 1.0) * config.hidden_size) // config.num_attention_heads
    writer.add_rope_dimension_count(rotary)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_sliding_window(config.sliding_window or 0)  # 0: none
    if rope.get("rope_type") == "longrope":
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        )


def _granite_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_embedding_scale(config.embedding_multiplier)
    writer.add_residual_scale(config.residual_multiplier)
    writer.add_attention_scale(config.attention_multiplier)
    writer.add_logit_scale(config.logits_scaling)


ARCHS: dict[str, ArchHooks] = {
    "llama": ArchHooks(gguf.MODEL_ARCH.LLAMA, tensors=_llama_tensors),
    # The converter writes Mistral as llama (same permutation) and drops its sliding window.
    "mistral": ArchHooks(gguf.MODEL_ARCH.LLAMA, tensors=_llama_tensors),
    "qwen2": ArchHooks(gguf.MODEL_ARCH.QWEN2),
    "gemma": ArchHooks(gguf.MODEL_ARCH.GEMMA, tensors=_gemma_tensors),
    "gemma2": ArchHooks(gguf.MODEL_ARCH.GEMMA2, tensors=_gemma_tensors, metadata=_gemma2_metadata),
    "gemma3_text": ArchHooks(gguf.MODEL_ARCH.GEMMA3, tensors=_gemma_tensors, metadata=_gemma3_metadata),
    "qwen3": ArchHooks(gguf.MODEL_ARCH.QWEN3),  # llama.cpp has no sliding window for qwen3
    "phi3": ArchHooks(gguf.MODEL_ARCH.PHI3, tensors=_phi3_tensors, metadata=_phi3_metadata),
    "olmo2": ArchHooks(gguf.MODEL_ARCH.OLMO2),
    "granite": ArchHooks(gguf.MODEL_ARCH.GRANITE, tensors=_llama_tensors, metadata=_granite_metadata),
    # Mixtral is llama (q/k permuted) with experts; llama.cpp assumes every qwen MoE layer sparse.
    "mixtral": ArchHooks(
        gguf.MODEL_ARCH.LLAMA,
        tensors=_stacked_experts(gguf.MODEL_ARCH.LLAMA, _llama_tensors),
        metadata=_moe_metadata,
    ),
    "qwen2_moe": ArchHooks(
        gguf.MODEL_ARCH.QWEN2MOE, tensors=_stacked_experts(gguf.MODEL_ARCH.QWEN2MOE), metadata=_moe_metadata
    ),
    "qwen3_moe": ArchHooks(
        gguf.MODEL_ARCH.QWEN3MOE, tensors=_stacked_experts(gguf.MODEL_ARCH.QWEN3MOE), metadata=_moe_metadata
    ),
}

TENSOR_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
    "Q4_1": gguf.GGMLQuantizationType.Q4_1,
    "Q5_0": gguf.GGMLQuantizationType.Q5_0,
}


def _load(hf_model_or_dir: Any) -> tuple[Any, State]:
    """(transformers config, float32 numpy state dict without tied duplicates) of a model or a checkpoint dir."""
    if isinstance(hf_model_or_dir, (str, Path)):
        import transformers
        from safetensors.torch import load_file

        root = Path(hf_model_or_dir)
        config = transformers.AutoConfig.from_pretrained(root)
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(root.glob("*.safetensors")):
            tensors.update(load_file(file))
    else:
        config = hf_model_or_dir.config
        tensors = dict(hf_model_or_dir.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # the converter writes no output tensor for tied embeddings
    return config, {k: v.detach().float().cpu().numpy() for k, v in tensors.items()}


def _rope_parameters(config: Any) -> dict:
    # Per attention type (Gemma 3): the converter writes the global layers' rope (sliding ones are implied).
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("full_attention", rope)


def _rope_theta(config: Any) -> float:
    rope = _rope_parameters(config)
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _common_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type not in ("default", "longrope", "llama3"):  # longrope, llama3: tensors the hooks write
        raise NotImplementedError(f"export_gguf: rope type {rope_type!r}")
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(config, key, None)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            add(value)


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int, pre: str) -> None:
    """gpt2 (byte-level BPE) tokenizer metadata as the converter's get_vocab_base writes it."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE":
        raise NotImplementedError("export_gguf: only byte-level BPE tokenizers")
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    types = dict.fromkeys(by_id, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    tokens, token_types = [], []
    for i in range(vocab_size):  # the converter pads a vocabulary shorter than the model's with [PADn]
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    config_file = tokenizer_dir / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    template_file = tokenizer_dir / "chat_template.jinja"
    template = (
        template_file.read_text(encoding="utf-8")
        if template_file.is_file()
        else tok_config.get("chat_template")
    )
    if template:
        writer.add_chat_template(template)


def encode_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks (rows, k / 256 * 144 bytes) of a float (rows, k) matrix: per 32 values a 6-bit scale and min
    under the block's f16 ``d`` and ``dmin``, 4-bit values; a plain min/max fit (the gguf package has no K-quant
    encoder; the tests compare against the dequantized file, so the fit only needs to be close)."""
    rows, k = w.shape
    g = w.astype(np.float32).reshape(rows, k // 256, 8, 32)
    lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
    scale, low = (hi - lo) / 15, -lo
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (low.max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[..., None], dmin.astype(np.float32)[..., None]
    sc = np.clip(np.round(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(
        np.uint8
    )
    m = np.clip(np.round(np.divide(low, dminf, out=np.zeros_like(low), where=dminf > 0)), 0, 63).astype(
        np.uint8
    )
    step = (df * sc)[..., None]
    q = np.divide(g + (dminf * m)[..., None], step, out=np.zeros_like(g), where=step > 0)
    q = np.clip(np.round(q), 0, 15).astype(np.uint8)
    packed = np.zeros((rows, k // 256, 12), np.uint8)
    packed[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(rows, k // 256, 128)
    heads = np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8)], -1)
    return np.concatenate([heads, packed, qs], -1).reshape(rows, -1)


def encode_q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K blocks (rows, k / 256 * 210 bytes): per 16 values an int8 scale under the block's f16 ``d``, 6-bit
    values stored as low nibbles and 2-bit high parts."""
    rows, k = w.shape
    g = w.astype(np.float32).reshape(rows, k // 256, 16, 16)
    scale = np.abs(g).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)[..., None]
    sc = np.clip(np.round(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), -128, 127)
    step = (df * sc)[..., None]
    q = np.round(np.divide(g, step, out=np.zeros_like(g), where=step > 0))
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8)
    q0, q1, q2, q3 = q.reshape(rows, k // 256, 2, 4, 32).transpose(3, 0, 1, 2, 4)  # value 128 half + 32 i + l
    ql = np.concatenate([q0 & 15 | (q2 & 15) << 4, q1 & 15 | (q3 & 15) << 4], -1)
    qh = q0 >> 4 | (q1 >> 4) << 2 | (q2 >> 4) << 4 | (q3 >> 4) << 6
    parts = [ql.reshape(rows, k // 256, 128), qh.reshape(rows, k // 256, 64)]
    parts += [sc.astype(np.int8).view(np.uint8), d[..., None].view(np.uint8)]
    return np.concatenate(parts, -1).reshape(rows, -1)


K_ENCODERS = {gguf.GGMLQuantizationType.Q4_K: encode_q4_k, gguf.GGMLQuantizationType.Q6_K: encode_q6_k}


def q4_k_m_like(name: str) -> gguf.GGMLQuantizationType:
    """A Q4_K_M-like mix: Q6_K for attention values and MLP down projections (llama.cpp gives half of them
    Q6_K), Q8_0 for the embedding, Q4_K for the rest."""
    if name.endswith(("v_proj.weight", "down_proj.weight")):
        return gguf.GGMLQuantizationType.Q6_K
    if "embed_tokens" in name:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.Q4_K


def _encode(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if w.ndim <= 1 or qtype == gguf.GGMLQuantizationType.F32:
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16), qtype
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if w.shape[-1] % block:
        return w.astype(np.float16), gguf.GGMLQuantizationType.F16
    if qtype in K_ENCODERS:
        return K_ENCODERS[qtype](w.reshape(-1, w.shape[-1])).reshape(*w.shape[:-1], -1), qtype
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def quantize_dequantize(w: np.ndarray, tensor_type: str) -> np.ndarray:
    """What a float32 HF tensor becomes after export with ``tensor_type`` and the gguf package's dequantizer
    (row permutations commute with row-wise quantization, so HF layout is fine)."""
    data, qtype = _encode(np.asarray(w, dtype=np.float32), TENSOR_TYPES[tensor_type])
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, qtype).reshape(w.shape)


def export_gguf(
    hf_model_or_dir: Any,
    path: str | Path,
    arch: str,
    tensor_type: str = "F32",
    tokenizer_dir: str | Path | None = None,
    tokenizer_pre: str = "gpt-2",
) -> Path:
    """Write a transformers model (or a checkpoint directory) as a GGUF file; ``arch`` is the HF model_type."""
    if arch not in ARCHS:
        raise NotImplementedError(f"export_gguf: no hooks for {arch!r} (have: {', '.join(sorted(ARCHS))})")
    hooks = ARCHS[arch]
    config, state = _load(hf_model_or_dir)
    qtype = TENSOR_TYPES.get(tensor_type)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[hooks.arch])
    _common_metadata(writer, config)
    hooks.metadata(writer, config)
    if tokenizer_dir is not None:
        _tokenizer_metadata(writer, Path(tokenizer_dir), config.vocab_size, tokenizer_pre)

    names = gguf.get_tensor_name_map(hooks.arch, config.num_hidden_layers)
    own = {  # every GGUF name of this arch, for hooks that already emit GGUF names
        gguf.TENSOR_NAMES[t].format(bid=b) + s
        for t in gguf.MODEL_TENSORS[hooks.arch]
        for b in range(config.num_hidden_layers)
        for s in (".weight", ".bias")
    }
    for name, w in hooks.tensors(state, config).items():
        target = name if name in own else names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"export_gguf: gguf's {hooks.arch.name} table has no name for {name!r}")
        data, dtype = _encode(w, q4_k_m_like(name) if tensor_type == "Q4_K_M" else qtype)
        writer.add_tensor(
            target,
            data,
            raw_dtype=None
            if dtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            else dtype,
        )
    writer.add_file_type(
        {
            "F32": gguf.LlamaFileType.ALL_F32,
            "F16": gguf.LlamaFileType.MOSTLY_F16,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
            "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
            "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        }[tensor_type]
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
