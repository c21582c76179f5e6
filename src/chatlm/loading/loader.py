"""The loader behind ``AutoModelForCausalLM.from_pretrained``: build the architecture on the meta device, quantize
or split it as asked, and load the weights straight into it."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Iterable

import torch

from ..generation.config import GenerationConfig
from ..gguf_layers import KEPT_TYPES, keep_gguf_modules
from ..kernels import fused_layer
from ..models import model_class
from ..models.base import CausalLM
from ..models.config import ModelConfig
from ..parallel import tensor_parallel
from ..quantization import QuantizationConfig, check_quantization, quantize_modules, quantized_slots
from . import gguf_model, memory_plan
from .gguf_blocks import GGUFBlocks
from .parts import PartAssembler
from .resolve import ResolvedModel, resolve_model
from .safetensors_weights import read_safetensors, tensor_shapes

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float": torch.float32,
}
# Keywords transformers accepts that change nothing here: we never run code from a model repository, and
# attention always goes through PyTorch's scaled_dot_product_attention.
NO_EFFECT = {"trust_remote_code", "low_cpu_mem_usage", "attn_implementation", "use_safetensors"}
HUB_OPTIONS = {"revision", "token", "cache_dir", "local_files_only"}


def resolve_dtype(dtype, config: ModelConfig) -> torch.dtype:
    """float32 unless asked otherwise (the guide's default); "auto" takes the checkpoint's own dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"torch_dtype {dtype} is not supported (float32, bfloat16 or float16)")
        return dtype
    if dtype == "auto":
        return DTYPES.get(str(config.torch_dtype).replace("torch.", ""), torch.float32)
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"torch_dtype {dtype!r} is not supported: use float32, bfloat16, float16 or 'auto'")


def resolve_device(device_map) -> torch.device:
    """``device_map`` as one device: "auto" is the GPU when there is one; a {"": device} map is accepted."""
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if set(device_map) != {""} or len(devices) != 1:
            raise ValueError("device_map as a dict must put the whole model on one device: {'': device}")
        device_map = devices.pop()
    if device_map is None or device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device_map {device_map!r} is not a device: use 'auto', 'cpu' or 'cuda'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device_map asks for CUDA but no CUDA device is available; use 'cpu' or 'auto'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported: use 'cpu' or 'cuda'")
    return device


