"""A fast reader for GGUF files (versions 2 and 3, little-endian).

A GGUF file is a header (magic ``GGUF``, version, tensor count, key/value count), the metadata key/values, one
info record per tensor (name, dimensions, ggml type, offset into the data section), padding up to the alignment
(``general.alignment``, 32 by default) and the tensor data.

`gguf.GGUFReader` builds a numpy view for every scalar of the metadata, which costs seconds for a vocabulary of
100k strings. We parse the metadata into plain Python values in one pass over the mapped file (strings decoded
from slices of one buffer; about 0.05 s for a 49k-token vocabulary with its merges) and expose each tensor's data
as a numpy view on one copy-on-write memory map of the file, mapped when tensor data is first asked for: nothing
is read from the tensor data until it is used.

`open_gguf_file` keeps the last two files parsed, so the tokenizer and the model of one file share one parse.
Big-endian files are refused with a clear error.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Fixed-size value types: struct format (little-endian) and numpy dtype for arrays of them.
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    GGUFValueType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    GGUFValueType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    GGUFValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    GGUFValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    GGUFValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    GGUFValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    GGUFValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    GGUFValueType.BOOL: (struct.Struct("<B"), np.dtype("<u1")),
    GGUFValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    GGUFValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    GGUFValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Arrays of arrays of ... deeper than this are refused (no real file nests more than twice).
_MAX_NESTING = 16

# Unquantized tensor types whose data we expose typed (as gguf.GGUFReader does); the others come as raw bytes.
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("<i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


class GGUFFormatError(ValueError):
    """A file that is not a GGUF file, or not one we can read. ``reason`` is the message without the path."""

    def __init__(self, path: Path, reason: str, *, not_gguf: bool = False):
        self.path = path
        self.reason = reason
        what = "is not a GGUF file" if not_gguf else "is not a readable GGUF file"
        super().__init__(f"{path} {what}: {reason}")


class _Truncated(Exception):
    """Internal: a read past the end of the file (turned into GGUFFormatError with the path)."""


class GGUFTensor:
    """One tensor of a GGUF file: its info record, and its data as a view on the file's memory map.

    ``dims`` are in GGUF order (innermost first, as ggml's ``ne``); ``shape`` is the row-major numpy/torch shape,
    ``dims`` reversed. ``data`` is a read-only numpy view: typed with ``shape`` for F32/F16/F64/I8..I64, raw bytes
    shaped ``(*shape[:-1], bytes per row)`` for block-quantized types (as ``gguf.GGUFReader`` gives it).
    """

    __slots__ = ("name", "ggml_type", "dims", "offset", "data_offset", "n_elements", "n_bytes", "_file")

    def __init__(
        self,
        name: str,
        ggml_type: GGMLQuantizationType,
        dims: tuple[int, ...],
        offset: int,
        data_offset: int,
        n_elements: int,
        n_bytes: int,
        file: GGUFFile,
    ):
        self.name = name
        self.ggml_type = ggml_type
        self.dims = dims
        self.offset = offset
        self.data_offset = data_offset
        self.n_elements = n_elements
        self.n_bytes = n_bytes
        self._file = file

    @property
    def tensor_type(self) -> GGMLQuantizationType:
        """``ggml_type``, under gguf.GGUFReader's name."""
        return self.ggml_type

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def raw(self) -> np.ndarray:
        """The tensor's bytes: a read-only 1-D uint8 view on the memory map."""
        view = self._file._map[self.data_offset : self.data_offset + self.n_bytes]
        view = view.view(np.ndarray)
        view.flags.writeable = False
        return view

    def torch_bytes(self) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 torch tensor on the memory map (no copy).

        The map is copy-on-write: writing to this tensor would change what this process (and every user of the
        cached parse) sees of the file, never the file itself. Read it only.
        """
        return torch.from_numpy(
            self._file._map[self.data_offset : self.data_offset + self.n_bytes].view(np.ndarray)
        )

    @property
    def data(self) -> np.ndarray:
        raw = self.raw
        dtype = _PLAIN_DTYPES.get(self.ggml_type)
        if dtype is not None:
            return raw.view(dtype).reshape(self.shape)
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        shape = self.shape or (1,)
        return raw.reshape(*shape[:-1], shape[-1] // block_size * type_size)

    def __repr__(self) -> str:
        return f"GGUFTensor({self.name!r}, {self.ggml_type.name}, shape={self.shape})"


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (key -> Python value), ``value_types`` and ``tensors``.

    Values are what ``gguf.GGUFReader``'s ``field.contents()`` gives: ``int``/``float``/``bool``/``str`` for
    scalars and lists for arrays, except that arrays of arrays come as nested lists (the reader flattens them).
    ``value_types[key]`` is the key's type chain as in the reader's ``field.types``: ``(STRING,)``,
    ``(ARRAY, INT32)``, ``(ARRAY, ARRAY, STRING)``, ...
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {self.path}")
        st = self.path.stat()
        self.size = st.st_size
        self._stamp = (st.st_size, st.st_mtime_ns)
        if self.size < 4:
            with open(self.path, "rb") as f:
                magic = f.read()
            raise GGUFFormatError(self.path, f"it starts with {magic!r}, not {GGUF_MAGIC!r}", not_gguf=True)
        self._mm: np.memmap | None = None
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[GGUFValueType, ...]] = {}
        self.tensors: list[GGUFTensor] = []
        try:
            self._parse(memoryview(self._map))
        except _Truncated as e:
            raise GGUFFormatError(self.path, f"truncated or corrupt: {e}") from None
        finally:
            # Everything parsed is in Python objects now; the map comes back when tensor data is asked for.
            self.close()
        self._by_name = {t.name: t for t in self.tensors}

    @property
    def _map(self) -> np.memmap:
        """The whole file, mapped copy-on-write (views are writable for torch.from_numpy without any write
        reaching the file; we hand out read-only numpy views)."""
        mm = self._mm
        if mm is None:
            st = self.path.stat()
            if (st.st_size, st.st_mtime_ns) != self._stamp:
                raise ValueError(f"{self.path} has changed since it was read: open it again")
            mm = self._mm = np.memmap(self.path, dtype=np.uint8, mode="c")
        return mm

    def close(self) -> None:
        """Drop this object's map of the file (views handed out keep theirs); the next data access maps it again.

        A parse stays in `open_gguf_file`'s cache: closing lets the file be replaced or deleted on systems that
        lock mapped files (Windows) once the tensors have been read.
        """
        self._mm = None

    def release(self, tensor: GGUFTensor) -> None:
        """Let the kernel drop the pages of a tensor that has been read (copied out): they stop counting in this
        process's resident memory, so loading a model never holds the whole file and the weights at once. The
        map is private and never written, so a later read simply faults the file's pages in again."""
        mm = self._mm
        advise = getattr(mmap, "MADV_DONTNEED", None)
        if mm is None or advise is None or not isinstance(getattr(mm, "_mmap", None), mmap.mmap):
            return
        page = mmap.PAGESIZE
        start = -(-tensor.data_offset // page) * page  # whole pages inside the tensor only
        stop = (tensor.data_offset + tensor.n_bytes) // page * page
        if stop > start:
            mm._mmap.madvise(advise, start, stop - start)

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ access

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.metadata

    def __getitem__(self, key: str) -> Any:
        return self.metadata[key]

    def tensor(self, name: str) -> GGUFTensor:
        return self._by_name[name]

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

    # ----------------------------------------------------------------------------------------------- parsing

    def _parse(self, buf: memoryview) -> None:
        size = len(buf)
        magic = bytes(buf[:4])
        if magic != GGUF_MAGIC:
            raise GGUFFormatError(self.path, f"it starts with {magic!r}, not {GGUF_MAGIC!r}", not_gguf=True)
        if size < 24:
            raise _Truncated(f"the header needs 24 bytes, the file has {size}")
        (version,) = _U32.unpack_from(buf, 4)
        if version & 0xFFFF == 0 and int.from_bytes(bytes(buf[4:8]), "big") in SUPPORTED_VERSIONS:
            raise GGUFFormatError(self.path, "it is big-endian; chatlm reads little-endian GGUF files only")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFFormatError(
                self.path,
                f"it is GGUF version {version}; chatlm reads versions {', '.join(map(str, SUPPORTED_VERSIONS))}",
            )
        self.version = version
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        reader = _Reader(buf, 24)
        for _ in range(n_kv):
            key = reader.string()
            vtype = reader.u32()
            if key in self.metadata:
                raise GGUFFormatError(self.path, f"the key {key!r} appears twice")
            try:
                value, types = reader.value(vtype)
            except _BadType as e:
                raise GGUFFormatError(self.path, f"the key {key!r} has an unknown value type {e}") from None
            except UnicodeDecodeError as e:
                raise GGUFFormatError(
                    self.path, f"the key {key!r} has a string that is not UTF-8: {e}"
                ) from None
            self.metadata[key] = value
            self.value_types[key] = types

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in self.metadata and (
            self.value_types["general.alignment"] != (GGUFValueType.UINT32,)
            or alignment == 0
            or alignment & (alignment - 1)
        ):
            raise GGUFFormatError(
                self.path, f"general.alignment must be a power of two stored as uint32, not {alignment!r}"
            )
        self.alignment = alignment

        infos = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = reader.u32()
            if n_dims > 8:
                raise _Truncated(f"tensor {name!r} claims {n_dims} dimensions")
            dims = reader.array_of(np.dtype("<u8"), n_dims)
            raw_type = reader.u32()
            offset = reader.u64()
            infos.append((name, tuple(dims.tolist()), raw_type, offset))
        self.data_offset = -(-reader.pos // alignment) * alignment

        names: set[str] = set()
        for name, dims, raw_type, offset in infos:
            if name in names:
                raise GGUFFormatError(self.path, f"the tensor {name!r} appears twice")
            names.add(name)
            try:
                ggml_type = GGMLQuantizationType(raw_type)
                block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            except (ValueError, KeyError):
                raise GGUFFormatError(
                    self.path, f"the tensor {name!r} has an unknown ggml type {raw_type}"
                ) from None
            n_elements = 1
            for d in dims:
                n_elements *= d
            if dims and dims[0] % block_size:
                raise GGUFFormatError(
                    self.path,
                    f"the tensor {name!r} has rows of {dims[0]} values, not a multiple of the {ggml_type.name} "
                    f"block size {block_size}",
                )
            if offset % alignment:
                raise GGUFFormatError(
                    self.path, f"the tensor {name!r} starts at offset {offset}, not aligned to {alignment}"
                )
            n_bytes = n_elements // block_size * type_size
            start = self.data_offset + offset
            if start + n_bytes > size:
                raise _Truncated(
                    f"the tensor {name!r} ends at byte {start + n_bytes}, past the end of the file ({size} bytes)"
                )
            self.tensors.append(GGUFTensor(name, ggml_type, dims, offset, start, n_elements, n_bytes, self))
        self._check_layout(size)

    def _check_layout(self, size: int) -> None:
        """Writers pack tensor data back to back, each padded to the alignment. A tensor that overlaps the next,
        or leaves a gap of a whole alignment unit or more before it (or before the file's end), does not hold
        what its type and shape declare (an F32 tensor declared Q4_0 leaves most of its bytes unread): refused,
        rather than loaded as garbage."""
        placed = sorted(self.tensors, key=lambda t: t.data_offset)
        for tensor, following in zip(placed, placed[1:] + [None]):
            end = tensor.data_offset + tensor.n_bytes
            limit, what = (
                (following.data_offset, f"the tensor {following.name!r}")
                if following
                else (size, "the file's end")
            )
            if end > limit:
                raise GGUFFormatError(
                    self.path,
                    f"the tensor {tensor.name!r} ({tensor.tensor_type.name}, {tensor.n_bytes} bytes) overlaps {what}",
                )
            if limit - end >= self.alignment:
                raise GGUFFormatError(
                    self.path,
                    f"the tensor {tensor.name!r} declares {tensor.tensor_type.name} {list(tensor.shape)} "
                    f"({tensor.n_bytes} bytes), but {limit - end} more bytes lie before {what}: its declared type or "
                    "shape does not match its data",
                )


class _BadType(Exception):
    pass


class _Reader:
    """Reads GGUF values from a buffer, position by position, checking every read against the buffer's end."""

    __slots__ = ("buf", "pos", "size")

    def __init__(self, buf: memoryview, pos: int):
        self.buf = buf
        self.pos = pos
        self.size = len(buf)

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise _Truncated(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")

    def u32(self) -> int:
        self._need(4, "a uint32")
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self._need(8, "a uint64")
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        self._need(n, f"a string of {n} bytes")
        s = str(self.buf[self.pos : self.pos + n], "utf-8")
        self.pos += n
        return s

    def array_of(self, dtype: np.dtype, count: int) -> np.ndarray:
        self._need(count * dtype.itemsize, f"an array of {count} values")
        a = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return a

    def value(self, vtype: int, depth: int = 0) -> tuple[Any, tuple[GGUFValueType, ...]]:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            fmt = scalar[0]
            self._need(fmt.size, "a value")
            (v,) = fmt.unpack_from(self.buf, self.pos)
            self.pos += fmt.size
            return (v != 0 if vtype == GGUFValueType.BOOL else v), (GGUFValueType(vtype),)
        if vtype == GGUFValueType.STRING:
            return self.string(), (GGUFValueType.STRING,)
        if vtype == GGUFValueType.ARRAY:
            if depth >= _MAX_NESTING:
                raise _Truncated(f"arrays nested more than {_MAX_NESTING} deep at byte {self.pos}")
            item_type = self.u32()
            count = self.u64()
            return self._array(item_type, count, depth + 1)
        raise _BadType(vtype)

    def _array(self, item_type: int, count: int, depth: int) -> tuple[list, tuple[GGUFValueType, ...]]:
        scalar = _SCALARS.get(item_type)
        if scalar is not None:
            values = self.array_of(scalar[1], count)
            if item_type == GGUFValueType.BOOL:
                values = values != 0
            return values.tolist(), (GGUFValueType.ARRAY, GGUFValueType(item_type))
        if item_type == GGUFValueType.STRING:
            return self._strings(count), (GGUFValueType.ARRAY, GGUFValueType.STRING)
        if item_type == GGUFValueType.ARRAY:
            items = []
            # An empty array of arrays does not say what its arrays hold.
            item_types: tuple[GGUFValueType, ...] = (GGUFValueType.ARRAY,)
            for _ in range(count):
                value, item_types = self.value(GGUFValueType.ARRAY, depth)
                items.append(value)
            return items, (GGUFValueType.ARRAY, *item_types)
        raise _BadType(item_type)

    def _strings(self, count: int) -> list[str]:
        # The hot loop of the whole parse (a vocabulary is 30k-250k strings): locals only, one bounds check.
        buf, pos, size = self.buf, self.pos, self.size
        if count * 8 > size - pos:
            raise _Truncated(f"an array of {count} strings at byte {pos} runs past the end of the file")
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                end = pos + n
                append(str(buf[pos:end], "utf-8"))
                pos = end
        except struct.error:
            raise _Truncated(f"an array of {count} strings runs past the end of the file") from None
        # A slice past the end is silently short: one check at the end catches it (pos only grows).
        if pos > size:
            raise _Truncated(f"an array of {count} strings runs past the end of the file ({size} bytes)")
        self.pos = pos
        return out


# ---------------------------------------------------------------------------------------------------- cache

_CACHE_SIZE = 2
_cache: OrderedDict[tuple, GGUFFile] = OrderedDict()
_cache_lock = threading.Lock()


def open_gguf_file(path: str | os.PathLike) -> GGUFFile:
    """The parsed GGUF file at ``path``, shared with earlier callers while the file is unchanged.

    Keyed on the resolved path, size, modification time and inode, and holding the last two files, so that
    loading a tokenizer and then a model from one file parses it once. A file rewritten in place with the same
    size within one tick of the file system's clock would be missed: call `clear_gguf_cache` after such a write.
    """
    path = Path(path).expanduser()
    try:
        resolved = path.resolve()
        st = resolved.stat()
    except OSError:
        raise FileNotFoundError(f"no such GGUF file: {path}") from None
    key = (str(resolved), st.st_size, st.st_mtime_ns, st.st_ino)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
    parsed = GGUFFile(path)
    with _cache_lock:
        # Drop an older parse of the same path: it describes a file that has changed since.
        for old in [k for k in _cache if k[0] == key[0]]:
            del _cache[old]
        _cache[key] = parsed
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return parsed


def clear_gguf_cache() -> None:
    with _cache_lock:
        _cache.clear()
