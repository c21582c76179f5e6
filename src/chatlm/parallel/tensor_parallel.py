"""Tensor parallelism on torch.distributed, applied from a plan (`plans.TP_PLANS`).

Each rank builds the model of a *local* config: 1/N of the attention heads (query and key/value alike), of the
MLP's hidden units and of the experts, so its projections, its KV cache and its memory are 1/N of the whole. It
then reads from the checkpoint only its slices of the split weights (`ShardSpec`), and the plan's rowwise layers
and reduce modules sum their partial outputs over the ranks with one all-reduce each. Everything else (embeddings,
norms, the LM head) is replicated. Every rank runs the same generation loop on the same input and gets the same
logits.
"""

from __future__ import annotations

import atexit
import dataclasses
import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .plans import TP_PLANS, Plan


@dataclass(frozen=True)
class ShardSpec:
    """How a rank reads one parameter: the slice [start, stop) along ``dim``, or (rowwise biases) the whole
    tensor on rank 0 and zeros elsewhere, so that the all-reduce adds it once."""

    dim: int | None
    start: int = 0
    stop: int = 0
    zero: bool = False


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world: int
    plan: Plan | None = None

    def split(self, size: int) -> tuple[int, int]:
        share = size // self.world
        return self.rank * share, (self.rank + 1) * share


def setup(device_type: str) -> TensorParallel:
    """This process's place in the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...), which is
    started here if the script did not start it."""
    if not dist.is_available():
        raise ValueError("tp_plan needs torch.distributed, which this build of PyTorch lacks")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise ValueError(
                "tp_plan='auto' runs under torchrun (torchrun --nproc-per-node N script.py), which sets RANK and "
                "WORLD_SIZE; start the script with it, or initialise torch.distributed yourself"
            )
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        # Ours to end: a group left to the interpreter's exit tears its threads down mid-flight (abort).
        atexit.register(_end_group)
    return TensorParallel(dist.get_rank(), dist.get_world_size())


def _end_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def plan_for(model_type: str, tp: TensorParallel) -> TensorParallel:
    plan = TP_PLANS.get(model_type)
    if plan is None:
        supported = ", ".join(sorted(TP_PLANS))
        raise ValueError(f"tp_plan='auto' has no plan for {model_type} models yet (it has for: {supported})")
    return dataclasses.replace(tp, plan=plan)


def local_config(config, tp: TensorParallel):
    """The config of this rank's share: the plan's sizes (heads, MLP widths, experts) divided by the world size,
    which must divide them. The experts' split is noted in ``extra["expert_parallel"]`` as (rank, world): the
    router still scores all of them."""
    from ..models.moe import num_experts

    world, changes = tp.world, {}
    for name in tp.plan.divides:
        if name == "experts":
            value = num_experts(config)
        elif name in config.extra:
            value = config.extra[name]
        else:
            value = getattr(config, name)
        if value % world:
            raise ValueError(
                f"tensor parallelism over {world} ranks needs {name} ({value}) to be a multiple of {world}; "
                f"run with a number of ranks that divides it"
            )
        if name == "experts":
            changes["extra"] = {**changes.get("extra", config.extra), "expert_parallel": [tp.rank, world]}
        elif name in config.extra:
            changes["extra"] = {**changes.get("extra", config.extra), name: value // world}
        else:
            changes[name] = value // world
    # head_dim explicit: the default (hidden / heads) would change with the heads
    return dataclasses.replace(config, head_dim=config.head_dim, **changes)


def _planned(name: str, plan: dict[str, str]) -> str | None:
    names = name.split(".")
    for pattern, style in plan.items():
        parts = pattern.split(".")
        if len(parts) == len(names) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts)):
            return style
    return None


def shard_specs(model: nn.Module, tp: TensorParallel) -> dict[str, ShardSpec]:
    """By parameter name, how this rank reads it from the checkpoint (parameters not listed: whole)."""
    specs: dict[str, ShardSpec] = {}
    for module_name, module in model.named_modules():
        style = _planned(module_name, tp.plan.layers)
        if style in (None, "reduce"):
            continue
        if style == "experts":
            local = module.gate_up_proj.shape[0]
            start = module.offset
            for name in ("gate_up_proj", "down_proj"):
                specs[f"{module_name}.{name}"] = ShardSpec(0, start, start + local)
            continue
        weight = module.weight_shape if hasattr(module, "weight_shape") else tuple(module.weight.shape)
        has_bias = getattr(module, "bias", None) is not None
        if style == "colwise":
            start, stop = tp.split(weight[0] * tp.world)
            specs[f"{module_name}.weight"] = ShardSpec(0, start, stop)
            if has_bias:
                specs[f"{module_name}.bias"] = ShardSpec(0, start, stop)
        elif style in ("rowwise", "rowwise_partial"):
            start, stop = tp.split(weight[1] * tp.world)
            specs[f"{module_name}.weight"] = ShardSpec(1, start, stop)
            if has_bias:
                specs[f"{module_name}.bias"] = ShardSpec(None, zero=tp.rank != 0)
        else:
            raise ValueError(f"unknown tensor-parallel style {style!r} for {module_name}")
    return specs


def _all_reduce(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output


def attach_all_reduces(model: nn.Module, tp: TensorParallel) -> None:
    """The plan's sums over the ranks: after each rowwise layer and each "reduce" module."""
    for module_name, module in model.named_modules():
        if _planned(module_name, tp.plan.layers) in ("rowwise", "reduce"):
            module.register_forward_hook(_all_reduce)
    model.tensor_parallel = tp


def check_same_model(description: dict) -> None:
    """Every rank must load the same model the same way: a rank that got another path or options fails loudly."""
    mine = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) > 1:
        differing = [rank for rank, digest in enumerate(everyone) if digest != everyone[0]]
        raise ValueError(
            f"the ranks disagree on the model: ranks {differing} load another model or other options than rank 0 "
            f"(this rank: {description.get('source')})"
        )
