"""Dequantize GGUF tensor data to float32 with vectorised torch operations.

Each dequantizer computes exactly what `gguf.quants.dequantize` (the numpy reference) computes, operation for
operation in float32 (``d * q`` then ``+ m``, never a fused multiply-add), so the results are bit-identical (but
for the payload bits of F16 NaNs, which torch's conversion may quiet), and faster (benchmarks/bench_dequant.py).
Types we have no dequantizer for (the other IQ types, the TQ family, MXFP4, ...) go to the reference.

Integer fields are unpacked several bytes at a time (shifts and masks on int64 words), the float work runs on
whole blocks, and tensors are processed in steps small enough to stay in cache and on the calling thread.

Block layouts (ggml's ``block_*`` structs, little-endian; ``QK_K`` = 256):

- Q4_0 (18 bytes / 32 values): ``d`` f16, 16 bytes of 4-bit ``q``; value ``d * (q - 8)``.
- Q4_1 (20 / 32): ``d``, ``m`` f16, 16 bytes of 4-bit ``q``; value ``d * q + m``.
- Q5_0 (22 / 32): ``d``, 32 high bits ``qh``, 16 bytes of low nibbles; value ``d * (q - 16)``.
- Q5_1 (24 / 32): ``d``, ``m``, ``qh``, low nibbles; value ``d * q + m``.
- Q8_0 (34 / 32): ``d``, 32 int8 ``q``; value ``q * d``.
- Q2_K (84 / 256): 16 bytes of 4-bit scale/min pairs, 64 bytes of 2-bit ``q``, ``d``, ``dmin``.
- Q3_K (110 / 256): 32 bytes of high bits, 64 bytes of 2-bit low bits, 12 bytes of 6-bit scales, ``d``.
- Q4_K (144 / 256): ``d``, ``dmin``, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
- Q5_K (176 / 256): as Q4_K plus 32 bytes of high bits.
- Q6_K (210 / 256): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, ``d``.
- IQ4_NL (18 / 32): as Q4_0, but the nibble indexes a non-linear table of 16 int8 levels; value ``d * kv[q]``.
- IQ4_XS (136 / 256): ``d``, 16-bit ``scales_h`` (2 high bits per 32-value group), 4 bytes ``scales_l`` (low
  nibbles, group ``2j`` in the low nibble of byte ``j``), 128 bytes of nibbles; value ``d * (sc - 32) * kv[q]``.

Values in the low nibbles come first within each group: byte ``j`` holds value ``j`` in its low nibble and value
``j + half`` in its high nibble.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
QK_K = 256

# Values per step: 1 MB of float32 output, which stays in cache. Steps far below this (we had 32K values, to keep
# each op on the calling thread) pay torch's per-op overhead thousands of times: measured 2.5-4x slower for Q8_0,
# Q4_K, Q6_K and IQ4_XS on an idle 2-core machine, while on a busy one neither size won clearly.
_CHUNK_VALUES = 262144


def _f16s(b: torch.Tensor, start: int, count: int = 1) -> torch.Tensor:
    """``count`` consecutive f16 fields from byte ``start`` of every block, as float32 (n_blocks, count)."""
    return b[:, start : start + 2 * count].contiguous().view(torch.float16).float()


_SHIFTS = {bits: torch.arange(0, 8, bits, dtype=torch.int64).view(-1, 1) for bits in (1, 2, 4)}
_MASKS = {bits: int.from_bytes(bytes([(1 << bits) - 1]) * 8, "little", signed=True) for bits in (1, 2, 4)}


def _fields(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, k) bytes -> (n, 8 // bits, k) uint8 where ``[:, i, j]`` is bits ``i * bits`` and up of byte ``j``.

    With 4 bits: low nibbles, then high nibbles. Works on the bytes as one flat run of int64 (a shift drags bits
    across bytes; the per-byte mask drops them), field by field, and returns a field-major tensor seen through a
    permutation: torch is fast on long runs and slow on rows of a few elements.
    """
    n, k = packed.shape
    if packed.stride() != (k, 1) or packed.storage_offset() % 8:
        # A copy (the usual case: rows are slices of blocks) starts a fresh buffer that int64 can view.
        packed = packed.clone(memory_format=torch.contiguous_format)
    words = packed.view(torch.int64).view(1, -1)
    fields = ((words >> _SHIFTS[bits]) & _MASKS[bits]).view(torch.uint8)
    return fields.view(8 // bits, n, k).transpose(0, 1)


# Byte v -> eight bytes, byte i being 16 when bit i of v is set: the fifth bit of eight 5-bit values.
_HIGH_BIT_LUT = torch.tensor(
    [int.from_bytes(bytes(16 * ((v >> i) & 1) for i in range(8)), "little", signed=True) for v in range(256)],
    dtype=torch.int64,
)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.view(-1, 2, 16).copy_(_fields(b[:, 2:18], 4))
    out.sub_(8).mul_(_f16s(b, 0))


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    out.view(-1, 2, 16).copy_(_fields(b[:, 4:20], 4))
    dm = _f16s(b, 0, 2)
    out.mul_(dm[:, :1]).add_(dm[:, 1:])


def _five_bits(out: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
    """Q5_0/Q5_1 values into ``out`` (n, 32) from 16 bytes of low nibbles and 4 bytes of fifth bits."""
    fifth = torch.index_select(_HIGH_BIT_LUT, 0, high.reshape(-1).long()).view(torch.uint8).view(-1, 2, 16)
    out.view(-1, 2, 16).copy_(_fields(low, 4) | fifth)


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    _five_bits(out, b[:, 6:22], b[:, 2:6])
    out.sub_(16).mul_(_f16s(b, 0))


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    _five_bits(out, b[:, 8:24], b[:, 4:8])
    dm = _f16s(b, 0, 2)
    out.mul_(dm[:, :1]).add_(dm[:, 1:])


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:34].view(torch.int8))
    out.mul_(_f16s(b, 0))


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scales = b[:, :16]
    dd = _f16s(b, 80, 2)
    dl = (dd[:, :1] * (scales & 15).float()).view(n, 16, 1)
    ml = (dd[:, 1:] * (scales >> 4).float()).view(n, 16, 1)
    # Two groups of 32 bytes, each four 2-bit fields of 32 values.
    out.view(n * 2, 4, 32).copy_(_fields(b[:, 16:80].reshape(n * 2, 32), 2))
    out.view(n, 16, 16).mul_(dl).sub_(ml)


