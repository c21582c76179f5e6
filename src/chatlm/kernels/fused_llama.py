"""A whole Llama decoder layer as one native call while decoding (``chatlm_llama_decode_layer``).

Eager PyTorch spends about as long dispatching a small model's ~40 ops per layer as the CPU spends streaming its
weights. For the common case, float32 activations with int4/int8 weights the native kernels take, one C call runs
the layer: RMSNorm, the q/k/v projections, rope + cache write + attention, o_proj and the residual, RMSNorm, the
SwiGLU MLP and the residual, each through the same kernels the module path uses, in the same order. ``plan`` says
whether a layer qualifies; anything else (another architecture, float weights, bfloat16, a mask) runs the modules.

The kernel attaches to a loaded model from outside (`attach`, called by the loader), as tensor parallelism does,
and knows no model or quantization class: a layer declares its pieces with ``fusable_parts()`` (None: it is not
this math), a quantized linear layer its operands with ``native_weight()`` (a `NativeWeight`).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import native

MAX_TOKENS = 16  # tokens of one row that a fused decoding step takes at once (the check of a few guesses)


@dataclass(frozen=True)
class NativeWeight:
    """A quantized linear layer's operands as the native kernels read them. 8 bits: ``weight`` (n, k) int8 and
    ``scales`` (n,) float32; 4 bits: ``weight`` in torch's packed CPU layout (AVX-512: blocks of 64 channels) and
    ``scales`` (k / group, n, 2) scales and zero points; 0 bits: GGUF blocks as stored, (n, bytes per row) uint8
    in ``weight`` (and ``scales``), their GGML type id in ``group``. ``weight`` is the layer's ``qweight`` buffer: a reload or
    a move replaces it, and the plan is made again."""

    bits: int
    weight: torch.Tensor
    scales: torch.Tensor
    group: int  # inputs per int4 scale (0 for int8)
    out_features: int
    in_features: int
    bias: torch.Tensor | None


class _Linear(ctypes.Structure):
    _fields_ = [
        ("bits", ctypes.c_int),
        ("weight", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("scales_f32", ctypes.c_int),
        ("group", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
    ]


class LayerPlan:
    """The fixed arguments of one layer's native call, and the tensors behind them (kept alive here)."""

    def __init__(self, parts, weights: list[NativeWeight]):
        projections = parts.projections
        self.first, self.last = projections[0], projections[-1]
        self.weights = (weights[0].weight, weights[-1].weight)  # checked each step: see `valid`
        norms = (parts.input_norm.weight, parts.post_attention_norm.weight)
        self.keep = [*norms] + [t for w in weights for t in (w.weight, w.scales, w.bias) if t is not None]
        self.projections = (_Linear * 7)(
            *[
                _Linear(
                    w.bits,
                    w.weight.data_ptr(),
                    w.scales.data_ptr(),
                    int(w.scales.dtype == torch.float32),
                    w.group,
                    w.out_features,
                    w.in_features,
                    w.bias.data_ptr() if w.bias is not None else None,
                )
                for w in weights
            ]
        )
        self.norms = (norms[0].data_ptr(), norms[1].data_ptr())
        self.eps = parts.input_norm.eps
        self.heads, self.kv_heads, self.head_dim = parts.heads, parts.kv_heads, parts.head_dim
        self.scale = parts.head_dim**-0.5 if parts.scale is None else parts.scale

    def valid(self) -> bool:
        """Whether the layer still holds the weights planned for (asked every step, so two checks: a reload or a
        move replaces them all)."""
        return self.first.qweight is self.weights[0] and self.last.qweight is self.weights[1]

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache,
        v_cache,
        offset: int,
        starts: torch.Tensor | None = None,
    ) -> None:
        """x (B, T, hidden) float32 with B == 1 or T == 1, updated in place; cos and sin (B, T, rotary) float32;
        ``starts`` (B,) int64: row b's keys begin at that slot (a batch whose rows hold different lengths)."""
        native.library().chatlm_llama_decode_layer(
            x.data_ptr(),
            x.shape[0],
            x.shape[1],
            x.shape[-1],
            self.norms[0],
            self.norms[1],
            self.eps,
            self.projections,
            cos.data_ptr(),
            sin.data_ptr(),
            cos.shape[-1],
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            k_cache.shape[2],
            offset,
            starts.data_ptr() if starts is not None else None,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.scale,
        )


def _native_weight(m: nn.Module) -> NativeWeight | None:
    """The operands of a linear layer that the native kernels take, or None (a float layer declares none)."""
    declare = getattr(m, "native_weight", None)
    w = declare() if declare is not None else None
    if w is None:
        return None
    if w.bias is not None and (w.bias.dtype != torch.float32 or not w.bias.is_contiguous()):
        return None
    if w.bits == 0:  # GGUF blocks as stored (group: the type id)
        return w if native.library().chatlm_gguf_supports(w.group) else None
    if w.bits == 4:  # our kernel for torch's AVX-512 layout, built (it needs AVX-512 too)
        return w if native.library().chatlm_has_int4_kernel() else None
    fits = w.out_features % 4 == 0 and w.in_features % 16 == 0 and w.weight.is_contiguous()
    return w if fits else None


def plan(layer: nn.Module) -> LayerPlan | None:
    """The native plan of a decoder layer, or None where the module path must run it."""
    if native.library() is None:
        return None
    declare = getattr(layer, "fusable_parts", None)
    parts = declare() if declare is not None else None
    if parts is None:
        return None
    norms = (parts.input_norm, parts.post_attention_norm)
    if any(n.weight.dtype != torch.float32 or n.weight.device.type != "cpu" for n in norms):
        return None
    if norms[0].eps != norms[1].eps or parts.activation is not F.silu:
        return None
    weights = [_native_weight(m) for m in parts.projections]
    if not all(weights):
        return None
    return LayerPlan(parts, weights)


class DecodeFusion:
    """What `attach` installs on a model: the steps the fused layer call takes, and each layer's plan."""

    def takes(self, x: torch.Tensor, cos: torch.Tensor) -> bool:
        """One new token per row, or a few tokens of one row (speculative decoding's check), all float32 on the
        CPU."""
        batch, tokens = x.shape[:2]
        return (
            (tokens == 1 or (batch == 1 and tokens <= MAX_TOKENS))
            and x.dtype == torch.float32
            and cos.dtype == torch.float32
            and x.is_cpu
        )

    def plan(self, layer: nn.Module) -> LayerPlan | None:
        return plan(layer)


def attach(model: nn.Module) -> None:
    """Give a loaded model the fused decode path, where its forward offers one (``decode_fusion``): each layer that
    declares fusable parts with weights the kernels take then runs as one native call per decoding step. Not for
    a tensor-parallel model: its all-reduces run as forward hooks, which the native call would skip."""
    if hasattr(model, "decode_fusion"):
        model.decode_fusion = DecodeFusion()
