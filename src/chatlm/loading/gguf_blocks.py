"""GGUF tensors kept block-quantized while loading, for the quantized modules that can take them.

`chatlm.gguf_layers` keeps them as they are (their ``raw`` bytes, in place on the file's map).

A tensor named for a quantized module comes from the GGUF reader as its raw blocks (`GGUFBlocks`); the module
(`chatlm.quantization.QuantizedLinear.load_weight`) asks it for float rows to quantize, or, for Q4_0, Q4_1 and
Q4_K, for its values as they are: group-32 int4 with a scale and a zero point in the int4 format's convention
``w = (q - 8) * scale + zero`` (``d * (q - 8)``, ``d * q + m``, ``d * sc * q - dmin * m`` rewritten so), no
requantization.
"""

from __future__ import annotations

import torch

from . import gguf_dequant
from .gguf_dequant import k4_scales


class GGUFBlocks:
    """A GGUF tensor's raw blocks, (rows, bytes per row) uint8, delivered to a quantized module as they are; a
    stack of matrices (MoE experts, ``shape`` (experts, out, in)) has experts * out rows."""

    def __init__(self, raw: torch.Tensor, ggml_type, shape: tuple[int, ...]):
        self.raw, self.ggml_type, self.shape = raw, ggml_type, tuple(shape)

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    def dequantize(self) -> torch.Tensor:
        return self.float_rows(0, self.raw.shape[0]).view(self.shape)

    def float_rows(self, start: int, stop: int) -> torch.Tensor:
        return gguf_dequant.dequantize(self.raw[start:stop], self.ggml_type, (stop - start, self.shape[-1]))

    @property
    def int4_native(self) -> bool:
        """Q4_0, Q4_1 or Q4_K: group-32 int4 with a scale and a zero point, as they are."""
        return self.ggml_type.name in _GGUF_INT4

    def int4_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [0, 15] int32 (rows, in), scales, zeros (rows, in / 32)) of rows [start, stop) of a Q4 tensor."""
        name, k = self.ggml_type.name, self.shape[1]
        q, scales, zeros = _GGUF_INT4[name](self.raw[start:stop].reshape(-1, _GGUF_BLOCK_BYTES[name]))
        return q.reshape(-1, k), scales.reshape(-1, k // 32), zeros.reshape(-1, k // 32)


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    return b[:, start : start + 2].contiguous().view(torch.float16).float().view(-1)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """(blocks, 16) bytes -> (blocks, 32) values: the low nibbles are values 0-15, the high ones 16-31."""
    return torch.cat([b & 15, b >> 4], dim=1).to(torch.int32)


def _q4_0(b: torch.Tensor):  # d * (q - 8)
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18]), d, torch.zeros_like(d)


def _q4_1(b: torch.Tensor):  # d * q + m = (q - 8) * d + (m + 8 d)
    d, m = _f16(b, 0), _f16(b, 2)
    return _nibbles(b[:, 4:20]), d, m + 8 * d


def _q4_k(b: torch.Tensor):
    # per 32 values: d * sc * q - dmin * m = (q - 8) * (d * sc) + (8 * d * sc - dmin * m)
    n = b.shape[0]
    scale, offset = k4_scales(b)  # (n, 8, 1) each: d * sc and dmin * m
    # 128 bytes: four runs of 32 bytes, each the low nibbles of one group of 32 values and the high of the next
    runs = b[:, 16:144].reshape(n * 4, 32)
    q = torch.stack([runs & 15, runs >> 4], dim=1).to(torch.int32).view(n * 8, 32)
    scale, offset = scale.view(-1), offset.view(-1)
    return q, scale, 8 * scale - offset


_GGUF_INT4 = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}
_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