_CRUMB_SHIFTS = torch.tensor([[0], [2], [4], [6]], dtype=torch.uint8)


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    packed = b[:, 96:108]
    # 16 6-bit scales: low 4 bits from bytes 0-7 (low nibbles, then high), high 2 bits from bytes 8-11.
    low = torch.cat([packed[:, :8] & 15, packed[:, :8] >> 4], dim=1)
    high = ((packed[:, 8:12].unsqueeze(1) >> torch.tensor([[0], [2], [4], [6]], dtype=torch.uint8)) & 3).view(
        n, 16
    )
    scales = ((low | (high << 4)).view(torch.int8) - 32).float()
    dl = (_f16s(b, 108) * scales).view(n, 16, 1)
    ql = _fields(b[:, 32:96].reshape(n * 2, 32), 2).reshape(n, 16, 16)
    hbit = _fields(b[:, :32], 1).reshape(n, 16, 16)
    # A set high bit means no offset; a clear one means -4.
    out.view(n, 16, 16).copy_(ql.view(torch.int8) - ((hbit ^ 1) << 2).view(torch.int8))
    out.view(n, 16, 16).mul_(dl)


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 6-bit scales and 8 6-bit mins, as float32 (n, 8)."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc.float(), mn.float()


def k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: each 32-value group's scale ``d * sc`` and offset ``dmin * m``, shaped (n, 8, 1)."""
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    dd = _f16s(b, 0, 2)
    return (dd[:, :1] * sc).view(n, 8, 1), (dd[:, 1:] * mn).view(n, 8, 1)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d, dm = k4_scales(b)
    # Four groups of 32 bytes, each the low then the high nibbles of 32 values.
    out.view(n * 4, 2, 32).copy_(_fields(b[:, 16:144].reshape(n * 4, 32), 4))
    out.view(n, 8, 32).mul_(d).sub_(dm)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d, dm = k4_scales(b)
    low = _fields(b[:, 48:176].reshape(n * 4, 32), 4).reshape(n, 8, 32)
    high = _fields(b[:, 16:48], 1)  # (n, 8, 32): bit i of byte j is the fifth bit of value 32 * i + j
    out.view(n, 8, 32).copy_(low | (high << 4))
    out.view(n, 8, 32).mul_(d).sub_(dm)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    # Two halves of 128 values: 64 bytes of low nibbles and 32 bytes of 2-bit high parts each.
    low = _fields(b[:, :128].reshape(n * 2, 64), 4).reshape(n, 8, 32)
    high = _fields(b[:, 128:192].reshape(n * 2, 32), 2).reshape(n, 8, 32)
    d = (_f16s(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    out.view(n, 8, 32).copy_((low | (high << 4)).view(torch.int8) - 32)
    out.view(n, 16, 16).mul_(d)


# IQ4's 16 levels (ggml's kvalues_iq4nl), as a table from a byte to its (low nibble, high nibble) values: one
# gather per byte instead of unpacking nibbles and then looking each up.
_IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_IQ4_PAIRS = torch.tensor(
    [[_IQ4_LEVELS[v & 15], _IQ4_LEVELS[v >> 4]] for v in range(256)], dtype=torch.float32
)


def _iq4_levels(out: torch.Tensor, packed: torch.Tensor) -> None:
    """Levels of (n, k) bytes into ``out`` viewed (n, 2, k): low nibbles, then high nibbles."""
    n, k = packed.shape
    pairs = torch.index_select(_IQ4_PAIRS, 0, packed.reshape(-1).long()).view(n, k, 2)
    out.view(n, 2, k).copy_(pairs.transpose(1, 2))


def _iq4_nl(b: torch.Tensor, out: torch.Tensor) -> None:
    _iq4_levels(out, b[:, 2:18])
    out.mul_(_f16s(b, 0))


_IQ4_XS_HIGH_SHIFTS = torch.arange(0, 16, 2, dtype=torch.int32)


def _iq4_xs(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    low = b[:, 4:8]
    low = torch.stack([low & 15, low >> 4], dim=2).view(n, 8).int()
    high = (b[:, 2:4].contiguous().view(torch.int16).int() >> _IQ4_XS_HIGH_SHIFTS) & 3
    dl = (_f16s(b, 0) * ((low | (high << 4)) - 32).float()).view(n, 8, 1)
    _iq4_levels(out.view(n * 8, 32), b[:, 8:136].reshape(n * 8, 16))
    out.view(n, 8, 32).mul_(dl)


_BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor, torch.Tensor], None]] = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
    Q.IQ4_NL: _iq4_nl,
    Q.IQ4_XS: _iq4_xs,
}
_PLAIN = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}

