"""Native CPU kernels for decoding (``cpu_kernels.c``, built by ``native``), behind functions that say when they
apply: each returns None where it does not (another device or dtype, a shape it does not take, no compiler), and
the caller falls back to torch."""

from __future__ import annotations

import ctypes

import torch

from . import native

_FLOAT = (torch.float32, torch.bfloat16)


def _addr(t: torch.Tensor) -> int:
    return t.data_ptr()  # ctypes takes a plain int for a c_void_p argument


def _usable(*tensors: torch.Tensor) -> bool:
    """On the CPU, outside autograd (the kernels have no backward), with the library built. Lean: decoding asks
    this about a hundred times per token."""
    if native.library() is None:
        return False
    for t in tensors:
        if not t.is_cpu or (t.requires_grad and torch.is_grad_enabled()):
            return False
    return True


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x (m, k) @ (qweight (n, k) int8 * scales (n,) float32)^T in float32 (m, n); x is read as float32."""
    n, k = qweight.shape
    if n % 4 or k % 16 or not _usable(x, qweight) or not qweight.is_contiguous():
        return None
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    native.library().chatlm_q8_matmul(_addr(x), x.shape[0], k, _addr(qweight), _addr(scales), n, _addr(y))
    return y


_INT4_UNSUPPORTED: list[bool] = []  # set once the library says this CPU has no int4 kernel (no AVX-512)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int
) -> torch.Tensor | None:
    """float32 x (m, k) @ W^T in float32 (m, n), for an int4 weight in torch's packed CPU layout (the caller checks
    that the layout is the one `chatlm.quantization` reads, and n % 64 == 0) with scales and zero points
    (k / group, n, 2) in bfloat16 or float32. Not for bfloat16 activations: there torch's kernel is as fast."""
    if (
        _INT4_UNSUPPORTED
        or x.dtype != torch.float32
        or scales.dtype not in _FLOAT
        or not _usable(x, packed, scales)
    ):
        return None
    x = x.contiguous()
    n = packed.shape[0]
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    done = native.library().chatlm_q4_torch_layout_matmul(
        _addr(x),
        x.shape[0],
        x.shape[1],
        _addr(packed),
        _addr(scales),
        scales.dtype == torch.float32,
        group,
        n,
        _addr(y),
    )
    if not done:
        _INT4_UNSUPPORTED.append(True)
        return None
    return y


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor | None:
    """Attention of one new token per row over all cached keys, no mask: q (B, heads, 1, D), k and v (B, kv_heads,
    S, D) float32 or bfloat16 (views into the cache are fine). The result is (B, heads, 1, D) in q's dtype."""
    B, H, T, D = q.shape
    if (
        T != 1
        or k.dtype not in _FLOAT
        or v.dtype != k.dtype
        or k.stride(-1) != 1
        or v.stride(-1) != 1
        or H % k.shape[1]
        or not _usable(q, k, v)
    ):
        return None
    qf = q.reshape(B, H, D).float().contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (k, v)]
    native.library().chatlm_attend_one(
        _addr(qf),
        _addr(k),
        _addr(v),
        int(k.dtype == torch.bfloat16),
        B,
        H,
        k.shape[1],
        k.shape[2],
        D,
        strides[0],
        strides[1],
        None,
        D**-0.5 if scale is None else scale,
        _addr(out),
    )
    return out.to(q.dtype).view(B, H, 1, D)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """transformers' LlamaRMSNorm of x (..., dim) with a weight of x's dtype (float32 or bfloat16)."""
    if x.dtype not in _FLOAT or weight.dtype != x.dtype or not x.is_contiguous() or not _usable(x, weight):
        return None
    out = torch.empty_like(x)
    dim = x.shape[-1]
    native.library().chatlm_rms_norm(
        _addr(x), _addr(weight), int(x.dtype == torch.bfloat16), x.numel() // dim, dim, eps, _addr(out)
    )
    return out


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    offset: int,
    scale: float | None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One decoding step of attention after the projections, in one call: rope on q (B, heads, 1, D) and k (B,
    kv_heads, 1, D) with tables (B, 1, rotary), k and v written into the caches (B, kv_heads, capacity, D) at slot
    ``offset``, attention over slots 0..offset without a mask (or, with ``starts`` (B,) int64, row b over slots
    starts[b]..offset). Returns (B, 1, heads * D) in q's dtype, as ``apply_rope``, ``KVCache.update`` and
    ``attention`` would (to float rounding)."""
    B, H, T, D = q.shape
    dtype = q.dtype
    if (
        T != 1
        or dtype not in _FLOAT
        or not all(t.dtype == dtype for t in (k, v, k_cache, v_cache))
        or cos.dtype not in (dtype, torch.float32)
        or sin.dtype != cos.dtype
        or cos.shape != (B, 1, cos.shape[-1])
        or cos.shape[-1] % 2
        or cos.shape[-1] > D
        or not (cos.is_contiguous() and sin.is_contiguous())
        or any(t.stride(1) != D or t.stride(3) != 1 for t in (q, k, v))
        or not (k_cache.is_contiguous() and v_cache.is_contiguous())
        or k_cache.shape != v_cache.shape
        or offset >= k_cache.shape[2]
        or H % k.shape[1]
        or (
            starts is not None
            and (starts.dtype != torch.int64 or starts.shape != (B,) or not starts.is_contiguous())
        )
        or not _usable(q, k, v, cos, k_cache)
    ):
        return None
    out = torch.empty(B, 1, H * D, dtype=dtype)
    native.library().chatlm_decode_attention(
        _addr(q),
        q.stride(0),
        _addr(k),
        k.stride(0),
        _addr(v),
        v.stride(0),
        _addr(cos),
        _addr(sin),
        cos.stride(0),
        int(cos.dtype == torch.float32),
        cos.shape[-1],
        _addr(k_cache),
        _addr(v_cache),
        k_cache.shape[2],
        offset,
        _addr(starts) if starts is not None else None,
        int(dtype == torch.bfloat16),
        B,
        H,
        k.shape[1],
        D,
        D**-0.5 if scale is None else scale,
        _addr(out),
    )
    return out


def gguf_supported(ggml_type: int) -> bool:
    """Whether `gguf_linear` / `gguf_dequantize` run for blocks of this GGML type id on this CPU."""
    lib = native.library()
    return lib is not None and bool(lib.chatlm_gguf_supports(ggml_type))


def gguf_linear(
    x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, in_features: int, precise: bool = False
) -> torch.Tensor | None:
    """x (m, k) @ W^T in float32 (m, n) for W stored as GGUF blocks (n, bytes per row) uint8, read in place. The
    activations are rounded to int8 in groups of 32 or 256 values (``precise``: int16 per 32, about float32's
    precision, half the speed; see ``gguf_kernels.c``)."""
    if not _usable(x, blocks) or not blocks.is_contiguous():
        return None
    x = x.float().contiguous()
    n = blocks.shape[0]
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    lib = native.library()
    matmul = lib.chatlm_gguf_matmul_precise if precise else lib.chatlm_gguf_matmul
    done = matmul(_addr(x), x.shape[0], in_features, _addr(blocks), ggml_type, blocks.stride(0), n, _addr(y))
    return y if done else None


def gguf_dequantize(
    blocks: torch.Tensor, ggml_type: int, in_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor | None:
    """GGUF blocks (n, bytes per row) uint8 as float32 (n, k), bit for bit the dequantizer's values, or as those
    values rounded to bfloat16."""
    if not _usable(blocks) or blocks.stride(-1) != 1 or dtype not in _FLOAT:
        return None
    out = torch.empty(blocks.shape[0], in_features, dtype=dtype)
    done = native.library().chatlm_gguf_dequantize(
        _addr(blocks),
        ggml_type,
        blocks.stride(0),
        blocks.shape[0],
        in_features,
        _addr(out),
        dtype == torch.bfloat16,
    )
    return out if done else None


def fast_bfloat16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX-512 BF16 or AMX): there a bfloat16 matmul runs
    ~2.6x float32's; elsewhere torch emulates it, slower than float32."""
    return bool({"avx512_bf16", "amx_bf16"} & native.cpu_flags())
