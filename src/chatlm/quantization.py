"""Weight-only 8-bit and 4-bit quantization on the CPU, behind transformers' config names.

``from_pretrained(..., quantization_config=QuantizationConfig(load_in_8bit=True))`` (or ``BitsAndBytesConfig``,
so that the guide's code runs) swaps the model's ``nn.Linear`` and ``nn.Embedding`` modules for the quantized
modules below while the model is still on the meta device; each weight is then quantized as it arrives from the
checkpoint, so the float weights of the whole model never exist in memory at once.

Formats:

- int8: symmetric, one float32 scale per output channel (``w = q * scale``, ``q`` in [-127, 127]).
- int4: asymmetric, per group of ``group_size`` inputs (32 by default): a scale and a zero point in the kernel's
  convention ``w = (q - 8) * scale + zero``, ``q`` in [0, 15] (``zero`` is the value of ``q = 8``), packed by
  ``torch._convert_weight_to_int4pack_for_cpu``.
- Embeddings (and ``lm_head``) are int8 per row even in 4-bit mode: the logits are the most sensitive matmul, and
  a lookup dequantizes only the rows it reads. A tied ``lm_head`` shares the embedding's int8 table.
- GGUF (blocks that `chatlm.loading.gguf_blocks` hands over as a `BlockWeight`): in 4-bit mode, Q4_0, Q4_1 and
  Q4_K blocks are kept as they are: group-32 int4 with a scale and a zero point, no requantization
  (``group_size`` does not apply to them). Every other case is dequantized a chunk of rows at a time and quantized
  as a float weight is: Q8_0 (a scale per 32 values) to int8 with one scale per output channel
  (the int8 kernel has no block scales), 4-bit blocks to int8 in 8-bit mode (what was asked for, as transformers
  with bitsandbytes does), other types to the mode's format.

Kernels (``benchmarks/bench_quant_kernels.py``): on x86 CPUs torch's ``_weight_int8pack_mm`` and
``_weight_int4pack_mm_for_cpu`` are fast with bfloat16 activations only (with float32 ones they are scalar code,
10-40x slower than a float32 matmul). So the quantized layers compute in bfloat16 by default (activations rounded
to bfloat16, float32 accumulation, int8 scales applied in float32 afterwards), whatever the model's dtype, as
bitsandbytes computes in ``bnb_4bit_compute_dtype``. Where chatlm's own kernels are built (``chatlm.kernels``),
decoding (up to ``NATIVE_MAX_ROWS`` rows) uses them instead: for int8 layers always, for int4 layers when the
activations are float32 (a float32 model) and the CPU has AVX-512; they compute in float32 throughout (the int4
one reads torch's packed layout as it is) and are at least as fast. Few rows (decode) go to the kernels; many rows (prefill)
are faster as a bfloat16 matmul on weights dequantized one cache-sized tile at a time. ``compute_dtype=float32``
dequantizes tiles to float32 instead, always: exact to float32 rounding against the dequantized weights, for
checks (int8 decodes about 1.5x faster than float32 weights this way, int4 3-5x slower).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels.fused_layer import NativeWeight

# --- configs --------------------------------------------------------------------------------------------------

GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu takes
DEFAULT_GROUP_SIZE = 32  # see benchmarks/README.md: as fast as 128 at decode, clearly more accurate
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Routers stay float: a small error there changes which experts a token goes to.
ALWAYS_FLOAT = ("mlp.gate", "shared_expert_gate")


@dataclass
class QuantizationConfig:
    """``load_in_8bit`` / ``load_in_4bit``: weight-only quantization; ``keep_gguf_blocks``: a GGUF file's
    weights run as the file stores them (Q4_K, Q6_K, Q8_0, ...: `chatlm.gguf_layers`); ``group_size``: inputs
    per 4-bit scale (32, 64, 128 or 256; 32 by default); ``compute_dtype``: what quantized layers compute in
    (``torch.bfloat16``, the default and the fast one, or ``torch.float32``); ``skip_modules``: module names (or
    name suffixes, such as ``"lm_head"``) that stay in float."""

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    keep_gguf_blocks: bool = False
    group_size: int | None = None
    compute_dtype: Any = None
    skip_modules: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.load_in_8bit + self.load_in_4bit + self.keep_gguf_blocks > 1:
            raise ValueError("choose one of load_in_8bit, load_in_4bit and keep_gguf_blocks")
        if self.group_size is not None:
            if not self.load_in_4bit:
                raise ValueError("group_size applies to 4-bit weights (load_in_4bit=True) only")
            if self.group_size not in GROUP_SIZES:
                raise ValueError(
                    f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, not {self.group_size!r}"
                )
        if self.keep_gguf_blocks:  # None (int8 activations) or float32: see chatlm.gguf_layers
            if self.compute_dtype is not None and _compute_dtype(self.compute_dtype) != torch.float32:
                raise ValueError(
                    "GGUF blocks kept as stored compute with int8 activations (the default, as llama.cpp does) or "
                    f"in float32 (compute_dtype=torch.float32), not {self.compute_dtype}"
                )
            self.compute_dtype = None if self.compute_dtype is None else torch.float32
        else:
            self.compute_dtype = _compute_dtype(self.compute_dtype)
        if self.skip_modules is not None and (
            isinstance(self.skip_modules, str) or not all(isinstance(s, str) for s in self.skip_modules)
        ):
            raise TypeError("skip_modules must be a list of module names")

    @property
    def requested(self) -> str | None:
        if self.keep_gguf_blocks:
            return "GGUF blocks as stored"
        return "8-bit" if self.load_in_8bit else "4-bit" if self.load_in_4bit else None

    @property
    def bits(self) -> int | None:
        return 8 if self.load_in_8bit else 4 if self.load_in_4bit else None


def _compute_dtype(value) -> torch.dtype:
    if value is None:
        return torch.bfloat16
    if isinstance(value, str):
        name = value.replace("torch.", "")
        if name in COMPUTE_DTYPES:
            return COMPUTE_DTYPES[name]
    elif value in COMPUTE_DTYPES.values():
        return value
    raise ValueError(
        f"compute dtype {value!r} is not supported for quantized layers: use torch.bfloat16 (fast) or "
        "torch.float32 (exact against the dequantized weights, slower)"
    )


class BitsAndBytesConfig(QuantizationConfig):
    """transformers' ``BitsAndBytesConfig``, mapped onto chatlm's own int8/int4 formats.

    ``bnb_4bit_compute_dtype`` is the compute dtype and ``llm_int8_skip_modules`` the modules kept in float. Fields
    that describe bitsandbytes' own machinery are accepted only at their defaults; anything else is a ValueError
    that says why (chatlm's int8 has no outlier threshold, its 4-bit levels are uniform, neither nf4 nor fp4, ...).
    """

    def __init__(self, load_in_8bit: bool = False, load_in_4bit: bool = False, **kwargs):
        unknown = sorted(set(kwargs) - set(_BNB_FIELDS))
        if unknown:
            raise TypeError(f"BitsAndBytesConfig got unexpected arguments: {', '.join(unknown)}")
        for key, value in kwargs.items():
            default, why = _BNB_FIELDS[key]
            if why is not None and value != default and value is not None:
                raise ValueError(f"BitsAndBytesConfig({key}={value!r}): {why}; leave it at its default")
        self.bnb_options = kwargs
        super().__init__(
            load_in_8bit=load_in_8bit,
            load_in_4bit=load_in_4bit,
            compute_dtype=kwargs.get("bnb_4bit_compute_dtype"),
            skip_modules=kwargs.get("llm_int8_skip_modules"),
        )


# field -> (its default, why another value has no meaning here; None: the field is honoured)
_BNB_FIELDS: dict[str, tuple[Any, str | None]] = {
    "llm_int8_threshold": (
        6.0,
        "chatlm's int8 is weight-only, with no outlier threshold (bitsandbytes' LLM.int8() decomposition)",
    ),
    "llm_int8_skip_modules": (None, None),
    "llm_int8_enable_fp32_cpu_offload": (False, "chatlm puts the whole model on one device, with no offload"),
    "llm_int8_has_fp16_weight": (False, "that is for training, which chatlm does not do"),
    "bnb_4bit_compute_dtype": (None, None),
    "bnb_4bit_quant_type": (
        None,
        "chatlm's 4-bit weights are integers with uniform levels (a scale and a zero point per group of 32), "
        "neither nf4 nor fp4",
    ),
    "bnb_4bit_use_double_quant": (False, "chatlm does not quantize the 4-bit scales themselves"),
    "bnb_4bit_quant_storage": (torch.uint8, "chatlm's 4-bit weights are packed in its kernel's own layout"),
}


def check_quantization(config, device: torch.device | None = None) -> QuantizationConfig | None:
    """The quantization asked for, as a QuantizationConfig (None for none); refuses what cannot be honoured."""
    if config is None:
        return None
    if isinstance(config, dict):
        # transformers' to_dict() form; bitsandbytes fields make it a BitsAndBytesConfig
        fields = {k: v for k, v in config.items() if k != "quant_method"}
        config = (BitsAndBytesConfig if set(fields) & set(_BNB_FIELDS) else QuantizationConfig)(**fields)
    if not isinstance(config, QuantizationConfig):
        raise TypeError(
            f"quantization_config must be a chatlm QuantizationConfig or BitsAndBytesConfig, not {type(config).__name__}"
        )
    if config.requested is None:
        return None
    if device is not None and device.type != "cpu":
        raise ValueError(
            f"{config.requested} weights run on the CPU only: load with device_map='cpu', or without "
            "quantization_config on the GPU"
        )
    return config


# --- quantizers -----------------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 values and float32 scales (out,): ``weight ~ q * scale[:, None]``."""
    w = weight.float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> values in [0, 15] (int32, (out, in)), scales and zero points (out, in / group_size)
    with ``weight ~ (q - 8) * scale + zero`` per group: the group's min and max map to levels 0 and 15."""
    n = weight.shape[0]
    w = weight.float().reshape(n, -1, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = (hi - lo) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.int32)
    return q.reshape(weight.shape), scales, lo + 8 * scales


def pack_int4(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's operands: packed values (out, in / 2) uint8, and scales and zeros (in / group, out, 2)."""
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    return packed, torch.stack([scales.T, zeros.T], -1).to(dtype).contiguous()


# torch's int4 layout (x86 with AVX-512): output channels in blocks of 64, each block stored input by input,
# byte j of an input holding channel j in its low nibble and channel j + 32 in its high one; a tail of 32 or 16
# channels is one block with channel 2j in the low and 2j + 1 in the high nibble. Other CPUs may pack otherwise,
# so the layout is checked against the real packer once per channel count before it is relied on (tiles are
# dequantized for prefill and for float32 compute only: without a known layout the kernel does the work).
_LAYOUT_OK: dict[int, bool] = {}


def _unpack_rows(packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Values [0, 15] uint8 of output channels [start, stop) of a packed int4 weight; start % 64 == 0."""
    k = packed.shape[1] * 2
    flat = packed.view(-1)[start * k // 2 : stop * k // 2]
    full = (stop - start) // 64 * 64
    parts = []
    if full:
        b = flat[: full * k // 2].view(-1, k, 32)  # (blocks, in, 32 bytes)
        parts.append(torch.cat([b & 15, b >> 4], -1).transpose(1, 2).reshape(full, k))
    rest = stop - start - full
    if rest:
        b = flat[full * k // 2 :].view(k, rest // 2)
        parts.append(torch.stack([b & 15, b >> 4], -1).view(k, rest).T)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def layout_known(out_features: int) -> bool:
    if out_features not in _LAYOUT_OK:
        probe = torch.randint(0, 16, (out_features, 32), generator=torch.Generator().manual_seed(0))
        packed = torch._convert_weight_to_int4pack_for_cpu(probe.int(), 1)
        tail = out_features % 64
        ok = tail in (0, 16, 32) and torch.equal(_unpack_rows(packed, 0, out_features).long(), probe)
        _LAYOUT_OK[out_features] = ok
    return _LAYOUT_OK[out_features]


class BlockWeight(Protocol):
    """A weight that arrives block-quantized (GGUF's, `chatlm.loading.gguf_blocks.GGUFBlocks`), for
    ``load_weight``: its rows as float32, and where ``int4_native``, as the group-32 int4 of this module's format.
    Quantization takes it by these methods: the readers of files sit above it and hand it over."""

    shape: tuple[int, ...]

    @property
    def int4_native(self) -> bool: ...

    def float_rows(self, start: int, stop: int) -> torch.Tensor: ...

    def int4_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [0, 15] int32 (rows, in), scales, zeros (rows, in / 32)): ``w = (q - 8) * scale + zero``."""
        ...


# --- modules --------------------------------------------------------------------------------------------------

# Up to this many rows (tokens) the int8 / int4 kernels run; above, a float matmul on weights dequantized one tile
# at a time (measured crossovers on the development CPU, see benchmarks/README.md).
KERNEL_MAX_ROWS = {8: 16, 4: 128}
NATIVE_MAX_ROWS = 16  # up to this many rows chatlm's own kernels (chatlm.kernels) take int8 and int4 layers
TILE_VALUES = 1 << 19  # weights per dequantized tile: 1 MB in bfloat16, 2 MB of float32 transients


def _tile_rows(out_features: int, in_features: int) -> int:
    return min(out_features, max(64, TILE_VALUES // in_features // 64 * 64))


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with int8 or int4 weights (see the module docstring); the bias stays in the model's dtype.

    Built on the meta device with the float layer's shape; ``load_weight`` quantizes a float weight (or takes a
    block-quantized one (`BlockWeight`) when the checkpoint delivers it. ``bits`` is 8 or 4 from then on.
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.bits, self.group_size, self.compute_dtype = bits, group_size, compute_dtype
        self.register_buffer("qweight", None)  # int8 (out, in), or int4 packed (out, in / 2) uint8
        self.register_buffer("scales", None)  # int8: (out,) float32; int4: (in / group, out, 2) compute dtype

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @staticmethod
    def fits_int4(out_features: int, in_features: int, group_size: int) -> bool:
        return out_features % 16 == 0 and in_features % group_size == 0

    def load_weight(self, weight: torch.Tensor | BlockWeight) -> None:
        """Quantize a float (out, in) weight, or keep a block-quantized one (`BlockWeight`: GGUF's) in its
        nearest lossless form. Works through the rows in chunks, so that no float copy of the whole weight is made."""
        n = self.out_features
        native = not isinstance(weight, torch.Tensor) and weight.int4_native
        if native and self.bits == 4 and self.fits_int4(n, self.in_features, 32):
            # 4-bit GGUF blocks stay as they are: group 32 whatever group_size says, no requantization
            self.group_size = 32
            self.qweight, self.scales = _pack_chunks(
                n, self.in_features, weight.int4_rows, self.compute_dtype
            )
            self._loaded()
            return
        rows = _float_rows(weight)
        if self.bits == 4 and self.fits_int4(n, self.in_features, self.group_size):
            quantized = lambda a, b: quantize_int4(rows(a, b), self.group_size)  # noqa: E731
            self.qweight, self.scales = _pack_chunks(n, self.in_features, quantized, self.compute_dtype)
        else:  # 8 bits asked for, or a shape the int4 kernel cannot take (out % 16, in % group_size)
            self.bits = 8
            self.qweight, self.scales = _quantize_int8_chunks(n, self.in_features, rows)
        self._loaded()

    def native_weight(self) -> NativeWeight | None:
        """The operands for chatlm's native kernels (the fused decode layer, `chatlm.kernels.fused_layer`): int8,
        or int4 in the packed layout they read; None before loading and for any other int4 layout."""
        if self.qweight is None or (self.bits == 4 and not self._native_int4):
            return None
        group = self.group_size if self.bits == 4 else 0
        return NativeWeight(
            self.bits, self.qweight, self.scales, group, self.out_features, self.in_features, self.bias
        )

    def tie_to(self, embedding: QuantizedEmbedding) -> None:
        """Share a quantized embedding's int8 table (tied word embeddings)."""
        self.bits = 8
        self.qweight, self.scales = embedding.qweight, embedding.scales
        self._loaded()

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, (out, in), in ``dtype`` (for checks and tests)."""
        if self.bits == 8:
            return (self.qweight.float() * self.scales[:, None]).to(dtype)
        return self._dequantize_rows(0, self.out_features).to(dtype)

    def _dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """int4: channels [start, stop) as float32 (start a multiple of 64 where the layout is read)."""
        k, g = self.in_features, self.group_size
        if layout_known(self.out_features):
            q = _unpack_rows(self.qweight, start, stop)
        else:  # the values through the kernel itself: x = identity, scale 1, zero 0
            eye = torch.eye(k, dtype=self.scales.dtype)
            unit = torch.zeros_like(self.scales)
            unit[..., 0] = 1
            q = torch._weight_int4pack_mm_for_cpu(eye, self.qweight, g, unit).T[start:stop] + 8
        sz = self.scales[:, start:stop].float().transpose(0, 1)  # (rows, groups, 2)
        w = (q.reshape(stop - start, -1, g).float() - 8) * sz[..., :1] + sz[..., 1:]
        return w.view(stop - start, k)

    def _loaded(self) -> None:
        """Fix the path per row count once the format is known: the kernels up to ``_kernel_rows`` rows, tiles
        above (float32 compute: always tiles; an int4 layout we cannot read: always the kernel)."""
        tiles = self.bits == 8 or layout_known(self.out_features)
        if not tiles:
            self._kernel_rows = 1 << 62
        elif self.compute_dtype == torch.bfloat16:
            self._kernel_rows = KERNEL_MAX_ROWS[self.bits]
        else:
            self._kernel_rows = 0
        self._unit_scales = torch.ones(self.out_features, dtype=self.compute_dtype)  # int8: scaled afterwards
        # chatlm's own int4 kernel reads torch's packed layout in whole blocks of 64 channels
        self._native_int4 = self.bits == 4 and self.out_features % 64 == 0 and layout_known(self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._native_int4 and x2.dtype == torch.float32 and x2.shape[0] <= NATIVE_MAX_ROWS:
            # float32 activations as they are (torch's kernel would round them to bfloat16), and faster
            y = kernels.int4_linear(x2, self.qweight, self.scales, self.group_size)
            if y is not None:
                if self.bias is not None:
                    y = y + self.bias
                return y.view(*shape[:-1], self.out_features)
        if self.bits == 4 and x2.dtype == self.compute_dtype and x2.shape[0] <= self._kernel_rows:
            # decoding's common case, with nothing to convert: straight to the kernel
            y = torch._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*shape[:-1], self.out_features)
        y = None
        if self.bits == 8 and x2.shape[0] <= NATIVE_MAX_ROWS:
            y = kernels.int8_linear(x2, self.qweight, self.scales)  # float32 throughout, scales applied
        if y is None:
            y = self._torch_forward(x2)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        y = self._kernel(x) if x.shape[0] <= self._kernel_rows else self._tiled(x)
        if self.bits == 8:
            y = y * self.scales  # the int8 scales, applied in float32 (type promotion) to the output channels
        return y

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return torch._weight_int8pack_mm(x, self.qweight, self._unit_scales)
        return torch._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scales)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T, W dequantized to x's dtype one tile of output channels at a time (int8: not yet scaled)."""
        n = self.out_features
        step = _tile_rows(n, self.in_features)
        if self.bits == 8:
            tiles = [F.linear(x, self.qweight[i : i + step].to(x.dtype)) for i in range(0, n, step)]
            return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)
        whole = n // 64 * 64
        tiles = []
        for start in range(0, whole, step):
            blocks = self._int4_blocks(start, min(whole, start + step), x.dtype)  # (blocks, in, 64)
            tiles.append(torch.matmul(x, blocks).transpose(0, 1).reshape(x.shape[0], -1))
        if whole < n:  # a tail of 16 or 32 channels
            tiles.append(F.linear(x, self._dequantize_rows(whole, n).to(x.dtype)))
        return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)

    def _int4_blocks(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Channels [start, stop) (whole blocks of 64) dequantized, as (blocks, in, 64): W^T block by block,
        straight from the packed layout (see `_unpack_rows`)."""
        k, g = self.in_features, self.group_size
        nb = (stop - start) // 64
        b = self.qweight.view(-1)[start * k // 2 : stop * k // 2].view(nb, k, 32)
        q = torch.cat([b & 15, b >> 4], dim=-1).float().view(nb, k // g, g, 64)
        sz = self.scales[:, start:stop].float().reshape(k // g, nb, 64, 2).transpose(0, 1).unsqueeze(2)
        scale, zero = sz[..., 0], sz[..., 1]  # (blocks, groups, 1, 64)
        out = torch.empty(nb, k, 64, dtype=dtype)
        torch.addcmul(zero - 8 * scale, q, scale, out=out.view(nb, k // g, g, 64))
        return out

    def extra_repr(self) -> str:
        kind = "int8" if self.bits == 8 else f"int4, group {self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, compute {self.compute_dtype}"


CHUNK_VALUES = 1 << 18  # weights quantized per step while loading: about 1 MB of each float transient


def _chunk_rows(n: int, k: int) -> int:
    return max(128, CHUNK_VALUES // k // 128 * 128)  # whole blocks of the int4 layout


def _float_rows(weight) -> Callable[[int, int], torch.Tensor]:
    """rows(start, stop) -> those rows of a float tensor or of a block-quantized weight, as float32."""
    if not isinstance(weight, torch.Tensor):
        return weight.float_rows
    return lambda start, stop: weight[start:stop].float()


def _quantize_int8_chunks(n: int, k: int, rows) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.float32)
    step = _chunk_rows(n, k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        q[start:stop], scales[start:stop] = quantize_int8(rows(start, stop))
    return q, scales


def _pack_chunks(n: int, k: int, chunk, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack an int4 weight from chunk(start, stop) -> (q, scales, zeros) of those rows. Chunks are packed one
    by one where packing is known to work block by block (the int32 values of the whole weight never exist);
    else the values are gathered and packed at once."""
    step = _chunk_rows(n, k) if _chunked_packing_ok() else n
    parts = [pack_int4(*chunk(start, min(n, start + step)), dtype) for start in range(0, n, step)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p for p, _ in parts]), torch.cat([sz for _, sz in parts], dim=1)


_CHUNKED_PACKING: list[bool] = []


def _chunked_packing_ok() -> bool:
    """Whether packing rows in chunks of 128 and concatenating equals packing them at once (on this CPU)."""
    if not _CHUNKED_PACKING:
        q = torch.randint(0, 16, (336, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        whole = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        parts = [
            torch._convert_weight_to_int4pack_for_cpu(q[i : i + 128].contiguous(), 1) for i in (0, 128, 256)
        ]
        _CHUNKED_PACKING.append(torch.equal(whole, torch.cat(parts)))
    return _CHUNKED_PACKING[0]


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` with an int8 table, one float32 scale per row; a lookup dequantizes only its rows."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.dtype = dtype
        self.register_buffer("qweight", None)  # (rows, dim) int8
        self.register_buffer("scales", None)  # (rows,) float32

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def load_weight(self, weight) -> None:
        self.qweight, self.scales = _quantize_int8_chunks(*self.weight_shape, _float_rows(weight))

    def num_weights(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scales[:, None]).to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight).float() * F.embedding(ids, self.scales[:, None])
        return rows.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def quantize_modules(model: nn.Module, config: QuantizationConfig, dtype: torch.dtype) -> None:
    """Swap the model's linear layers and embeddings for quantized ones (on the meta device, before loading).

    Linear layers get ``config.bits`` (``lm_head`` 8); embeddings int8. Routers and ``skip_modules`` stay float;
    with tied word embeddings, ``lm_head`` and the embedding are quantized together or not at all.
    """
    skip = tuple(config.skip_modules or ())
    group = config.group_size or DEFAULT_GROUP_SIZE

    def skipped(name: str) -> bool:
        return any(name == s or name.endswith("." + s) for s in skip + ALWAYS_FLOAT)

    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and (skipped("lm_head") or skipped("model.embed_tokens")):
        skip = skip + ("lm_head", "model.embed_tokens")
    for name, module in list(model.named_modules()):
        if skipped(name):
            continue
        if isinstance(module, nn.Linear):
            bits = 8 if name == "lm_head" else config.bits
            new = QuantizedLinear(module, bits, group, config.compute_dtype)
        elif isinstance(module, nn.Embedding):
            new = QuantizedEmbedding(module, dtype)
        else:
            continue
        model.set_submodule(name, new)
    model.quantization_config = config


def quantized_slots(model: nn.Module) -> dict[str, nn.Module]:
    """Checkpoint name of each quantized weight -> the module that takes it (``load_weight``: ours, or
    `chatlm.gguf_layers`' modules, which keep GGUF blocks as stored)."""
    return {
        name + getattr(m, "weight_suffix", ".weight"): m
        for name, m in model.named_modules()
        if hasattr(m, "load_weight")
    }
