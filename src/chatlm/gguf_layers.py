"""Linear layers and embeddings whose weights stay exactly as a GGUF file stores them.

``from_pretrained(..., quantization_config=QuantizationConfig(keep_gguf_blocks=True))`` (the default of ``chatlm
chat/run/serve`` for a .gguf file, as in llama.cpp and Ollama) puts these in place of the float modules whose
tensor is a block type chatlm reads (`KEPT_TYPES`): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL,
IQ4_XS. A Q4_K_M file keeps its mix (Q4_K with Q6_K for some layers, Q8_0 where shapes ask for it): the weights
that run are the file's weights, no requantization, and their bytes are used in place on the file's memory map
(only Llama's q/k rows, stored permuted, are copied). Float tensors (norms, F16 matrices) load as usual.

Compute (``chatlm.kernels.gguf_linear``): decoding (up to ``NATIVE_MAX_ROWS`` rows: one token per sequence, or a
speculative check) goes to the native kernel, which reads the blocks directly and rounds the activations to int8
in groups of 32 or 256 values, as llama.cpp does (several rows share each decoded block). ``lm_head`` then
computes its ``REFINE_TOP`` largest logits of each row again with int16 activations (float32's precision for all
practical purposes): int8's error (~1% of a logit) can swap two close tokens, and the token picked, with the
candidates near it, is what matters; the rest keep int8's values, for 1/2000 of the head's work. A prompt (more
rows) is a float matmul on the weights dequantized a cache-sized tile at a time: in bfloat16 on a CPU that has it
natively (AVX-512 BF16: 2.6x float32's speed, with a third of int8 activations' error; int8 activations
over a whole prompt flip the bundled model's first answer, bfloat16 does not), else in float32, bit for bit the
file's values. ``compute_dtype=torch.float32`` runs float32 tiles for everything: the dequantized model's results
to float rounding (the oracle the tests hold the kernels to), at a fraction of the speed. Without the native
kernels (no compiler, a CPU without AVX2) the tiles run always, dequantized by `chatlm.loading`'s torch
dequantizers (handed in as the weight's ``float_rows``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels.fused_layer import NativeWeight
from .models.moe import Experts

# GGML type ids of the block types kept as stored (ggml.h)
KEPT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
KEPT_TYPES |= {"IQ4_NL": 20, "IQ4_XS": 23}
# weights per dequantized tile: 2 MB of float32 (cache-sized); bfloat16's matmul, 2.6x faster, wants wider tiles
TILE_VALUES = {torch.float32: 1 << 19, torch.bfloat16: 1 << 20}
REFINE_TOP = 64  # the head's logits per row computed again with int16 activations (see the module docstring)
NATIVE_MAX_ROWS = 16  # up to this many rows the block kernel; above, float32 tiles


class StoredBlocks(Protocol):
    """A GGUF weight as the file stores it (`chatlm.loading.gguf_blocks.GGUFBlocks`): ``raw`` (rows, bytes per
    row) uint8, its type's name and id, and its rows dequantized by the reference dequantizer."""

    raw: torch.Tensor
    shape: tuple[int, ...]

    @property
    def type_name(self) -> str: ...

    def float_rows(self, start: int, stop: int) -> torch.Tensor: ...


