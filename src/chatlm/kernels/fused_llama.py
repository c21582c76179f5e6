"""A whole Llama decoder layer as one native call while decoding (``chatlm_llama_decode_layer``).

Eager PyTorch spends about as long dispatching a small model's ~40 ops per layer as the CPU spends streaming its
weights. For the common case, float32 activations with int4/int8 weights the native kernels take, one C call runs
the layer: RMSNorm, the q/k/v projections, rope + cache write + attention, o_proj and the residual, RMSNorm, the
SwiGLU MLP and the residual, each through the same kernels the module path uses, in the same order. ``plan`` says
whether a layer qualifies; anything else (another architecture, float weights, bfloat16, a mask) runs the modules.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from . import native


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

    def __init__(self, layer: nn.Module, linears: list[nn.Module]):
        attn = layer.self_attn
        self.layer = layer
        self.weights = [m.qweight for m in linears]  # checked each step: a reloaded or moved model re-plans
        self.keep = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight] + [
            t for m in linears for t in (m.qweight, m.scales, m.bias) if t is not None
        ]
        self.projections = (_Linear * 7)(
            *[
                _Linear(
                    m.bits,
                    m.qweight.data_ptr(),
                    m.scales.data_ptr(),
                    int(m.scales.dtype == torch.float32),
                    m.group_size if m.bits == 4 else 0,
                    m.out_features,
                    m.in_features,
                    m.bias.data_ptr() if m.bias is not None else None,
                )
                for m in linears
            ]
        )
        self.norms = (
            layer.input_layernorm.weight.data_ptr(),
            layer.post_attention_layernorm.weight.data_ptr(),
        )
        self.eps = layer.input_layernorm.eps
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale = attn.head_dim**-0.5 if attn.scale is None else attn.scale

    def valid(self) -> bool:
        """Whether the layer still holds the weights planned for (asked every step, so two checks: a reload or a
        move replaces them all)."""
        layer = self.layer
        return (
            layer.self_attn.q_proj.qweight is self.weights[0]
            and layer.mlp.down_proj.qweight is self.weights[6]
        )

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


def _native_linear(m: nn.Module) -> bool:
    from ..quantization import QuantizedLinear

    if type(m) is not QuantizedLinear or m.qweight is None:
        return False
    if m.bias is not None and (m.bias.dtype != torch.float32 or not m.bias.is_contiguous()):
        return False
    if m.bits == 4:  # torch's AVX-512 layout, and our kernel for it built (it needs AVX-512 too)
        return m._native_int4 and bool(native.library().chatlm_has_int4_kernel())
    return m.out_features % 4 == 0 and m.in_features % 16 == 0 and m.qweight.is_contiguous()


def plan(layer: nn.Module) -> LayerPlan | None:
    """The native plan of a Llama decoder layer, or None where the module path must run it."""
    from ..models.layers import GatedMLP, RMSNorm
    from ..models.llama import Attention, DecoderLayer

    if native.library() is None:
        return None
    if (
        type(layer) is not DecoderLayer
        or type(layer.self_attn) is not Attention
        or type(layer.mlp) is not GatedMLP
    ):
        return None
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if any(
        type(n) is not RMSNorm or n.weight.dtype != torch.float32 or n.weight.device.type != "cpu"
        for n in norms
    ):
        return None
    if norms[0].eps != norms[1].eps or layer.mlp.act is not torch.nn.functional.silu:
        return None
    a, m = layer.self_attn, layer.mlp
    linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    if not all(_native_linear(x) for x in linears):
        return None
    return LayerPlan(layer, linears)
