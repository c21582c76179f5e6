"""A whole decoder layer as one native call while decoding (``chatlm_decode_layer``).

Eager PyTorch spends about as long dispatching a small model's ~40 ops per layer as the CPU spends streaming its
weights. For the common case, float32 activations with weights the native kernels take (int4, int8, GGUF blocks),
one C call runs the layer: its norms, the q/k/v projections (and q/k norms), rope + cache write + attention (over
a sliding window where the layer has one), o_proj and the residual, the gated MLP and the residual, each through
the same kernels the module path uses, in the same order. ``plan`` says whether a layer qualifies; anything else
(float weights, bfloat16, a padded batch with a sliding window) runs the modules.

One mechanism for every family: a layer declares its pieces with ``fusable_parts()`` (`chatlm.models.layers.FusableParts`: which
norms it has, where, and with what weights; its activation; its window), or None where its math is another (fused
projections, scaled residuals, experts). The kernel attaches to a loaded model from outside (`attach`, called by
the loader), as tensor parallelism does, and knows no model or quantization class: a quantized linear layer
declares its operands with ``native_weight()`` (a `NativeWeight`).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
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


class _LayerMath(ctypes.Structure):  # chatlm_layer_math (cpu_kernels.c)
    _fields_ = [
        *[(name, ctypes.c_void_p) for name in ("input", "post_attention", "pre_mlp", "post_mlp", "q", "k")],
        ("q_width", ctypes.c_int64),
        ("k_width", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("gelu_tanh", ctypes.c_int),
        ("window", ctypes.c_int64),
    ]


NORMS = ("input_norm", "post_attention_norm", "pre_mlp_norm", "post_mlp_norm", "q_norm", "k_norm")


class LayerPlan:
    """The fixed arguments of one layer's native call, and the tensors behind them (kept alive here)."""

    def __init__(self, parts, weights: list[NativeWeight], norms: dict[str, torch.Tensor]):
        projections = parts.projections
        self.first, self.last = projections[0], projections[-1]
        self.weights = (weights[0].weight, weights[-1].weight)  # checked each step: see `valid`
        self.keep = [*norms.values()] + [
            t for w in weights for t in (w.weight, w.scales, w.bias) if t is not None
        ]
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
        pointer = {name: norms[name].data_ptr() if name in norms else None for name in NORMS}
        eps = next(getattr(parts, name).eps for name in NORMS if name in norms)
        self.math = _LayerMath(
            pointer["input_norm"],
            pointer["post_attention_norm"],
            pointer["pre_mlp_norm"],
            pointer["post_mlp_norm"],
            pointer["q_norm"],
            pointer["k_norm"],
            norms["q_norm"].numel() if "q_norm" in norms else 0,
            norms["k_norm"].numel() if "k_norm" in norms else 0,
            eps,
            ACTIVATIONS[parts.activation],
            parts.window or 0,
        )
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
        native.library().chatlm_decode_layer(
            x.data_ptr(),
            x.shape[0],
            x.shape[1],
            x.shape[-1],
            ctypes.byref(self.math),
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


ACTIVATIONS = {
    "silu": 0,
    "gelu_pytorch_tanh": 1,
}  # the MLP activations the kernel computes (names as in config)


def plan(layer: nn.Module) -> LayerPlan | None:
    """The native plan of a decoder layer, or None where the module path must run it."""
    if native.library() is None:
        return None
    declare = getattr(layer, "fusable_parts", None)
    parts = declare() if declare is not None else None
    if parts is None or parts.activation not in ACTIVATIONS:
        return None
    norms = {name: getattr(parts, name) for name in NORMS if getattr(parts, name) is not None}
    if not norms or len({n.eps for n in norms.values()}) != 1:
        return None
    weights_of = {name: n.kernel_weight() for name, n in norms.items()}
    if any(w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 1 for w in weights_of.values()):
        return None
    weights_of = {name: w.contiguous() for name, w in weights_of.items()}
    widths = {"q_norm": parts.heads * parts.head_dim, "k_norm": parts.kv_heads * parts.head_dim}
    for name, width in widths.items():  # over each head, or over all of them
        if name in weights_of and weights_of[name].numel() not in (parts.head_dim, width):
            return None
    weights = [_native_weight(m) for m in parts.projections]
    if not all(weights):
        return None
    return LayerPlan(parts, weights, weights_of)


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