def load_state(
    model: CausalLM,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
    source: str,
    shards: dict | None = None,
) -> None:
    """Assign every parameter exactly once, converting each tensor as it arrives (no second full copy).
    Weights of quantized modules go to their ``load_weight``, which quantizes them as they come. ``shards``: the
    tensor-parallel slices of this rank by parameter name (a reader that could not slice is sliced here)."""
    shards = shards or {}
    params = dict(model.named_parameters())
    quantized = quantized_slots(model)
    loaded: set[str] = set()
    parts = PartAssembler(params, dtype, device, source)  # parameters stacked from pieces (MoE experts)
    for origin, tensor in tensors:
        if origin.endswith("rotary_emb.inv_freq"):
            continue  # a buffer old checkpoints saved; we compute it
        # a module that takes this tensor whole as it comes (an MoE layer's GGUF stack kept as stored), else
        # where the model puts it
        name, index = (origin, ()) if origin in quantized else model.checkpoint_slot(origin)
        if name is None:
            continue  # a part of the checkpoint the model does not use (Gemma 3's vision tower)
        if name in shards and (not index or index[0] == slice(None)):  # the whole, or a stack over experts
            tensor = _share(tensor, shards[name])
        if name in quantized and not index:
            if name in loaded:
                raise ValueError(f"{source}: tensor {origin!r} appears twice")
            _check_shape(source, name, tensor.shape, quantized[name].weight_shape)
            quantized[name].load_weight(tensor)
            loaded.add(name)
            continue
        if isinstance(tensor, GGUFBlocks):
            tensor = tensor.dequantize()
        if name not in params:
            raise ValueError(f"{source}: unexpected tensor {origin!r} for a {model.config.model_type} model")
        if name in loaded or (not index and name in parts):
            raise ValueError(f"{source}: tensor {origin!r} appears twice")
        if index:
            tensor = parts.add(name, index, tensor, origin)
            if tensor is None:
                continue  # more pieces to come
        _check_shape(source, name, tensor.shape, params[name].shape)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        loaded.add(name)
    if model.config.tie_word_embeddings and "lm_head.weight" not in loaded:
        model.tie_weights()
        loaded.add("lm_head.weight")
    missing = sorted((set(params) | set(quantized)) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{source}: the checkpoint lacks {shown}")


def _shard_reader(model: CausalLM, shards: dict):
    """For the safetensors reader: the slice of a checkpoint tensor this rank reads (None: all of it). A tensor
    that is one expert of a stack is whole already (the model renumbers or skips it)."""

    def select(origin: str):
        name, index = model.checkpoint_slot(origin)
        if index and index[0] != slice(None):
            return None
        return shards.get(name)

    return select


def _share(tensor, spec) -> torch.Tensor:
    """This rank's share of a tensor (a no-op where the reader already sliced it)."""
    if isinstance(tensor, GGUFBlocks):
        tensor = tensor.dequantize()
    if spec.zero:
        return torch.zeros_like(tensor)
    if spec.dim is not None and tensor.shape[spec.dim] != spec.stop - spec.start:
        tensor = tensor.narrow(spec.dim, spec.start, spec.stop - spec.start)
    return tensor


def _check_layer_count(config: ModelConfig, names: list[str], path) -> None:
    """The checkpoint holds tensors for exactly ``num_hidden_layers`` layers: checked on the headers' names before
    the model (whose size follows the count) is built."""
    layers = {int(m.group(1)) for m in map(_LAYER.search, names) if m}
    if layers != set(range(config.num_hidden_layers)):
        held = f"layers 0 to {max(layers)}" if layers else "no layers"
        raise ValueError(
            f"{path}: config.json says num_hidden_layers = {config.num_hidden_layers}, but the weights hold "
            f"{len(layers)} ({held})"
        )


# the language model's layers ("model.layers.N.", "language_model.layers.N."), not a vision tower's
_LAYER = re.compile(r"(?:^|\.)(?:model|language_model)\.layers\.(\d+)\.")


def _check_header_shapes(model: CausalLM, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Each whole tensor the model takes has the shape the config implies: a 10 GB table that does not match the
    vocabulary is refused from its header, not after it was read."""
    params = {name: p.shape for name, p in model.named_parameters()}
    quantized = quantized_slots(model)
    params.update({name: slot.weight_shape for name, slot in quantized.items()})
    for origin, shape in shapes.items():
        if origin.endswith("rotary_emb.inv_freq"):
            continue
        name, index = (origin, ()) if origin in quantized else model.checkpoint_slot(origin)
        if name in params and not index:
            _check_shape(source, name, shape, params[name])


def _check_shape(source: str, name: str, shape, expected) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"{source}: tensor {name!r} has shape {tuple(shape)}, the config implies {tuple(expected)}"
        )


def load_pretrained(
    pretrained_model_name_or_path: str | os.PathLike | None = None,
    *,
    torch_dtype=None,
    dtype=None,
    device_map=None,
    quantization_config=None,
    gguf_file: str | None = None,
    tp_plan: str | None = None,
    **kwargs,
) -> CausalLM:
    """`AutoModelForCausalLM.from_pretrained`: its arguments checked, the model found, then `load_model`."""
    unknown = sorted(set(kwargs) - NO_EFFECT - HUB_OPTIONS)
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(unknown)}")
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError("pass either torch_dtype or dtype, not both")
    quantization = check_quantization(quantization_config, resolve_device(device_map))
    resolved = resolve_model(
        pretrained_model_name_or_path,
        gguf_file=gguf_file,
        **{k: v for k, v in kwargs.items() if k in HUB_OPTIONS},
    )
    if tp_plan not in (None, "auto"):
        raise ValueError(f"tp_plan must be 'auto' (the architecture's own plan), not {tp_plan!r}")
    return load_model(
        resolved, torch_dtype if torch_dtype is not None else dtype, device_map, quantization, tp_plan
    )


def load_model(
    resolved: ResolvedModel,
    dtype=None,
    device_map=None,
    quantization: QuantizationConfig | None = None,
    tp_plan: str | None = None,
) -> CausalLM:
    device = resolve_device(device_map)
    if resolved.kind == "gguf":
        reader = gguf_model.open_gguf(resolved.path)
        raw = gguf_model.gguf_config(reader, resolved.path)
        config = ModelConfig.from_dict(raw)
        gguf_model.check_tensors(reader, config, resolved.path)
        tensors = None  # read once the model says which weights it takes quantized
        total = len(reader.tensors)
        generation_config = None
    else:
        config = ModelConfig.from_file(resolved.path / "config.json")
        shapes = tensor_shapes(resolved.path)
        _check_layer_count(config, list(shapes), resolved.path)
        tensors = None
        total = None
        has_generation_config = (resolved.path / "generation_config.json").is_file()
        generation_config = GenerationConfig.from_pretrained(resolved.path) if has_generation_config else None
    torch_dtype = resolve_dtype(dtype, config)
    tp = None
    if tp_plan is not None:
        tp = tensor_parallel.plan_for(config.model_type, tensor_parallel.setup(device.type))
        if device.type == "cuda":
            device = torch.device(
                "cuda", int(os.environ.get("LOCAL_RANK", tp.rank % torch.cuda.device_count()))
            )
        tensor_parallel.check_same_model(
            {"source": resolved.name, "config": dataclasses.asdict(config), "dtype": str(torch_dtype)}
            | {"quantization": repr(quantization), "device": device.type}
        )
        config = tensor_parallel.local_config(config, tp)
    in_place = quantization is not None and quantization.keep_gguf_blocks
    if in_place:
        if resolved.kind != "gguf":
            raise ValueError(
                f"keep_gguf_blocks keeps a GGUF file's blocks, and {resolved.name} is not a GGUF file: use "
                "load_in_8bit or load_in_4bit"
            )
        if tp is not None:
            raise ValueError(
                "keep_gguf_blocks does not split over tensor-parallel ranks yet: use load_in_4bit"
            )
    with torch.device("meta"):
        model = model_class(config)(config)
    if in_place:
        keep_gguf_modules(
            model, gguf_model.kept_names(reader, raw, KEPT_TYPES), torch_dtype, quantization.compute_dtype
        )
        model.quantization_config = quantization
    elif quantization is not None:
        quantize_modules(model, quantization, torch_dtype)
    shards = tensor_parallel.shard_specs(model, tp) if tp is not None else {}
    if (
        resolved.kind != "gguf" and tp is None
    ):  # the headers' shapes against the model's, before any data is read
        _check_header_shapes(model, shapes, str(resolved.path))
    if tp is None:  # before anything is allocated (a rank's share is left to the ranks)
        _check_memory(
            model, torch_dtype, quantization, device, resolved, reader if resolved.kind == "gguf" else None
        )
    if resolved.kind == "gguf":
        # GGUF blocks go as they are to the modules that keep them: as stored (keep_gguf_blocks), or as int4
        # (Q4_0/Q4_1/Q4_K with load_in_4bit)
        keep = set(quantized_slots(model)) if quantization is not None else set()
        tensors = gguf_model.read_gguf_tensors(
            reader, raw, resolved.path, keep_quantized=keep - set(shards), in_place=in_place
        )
    else:
        tensors = read_safetensors(resolved.path, _shard_reader(model, shards) if shards else None)
    load_state(
        model,
        _progress(tensors, f"loading {resolved.name}", total),
        torch_dtype,
        device,
        str(resolved.path),
        shards,
    )
    if tp is not None:
        tensor_parallel.attach_all_reduces(model, tp)
    else:  # the fused decode layer skips forward hooks, which carry tensor parallelism's all-reduces
        fused_layer.attach(model)
    if generation_config is not None:
        model.generation_config = generation_config
    model.name_or_path = str(resolved.path)
    return model.eval()


def _check_memory(model, dtype, quantization, device, resolved, reader) -> None:
    stored = gguf_model.tensor_bytes(reader) if reader is not None else {}
    in_place = quantization is not None and quantization.keep_gguf_blocks
    plan = memory_plan.plan_memory(model, dtype, stored if in_place else {})
    asked = f"in {str(dtype).replace('torch.', '')}"
    if quantization is not None:
        asked = f"with {quantization.requested} weights" + ("" if in_place else f" ({asked} elsewhere)")
    gguf_bytes = sum(stored.values()) if reader is not None else None
    memory_plan.check_memory(plan, device, asked, resolved.name, gguf_bytes)


def _progress(items, description: str, total: int | None):
    """A progress bar on a terminal; nothing when stderr is not one (scripts, CI, pipes)."""
    if not sys.stderr.isatty():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, total=total, unit=" tensors", leave=False)