class _Blocks(nn.Module):
    """What both modules share: the blocks, their type, and dequantizing rows of them."""

    def _take(self, weight: StoredBlocks) -> None:
        if weight.type_name not in KEPT_TYPES:
            raise ValueError(
                f"{weight.type_name} blocks are not kept as stored (kept: {', '.join(KEPT_TYPES)})"
            )
        self.qweight = weight.raw
        self.ggml_type, self.type_name = KEPT_TYPES[weight.type_name], weight.type_name
        self._reference_rows: Callable[[int, int], torch.Tensor] = weight.float_rows
        self._native = kernels.gguf_supported(self.ggml_type)

    def _rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [start, stop) dequantized to float32, bit for bit the file's values (or those rounded to dtype)."""
        if self._native:
            k = self.weight_shape[-1]
            out = kernels.gguf_dequantize(self.qweight[start:stop], self.ggml_type, k, dtype)
            if out is not None:
                return out
        return self._reference_rows(start, stop).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as float (for checks and tests)."""
        return self._rows(0, self.qweight.shape[0]).to(dtype).view(self.weight_shape)

    def num_weights(self) -> int:
        return math.prod(self.weight_shape)

    def _matmul(
        self, x: torch.Tensor, start: int, n: int, compute_dtype: torch.dtype | None, prompt: bool
    ) -> torch.Tensor:
        """x (m, k) @ W[start:start + n]^T in float32 (m, n), W this module's rows of blocks: decoding through the
        block kernel, a ``prompt`` through dequantized tiles (see the module docstring)."""
        k = self.weight_shape[-1]
        if self._native and compute_dtype is None and not prompt:
            y = kernels.gguf_linear(x, self.qweight[start : start + n], self.ggml_type, k)
            if y is not None:
                return y
        # tiles: bfloat16 for the default's prompts on a CPU with native bfloat16, else float32
        dtype = torch.float32
        if compute_dtype is None and self._native and kernels.fast_bfloat16_matmul():
            dtype = torch.bfloat16
        x = x.to(dtype)
        step = min(n, max(16, TILE_VALUES[dtype] // k // 16 * 16))
        out = torch.empty(x.shape[0], n, dtype=torch.float32)
        for i in range(0, n, step):
            out[:, i : i + step] = F.linear(x, self._rows(start + i, start + min(n, i + step), dtype))
        return out


class GGUFLinear(_Blocks):
    """``nn.Linear`` computing with a GGUF weight as stored (see the module docstring); the bias stays float."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype | None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.compute_dtype = compute_dtype  # None: the block kernel; float32: dequantized tiles
        self.refine_top = 0  # the head: its largest logits again with int16 activations (module docstring)
        self.register_buffer("qweight", None)  # (out, bytes per row) uint8: the file's blocks

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def load_weight(self, weight: StoredBlocks) -> None:
        self._take(weight)

    def tie_to(self, embedding: GGUFEmbedding) -> None:
        """Share a GGUF embedding's blocks (tied word embeddings)."""
        self.qweight, self.ggml_type, self.type_name = (
            embedding.qweight,
            embedding.ggml_type,
            embedding.type_name,
        )
        self._reference_rows, self._native = embedding._reference_rows, embedding._native

    def native_weight(self) -> NativeWeight | None:
        """The operands for the fused decode layer (`chatlm.kernels.fused_layer`): ``bits`` 0 marks GGUF blocks,
        ``group`` their type id. None where the kernels do not run, or where this layer computes in float32."""
        if self.qweight is None or not self._native or self.compute_dtype is not None:
            return None
        return NativeWeight(
            0, self.qweight, self.qweight, self.ggml_type, self.out_features, self.in_features, self.bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        prompt = x2.shape[0] > NATIVE_MAX_ROWS
        y = self._matmul(x2, 0, self.out_features, self.compute_dtype, prompt)
        if self.refine_top and self._native and self.compute_dtype is None and not prompt:
            self._refine(x2, y)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def _refine(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Each row's ``refine_top`` largest outputs again, with int16 activations, in place."""
        top = y.topk(min(self.refine_top, self.out_features), dim=-1).indices
        for i in range(x.shape[0]):
            rows = self.qweight.index_select(0, top[i])
            exact = kernels.gguf_linear(x[i : i + 1], rows, self.ggml_type, self.in_features, precise=True)
            y[i, top[i]] = exact[0]

    def extra_repr(self) -> str:
        refined = f", the top {self.refine_top} with int16" if self.refine_top else ""
        compute = self.compute_dtype or f"int8 activations{refined}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.type_name} as stored, "
            f"compute {compute}"
        )


class GGUFExpertStack(_Blocks):
    """One projection of a layer's experts, (experts, out, in) as the file stacks them (GGUF's
    ``ffn_{gate,up,down}_exps``), in place; ``stack(e, x)`` is expert e's linear layer (only its blocks are
    read)."""

    weight_suffix = ""  # the checkpoint names a stack by the module's own name (no ".weight")

    def __init__(self, experts: int, out_features: int, in_features: int, compute_dtype: torch.dtype | None):
        super().__init__()
        self._shape = (experts, out_features, in_features)
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", None)  # (experts * out, bytes per row) uint8

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        return self._shape

    def load_weight(self, weight: StoredBlocks) -> None:
        self._take(weight)

    def forward(self, e: int, x: torch.Tensor, prompt: bool) -> torch.Tensor:
        """Expert e's linear layer on x (m, in); ``prompt``: the call's tokens, not just this expert's, make a
        prompt (so a prompt gives the same numbers whole or in pieces)."""
        n = self._shape[1]
        return self._matmul(x, e * n, n, self.compute_dtype, prompt)

    def extra_repr(self) -> str:
        return f"{self._shape[0]} x ({self._shape[1]}, {self._shape[2]}), {self.type_name} as stored"


STACKS = ("gate_proj", "up_proj", "down_proj")


class GGUFExperts(Experts):
    """`chatlm.models.moe.Experts` with its stacks kept as stored: routing as there, and each chosen expert reads
    only its own blocks (decoding: the block kernel; a prompt's tokens per expert: dequantized tiles)."""

    def __init__(self, experts: Experts, compute_dtype: torch.dtype | None):
        nn.Module.__init__(self)  # not Experts': its float stacks are what this module does without
        count, two_i, hidden = experts.gate_up_proj.shape
        self.act, self.offset = experts.act, experts.offset
        self.gate_proj = GGUFExpertStack(count, two_i // 2, hidden, compute_dtype)
        self.up_proj = GGUFExpertStack(count, two_i // 2, hidden, compute_dtype)
        self.down_proj = GGUFExpertStack(count, hidden, two_i // 2, compute_dtype)

        self._prompt = False  # whether the current call's tokens make a prompt (see forward)

    def num_held(self) -> int:
        return self.gate_proj.weight_shape[0]

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # decoding or a prompt by the call's tokens, as the dense layers decide, not by each expert's share
        self._prompt = x.shape[0] > NATIVE_MAX_ROWS
        return super().forward(x, chosen, weights)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate_proj(e, x, self._prompt)) * self.up_proj(e, x, self._prompt)
        return self.down_proj(e, h, self._prompt).to(x.dtype)


class GGUFEmbedding(_Blocks):
    """``nn.Embedding`` with a GGUF table as stored; a lookup dequantizes only the rows it reads."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.dtype = dtype
        self.register_buffer("qweight", None)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def load_weight(self, weight: StoredBlocks) -> None:
        self._take(weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.qweight.index_select(0, flat)
        if self._native:
            out = kernels.gguf_dequantize(rows, self.ggml_type, self.embedding_dim)
        else:
            out = None
        if out is None:
            out = (
                torch.cat([self._reference_rows(i, i + 1) for i in flat.tolist()])
                if len(flat)
                else rows.float()
            )
        return out.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.type_name} as stored"


def keep_gguf_modules(
    model: nn.Module, names: set[str], dtype: torch.dtype, compute_dtype: torch.dtype | None
) -> dict[str, nn.Module]:
    """Put GGUF modules in place of the linear layers, embeddings and expert stacks whose checkpoint weight
    (``<module>.weight``; an MoE layer's ``<experts>.gate_proj`` / ``up_proj`` / ``down_proj``) is in ``names``
    (on the meta device, before loading); returns weight name -> module. With tied word embeddings the head
    shares the embedding's blocks (the loader ties them)."""
    swapped: dict[str, nn.Module] = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, module in list(model.named_modules()):
        new: nn.Module
        if isinstance(module, Experts):
            if not all(f"{name}.{stack}" in names for stack in STACKS):
                continue  # one stack in another format: the experts load as float
            new = GGUFExperts(module, compute_dtype)
            swapped |= {f"{name}.{stack}": getattr(new, stack) for stack in STACKS}
        elif f"{name}.weight" not in names and not (
            tied and name == "lm_head" and "model.embed_tokens.weight" in names
        ):
            continue
        elif isinstance(module, nn.Linear):
            new = GGUFLinear(module, compute_dtype)
            new.refine_top = REFINE_TOP if name == "lm_head" else 0
        elif isinstance(module, nn.Embedding):
            new = GGUFEmbedding(module, dtype)
        else:
            continue
        model.set_submodule(name, new)
        if f"{name}.weight" in names:
            swapped[f"{name}.weight"] = new
    return swapped
