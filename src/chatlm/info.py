"""``chatlm info``: what a model is and what it costs, read off its files without loading any weights.

The figures come from the config and the tensors' shapes and types in the safetensors headers or the GGUF tensor
infos, so this is instant even for models far larger than memory. The config is the engine's own reading of it
(`ModelConfig`, from config.json or from the GGUF metadata as the loader converts it), so that, for instance, the
layers counted as sliding-window ones are those the models build with a window.

- parameters: every stored tensor once (a tied ``lm_head`` counts once, as ``num_parameters()`` does). For a
  mixture of experts, the *active* parameters per token count each expert tensor by experts-per-token / experts:
  the "8x7B" (experts x one expert's model) and "141B-A35B" (total - active) readings follow from those.
- memory for the weights at float32 / bfloat16 (4 / 2 bytes per parameter), 8-bit / 4-bit (1 / 0.5 byte per
  parameter; a real format's block scales add a few percent) and as stored (the bytes of the tensors on disk).
- KV cache: ``2 * layers * kv_heads * head_dim * bytes`` per token, at the dtype chatlm would run the model in.
- decode speed: decoding is bound by memory bandwidth, since each token reads every active weight and the whole
  KV cache once; the estimate is bandwidth / those bytes, with bandwidth measured here by one large copy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .loading.memory_plan import available_bytes
from .models.config import ModelConfig
from .utils import format_bytes

# Bytes per parameter of the figures given for every model.
WEIGHT_FORMATS = {"float32": 4.0, "bfloat16": 2.0, "8-bit": 1.0, "4-bit": 0.5}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "moe_topk", "num_selected_experts")
_BANDWIDTH_BYTES = 256 << 20


@dataclass
class _Tensor:
    name: str
    elements: int
    nbytes: int
    stored_type: str
    expert: bool  # one of the routed experts' tensors (a MoE layer's ``experts``, a GGUF ``*_exps``)


@dataclass
class ModelInfo:
    """What ``chatlm info`` reports; ``to_dict()`` is its JSON."""

    name: str
    path: str
    format: str  # "safetensors" or "gguf"
    model_type: str | None
    architecture: str | None  # config.json's architectures[0], or the GGUF general.architecture
    supported: bool  # whether chatlm has this architecture
    total_parameters: int
    active_parameters: int  # per token: equals total_parameters for a dense model
    num_experts: int | None
    experts_per_token: int | None
    size_label: str  # "135M", or "8x7.2B / 47B-A13B" for a mixture of experts
    stored_types: dict[str, int]  # stored type (BF16, Q4_K, ...) -> parameters stored in it
    stored_bytes: int
    # "as stored", "float32", "bfloat16", "8-bit", "4-bit" -> bytes of all weights
    weights_bytes: dict[str, int]
    active_weights_bytes: dict[str, int]  # the same for the weights one token reads
    context_length: int | None
    chat_template: bool
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    kv_bytes_per_1k_tokens: int  # every layer keeps every token, as chatlm's cache does
    sliding_window: int | None
    sliding_layers: int  # layers that attend only to the last ``sliding_window`` tokens
    estimate_context_tokens: int
    bandwidth_bytes_per_s: float | None
    bandwidth_device: str | None
    # per row of weights_bytes, with the KV cache of estimate_context_tokens
    decode_tokens_per_s: dict[str, float]
    notes: list[str] = field(default_factory=list)
    # memory free here now (the loader's memory plan reads the same; None: unknown), and per row of
    # weights_bytes whether the weights and a KV cache of estimate_context_tokens fit in it
    available_memory_bytes: int | None = None
    fits: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def kv_bytes(self, tokens: int, windowed: bool = False) -> int:
        """KV cache bytes for ``tokens`` tokens; ``windowed`` caps sliding-window layers at their window."""
        per_token_layer = self.kv_bytes_per_1k_tokens // 1000 // max(self.num_layers, 1)
        capped = min(tokens, self.sliding_window) if windowed and self.sliding_window else tokens
        full_layers = self.num_layers - self.sliding_layers
        return per_token_layer * (full_layers * tokens + self.sliding_layers * capped)


def model_info(
    ref: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    context_tokens: int = 1000,
    measure: bool = True,
    device: str | torch.device | None = None,
) -> ModelInfo:
    """Describe a model without loading its weights: a local directory, a .gguf file, a Hub id already in the
    local cache, or None for the bundled model.

    ``dtype`` (float32, bfloat16, float16) is the dtype of the KV cache; by default the one chatlm runs the model
    in with ``torch_dtype="auto"``. ``measure=False`` skips the bandwidth measurement (and the speed estimates);
    ``device`` is where to measure it (default: where ``device_map="auto"`` would put the model).
    """
    from .loading.resolve import resolve_model

    resolved = resolve_model(ref, local_files_only=True)
    if resolved.kind == "gguf":
        facts = _gguf_facts(resolved.path)
    else:
        facts = _hf_facts(resolved.path)
    if dtype is not None and dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPE_BYTES)}")
    kv_dtype = dtype or facts.pop("dtype")
    facts.pop("dtype", None)
    tensors: list[_Tensor] = facts.pop("tensors")
    notes: list[str] = facts.pop("notes")

    total = sum(t.elements for t in tensors)
    expert = sum(t.elements for t in tensors if t.expert)
    expert_bytes = sum(t.nbytes for t in tensors if t.expert)
    stored_bytes = sum(t.nbytes for t in tensors)
    n_experts, per_token = facts.pop("num_experts"), facts.pop("experts_per_token")
    if expert and not (n_experts and per_token):
        notes.append("expert tensors found but no expert counts in the config: active parameters = total")
        fraction = 1.0
    else:
        fraction = per_token / n_experts if expert else 1.0
    active = round(total - expert + expert * fraction)
    label = _short(total)
    if expert and fraction < 1:
        label = (
            f"{n_experts}x{_short(total - expert + expert / n_experts)} / {_short(total)}-A{_short(active)}"
        )

    stored_types: dict[str, int] = {}
    for t in tensors:
        stored_types[t.stored_type] = stored_types.get(t.stored_type, 0) + t.elements
    weights = {"as stored": stored_bytes, **{k: round(total * b) for k, b in WEIGHT_FORMATS.items()}}
    active_weights = {
        "as stored": round(stored_bytes - expert_bytes + expert_bytes * fraction),
        **{k: round(active * b) for k, b in WEIGHT_FORMATS.items()},
    }

    layers, kv_heads, head_dim = facts["num_layers"], facts["num_kv_heads"], facts["head_dim"]
    # Keys and values: kv_heads * head_dim each, per layer and token (chatlm's KVCache shape).
    kv_per_1k = 2 * layers * kv_heads * head_dim * _DTYPE_BYTES[kv_dtype] * 1000

    info = ModelInfo(
        name=resolved.name,
        path=str(resolved.path),
        total_parameters=total,
        active_parameters=active,
        num_experts=n_experts if expert else None,
        experts_per_token=per_token if expert else None,
        size_label=label,
        stored_types=stored_types,
        stored_bytes=stored_bytes,
        weights_bytes=weights,
        active_weights_bytes=active_weights,
        kv_dtype=kv_dtype,
        kv_bytes_per_1k_tokens=kv_per_1k,
        estimate_context_tokens=context_tokens,
        bandwidth_bytes_per_s=None,
        bandwidth_device=None,
        decode_tokens_per_s={},
        notes=notes,
        **facts,
    )
    if info.sliding_layers:
        info.notes.append(
            f"{info.sliding_layers} of {layers} layers attend to the last {info.sliding_window} tokens only: past "
            "that, a cache that drops old entries needs the window for them, not the whole context (chatlm's "
            "cache keeps every token)"
        )
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info.available_memory_bytes = available_bytes(where)
    if info.available_memory_bytes is not None:
        kv = info.kv_bytes(context_tokens)
        info.fits = {k: v + kv <= info.available_memory_bytes for k, v in weights.items()}
    if measure:
        info.bandwidth_device = str(where)
        info.bandwidth_bytes_per_s = memory_bandwidth(str(where))
        kv = info.kv_bytes(context_tokens)
        info.decode_tokens_per_s = {
            k: info.bandwidth_bytes_per_s / (v + kv) for k, v in active_weights.items() if v + kv > 0
        }
    return info


@functools.cache
def memory_bandwidth(device: str = "cpu") -> float:
    """Bytes per second one large copy moves on ``device`` (read plus write), best of a few; once per process."""
    where = torch.device(device)
    src = torch.ones(_BANDWIDTH_BYTES, dtype=torch.uint8, device=where)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults, not bandwidth
    best = float("inf")
    for _ in range(4):
        if where.type == "cuda":
            torch.cuda.synchronize(where)
        start = time.perf_counter()
        dst.copy_(src)
        if where.type == "cuda":
            torch.cuda.synchronize(where)
        best = min(best, time.perf_counter() - start)
    return 2 * _BANDWIDTH_BYTES / best


# --- the files ----------------------------------------------------------------------------------------------
def _config_facts(config: ModelConfig) -> dict[str, Any]:
    """The figures that come from the config, read as the engine reads it (`ModelConfig`)."""
    keys = config.to_dict()
    window_layers = config.sliding_window_layers
    return {
        "context_length": config.max_position_embeddings,
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "sliding_window": config.sliding_window if window_layers else None,
        "sliding_layers": len(window_layers),
        "num_experts": next((keys[k] for k in _EXPERT_COUNT_KEYS if keys.get(k)), None),
        "experts_per_token": next((keys[k] for k in _EXPERTS_PER_TOKEN_KEYS if keys.get(k)), None),
    }


def _hf_facts(directory: Path) -> dict[str, Any]:
    from .loading.safetensors_weights import safetensors_files
    from .models import ARCHITECTURES

    config_path = directory / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} does not hold a JSON object")
    model_type = raw.get("model_type")
    text = raw
    if model_type not in ARCHITECTURES and isinstance(raw.get("text_config"), dict):
        text = {**raw, **raw["text_config"]}  # a multimodal checkpoint: the language model's numbers
    # Rope changes no figure here, and a scaling that chatlm cannot run yet must not stop the report.
    config = ModelConfig.from_dict(
        {k: v for k, v in text.items() if k not in ("rope_scaling", "rope_parameters")}
    )
    notes = []
    if raw.get("quantization_config"):
        notes.append(
            "the checkpoint is quantized (quantization_config): packed tensors make counts approximate"
        )
    tensors = []
    for file in safetensors_files(directory):
        for name, entry in _safetensors_header(file).items():
            if name == "__metadata__" or name.endswith("rotary_emb.inv_freq"):
                continue  # metadata, and a buffer that some old checkpoints saved
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue  # the embedding, counted once
            start, end = entry["data_offsets"]
            tensors.append(
                _Tensor(
                    name, _prod(entry["shape"]), end - start, entry["dtype"], "experts" in name.split(".")
                )
            )
    dtype = str(config.torch_dtype or "float32").replace("torch.", "")
    return {
        "format": "safetensors",
        "model_type": model_type,
        "architecture": (raw.get("architectures") or [None])[0],
        "supported": model_type in ARCHITECTURES,
        "chat_template": _hf_has_template(directory),
        **_config_facts(config),
        "dtype": dtype if dtype in _DTYPE_BYTES else "float32",
        "tensors": tensors,
        "notes": notes,
    }


def _safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header: name -> {dtype, shape, data_offsets}, read without touching the data."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 << 20:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cannot read {path}: not a valid safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"cannot read {path}: not a valid safetensors file")
    return header


def _hf_has_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (json.JSONDecodeError, AttributeError):
        return False


def _gguf_facts(path: Path) -> dict[str, Any]:
    from .loading.gguf_model import ARCHITECTURES, gguf_config, open_gguf

    reader = open_gguf(path)
    meta = reader.metadata
    arch = meta.get("general.architecture")
    tensors = [
        _Tensor(t.name, t.n_elements, t.n_bytes, t.ggml_type.name, t.name.split(".")[-2].endswith("_exps"))
        for t in reader.tensors
        if t.name != "rope_freqs.weight"  # llama 3 rope factors: a table, not parameters
    ]
    notes = []
    if arch in ARCHITECTURES:  # the config the loader derives from the metadata
        facts = _config_facts(ModelConfig.from_dict(gguf_config(reader, path)))
    else:
        facts = _unsupported_gguf_facts(lambda key, default=None: meta.get(f"{arch}.{key}", default), notes)
    return {
        "format": "gguf",
        "model_type": ARCHITECTURES.get(arch, arch),
        "architecture": arch,
        "supported": arch in ARCHITECTURES,
        "chat_template": bool(meta.get("tokenizer.chat_template")),
        **facts,
        # chatlm computes a GGUF's weights in float32 unless asked otherwise.
        "dtype": "float32",
        "tensors": tensors,
        "notes": notes,
    }


def _unsupported_gguf_facts(get: Any, notes: list[str]) -> dict[str, Any]:
    """The figures of an architecture that chatlm has no config for, from the metadata keys llama.cpp shares."""
    heads = get("attention.head_count") or 1
    if isinstance(heads, list):  # per-layer head counts: the first
        heads = heads[0]
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        kv_heads = max(kv_heads)
    head_dim = get("attention.key_length") or (get("embedding_length", 0) // heads)
    value_dim = get("attention.value_length") or head_dim
    if value_dim != head_dim:
        notes.append(f"keys are {head_dim} wide and values {value_dim}: the KV figures use their mean")
    window, layers = get("attention.sliding_window"), get("block_count", 0)
    return {
        "context_length": get("context_length"),
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": (head_dim + value_dim) // 2,
        # A window is given, but not which layers use it: count them all.
        "sliding_window": window or None,
        "sliding_layers": layers if window else 0,
        "num_experts": get("expert_count"),
        "experts_per_token": get("expert_used_count"),
    }


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- output -------------------------------------------------------------------------------------------------
def _short(n: float) -> str:
    """A parameter count the way model names write it: 135M, 7.2B, 47B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            text = f"{value:.0f}" if value >= 10 else f"{value:.1f}".rstrip("0").rstrip(".")
            return text + unit
    return str(int(n))