#: The types dequantized here; the others go to gguf's numpy reference.
FAST_TYPES = frozenset(_PLAIN) | frozenset(_BLOCK_DEQUANTIZERS)


def _as_bytes(data: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Raw data as a flat uint8 tensor, sharing memory where it can; and whether it is a copy already."""
    if isinstance(data, torch.Tensor):
        flat = data.reshape(-1) if data.is_contiguous() else data.contiguous().reshape(-1)
        flat = flat.view(torch.uint8)
        if flat.storage_offset() % 8:
            # The block fields are viewed as f16/int64: start them at an aligned offset.
            flat = flat.clone()
        return flat, flat.data_ptr() != data.data_ptr()
    array = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    copied = not np.shares_memory(array, data)
    if not array.flags.writeable:
        # torch refuses to wrap read-only arrays silently (GGUFTensor.torch_bytes() avoids this copy).
        array, copied = array.copy(), True
    return torch.from_numpy(array), copied


def dequantize(
    data: np.ndarray | torch.Tensor, ggml_type: GGMLQuantizationType | int, shape: Sequence[int] | None = None
) -> torch.Tensor:
    """GGUF tensor data (its raw bytes, or the typed view gguf.GGUFReader gives) as a new float32 tensor.

    ``shape`` is the row-major shape of the result (a GGUF tensor's dims reversed); by default a flat tensor.
    The result never shares memory with ``data``.
    """
    ggml_type = Q(ggml_type)
    raw, copied = _as_bytes(data)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if raw.numel() % type_size:
        raise ValueError(
            f"{raw.numel()} bytes are not a whole number of {ggml_type.name} blocks ({type_size} bytes)"
        )
    n_values = raw.numel() // type_size * block_size
    if shape is None:
        shape = (n_values,)
    elif int(np.prod(shape, dtype=np.int64)) != n_values:
        raise ValueError(
            f"{raw.numel()} bytes of {ggml_type.name} hold {n_values} values, not shape {tuple(shape)}"
        )

    plain = _PLAIN.get(ggml_type)
    if plain is not None:
        values = raw.view(plain)
        if plain == torch.float32 and copied:
            return values.view(*shape)
        out = torch.empty(n_values, dtype=torch.float32)
        for start in range(0, n_values, _CHUNK_VALUES):
            out[start : start + _CHUNK_VALUES].copy_(values[start : start + _CHUNK_VALUES])
        return out.view(*shape)
    fn = _BLOCK_DEQUANTIZERS.get(ggml_type)
    if fn is None:
        return _reference(raw, ggml_type, shape)

    blocks = raw.view(-1, type_size)
    out = torch.empty(n_values, dtype=torch.float32)
    rows = out.view(-1, block_size)
    step = max(1, _CHUNK_VALUES // block_size)
    for start in range(0, blocks.shape[0], step):
        fn(blocks[start : start + step], rows[start : start + step])
    return out.view(*shape)


def _reference(raw: torch.Tensor, ggml_type: GGMLQuantizationType, shape: Sequence[int]) -> torch.Tensor:
    import gguf

    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    # The reference works row by row: give it the tensor's rows, not one row of everything.
    row_values = shape[-1] if len(shape) and shape[-1] % block_size == 0 else block_size
    rows = raw.numpy().reshape(-1, row_values // block_size * type_size)
    values = np.asarray(gguf.quants.dequantize(rows, ggml_type), dtype=np.float32)
    if np.shares_memory(values, rows) or not values.flags.writeable:
        values = values.copy()
    return torch.from_numpy(values).view(*shape)