def _share(part: int, whole: int) -> str:
    share = part / whole if whole else 0.0
    return "<1%" if 0 < share < 0.01 else f"{share:.0%}"


def format_info(info: ModelInfo) -> str:
    """The report ``chatlm info`` prints."""
    lines = [f"{info.name} ({info.format}: {info.path})"]

    def row(key: str, value: str) -> None:
        lines.append(f"  {key:<17}{value}")

    arch = info.model_type or "?"
    if info.architecture and info.architecture != info.model_type:
        arch += f" ({info.architecture})"
    row("architecture", arch + ("" if info.supported else " - not supported by chatlm yet"))
    params = f"{info.total_parameters:,} ({info.size_label})"
    if info.num_experts:
        params += (
            f"; {info.num_experts} experts, {info.experts_per_token} per token: "
            f"{info.active_parameters:,} active per token"
        )
    row("parameters", params)
    row("context length", f"{info.context_length:,} tokens" if info.context_length else "unknown")
    row("chat template", "yes" if info.chat_template else "no")
    row(
        "KV cache",
        f"{format_bytes(info.kv_bytes_per_1k_tokens)} per 1,000 tokens ({info.kv_dtype}; {info.num_layers} layers x "
        f"{info.num_kv_heads} KV heads x {info.head_dim} head dim x 2)",
    )
    shares = sorted(info.stored_types.items(), key=lambda kv: -kv[1])
    row("stored as", ", ".join(f"{k} {_share(v, info.total_parameters)}" for k, v in shares))
    speed = "est. decode" if info.decode_tokens_per_s else ""
    fits = "fits here" if info.fits else ""
    lines.append(f"  {'weights':<15}{'memory':>10}{'per token':>12}{fits:>11}{speed:>16}")
    for key, size in info.weights_bytes.items():
        tps = info.decode_tokens_per_s.get(key)
        fit = ("yes" if info.fits[key] else "no") if info.fits else ""
        lines.append(
            f"    {key:<13}{format_bytes(size):>10}{format_bytes(info.active_weights_bytes[key]):>12}{fit:>11}"
            + (f"{tps:>10.1f} tok/s" if tps is not None else "")
        )
    if info.available_memory_bytes is not None:
        lines.append(
            f"  memory available here: {format_bytes(info.available_memory_bytes)} (fits: the weights and a KV cache of "
            f"{info.estimate_context_tokens:,} tokens)"
        )
    if info.bandwidth_bytes_per_s:
        lines.append(
            f"  decode estimates: {format_bytes(info.bandwidth_bytes_per_s)}/s measured on {info.bandwidth_device} / "
            f"(weights per token + KV cache of {info.estimate_context_tokens:,} tokens); upper bounds"
        )
        lines.append(
            "  chatlm runs each row: as stored (a GGUF's own blocks, the CLI's default for a .gguf), float32 / "
            "bfloat16 (torch_dtype), 8-bit / 4-bit (QuantizationConfig)"
        )
    lines.extend(f"  note: {note}" for note in info.notes)
    return "\n".join(lines)
