"""Our GGUF reader and dequantizers against the gguf package's reader and numpy reference dequantizers."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFValueType
from gguf import GGMLQuantizationType as Q

from chatlm.loading import gguf_dequant, gguf_file, gguf_model
from chatlm.loading.gguf_dequant import FAST_TYPES, dequantize
from chatlm.loading.gguf_file import GGUFFile, open_gguf_file
from chatlm.loading.gguf_tokenizer import load_gguf_tokenizer
from chatlm.loading.resolve import bundled_model_path


def reader_metadata(reader: gguf.GGUFReader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def assert_same_as_reader(ours: GGUFFile, reader: gguf.GGUFReader, *, skip: tuple[str, ...] = ()) -> None:
    expected = {k: v for k, v in reader_metadata(reader).items() if k not in skip}
    assert {k: v for k, v in ours.metadata.items() if k not in skip} == expected
    assert list(ours.metadata) == list(reader_metadata(reader))  # same keys, same order
    for key in expected:
        if key not in skip and ours.metadata[key] != []:  # the reader has no item type for an empty array
            assert ours.value_types[key] == tuple(reader.fields[key].types), key
    assert ours.alignment == reader.alignment
    assert ours.data_offset == reader.data_offset
    assert ours.version == reader.fields["GGUF.version"].contents()
    assert len(ours.tensors) == len(reader.tensors)
    for mine, theirs in zip(ours.tensors, reader.tensors):
        assert mine.name == theirs.name
        assert mine.ggml_type == theirs.tensor_type
        assert mine.dims == tuple(theirs.shape.tolist())
        assert mine.shape == tuple(reversed(theirs.shape.tolist()))
        assert (mine.n_elements, mine.n_bytes, mine.data_offset) == (
            theirs.n_elements,
            theirs.n_bytes,
            theirs.data_offset,
        )
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
        assert np.array_equal(mine.data.view(np.uint8), theirs.data.view(np.uint8))
        assert not mine.data.flags.writeable


# --- files written with gguf.GGUFWriter -----------------------------------------------------------------------

SCALARS = [
    ("t.uint8", GGUFValueType.UINT8, 250),
    ("t.int8", GGUFValueType.INT8, -100),
    ("t.uint16", GGUFValueType.UINT16, 65000),
    ("t.int16", GGUFValueType.INT16, -32000),
    ("t.uint32", GGUFValueType.UINT32, 4_000_000_000),
    ("t.int32", GGUFValueType.INT32, -2_000_000_000),
    ("t.float32", GGUFValueType.FLOAT32, 0.1),
    ("t.uint64", GGUFValueType.UINT64, 2**64 - 1),
    ("t.int64", GGUFValueType.INT64, -(2**63)),
    ("t.float64", GGUFValueType.FLOAT64, 0.1),
    ("t.bool.true", GGUFValueType.BOOL, True),
    ("t.bool.false", GGUFValueType.BOOL, False),
    ("t.string", GGUFValueType.STRING, "naïve café — 你好 🙂"),
    ("t.string.empty", GGUFValueType.STRING, ""),
]
ARRAYS = [
    ("a.uint8", GGUFValueType.UINT8, [0, 1, 255]),
    ("a.int8", GGUFValueType.INT8, [-128, 0, 127]),
    ("a.uint16", GGUFValueType.UINT16, [0, 65535]),
    ("a.int16", GGUFValueType.INT16, [-32768, 32767]),
    ("a.uint32", GGUFValueType.UINT32, [0, 2**32 - 1]),
    ("a.int32", GGUFValueType.INT32, [-(2**31), 2**31 - 1, 7]),
    ("a.float32", GGUFValueType.FLOAT32, [0.5, -1.25, 3.4e38]),
    ("a.uint64", GGUFValueType.UINT64, [0, 2**64 - 1]),
    ("a.int64", GGUFValueType.INT64, [-(2**63), 2**63 - 1]),
    ("a.float64", GGUFValueType.FLOAT64, [0.1, -2.5e300]),
    ("a.bool", GGUFValueType.BOOL, [True, False, True]),
    ("a.string", GGUFValueType.STRING, ["", "a", "ü", "你好", "🙂 x", "<|im_end|>", "\u2581the", "\x00nul"]),
]


def write_gguf(path: Path, *, alignment: int | None = None, arch: str = "llama") -> dict[str, np.ndarray]:
    """A small GGUF with every kind of metadata value and tensors of several types; returns the tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, vtype, value in SCALARS:
        writer.add_key_value(key, value, vtype)
    for key, vtype, value in ARRAYS:
        writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=vtype)
    writer.add_key_value(
        "a.nested", [[1, 2, 3], [4], [5, 6]], GGUFValueType.ARRAY, sub_type=GGUFValueType.ARRAY
    )
    writer.add_array("a.many_strings", [f"tok{i}·{chr(0x4E00 + i)}" for i in range(3000)])
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    rng = np.random.default_rng(0)
    tensors = {
        "f32.1d": rng.standard_normal(7).astype(np.float32),
        "f32.3d": rng.standard_normal((2, 3, 5)).astype(np.float32),
        "f16.2d": rng.standard_normal((3, 33)).astype(np.float16),
        "i32.1d": np.arange(5, dtype=np.int32),
    }
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    quantized = {
        "q8_0.2d": (Q.Q8_0, rng.standard_normal((4, 64)).astype(np.float32)),
        "q4_1.3d": (Q.Q4_1, rng.standard_normal((2, 3, 32)).astype(np.float32)),
        "bf16.2d": (Q.BF16, rng.standard_normal((5, 6)).astype(np.float32)),
    }
    for name, (qtype, values) in quantized.items():
        writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        tensors[name] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf_file") / "small.gguf"
    write_gguf(path)
    return path


def test_small_file_equals_gguf_reader(small_gguf):
    ours = GGUFFile(small_gguf)
    reader = gguf.GGUFReader(small_gguf)
    # The reader flattens arrays of arrays; we keep them nested (checked below).
    assert_same_as_reader(ours, reader, skip=("a.nested",))
    for key, _, value in SCALARS + ARRAYS:
        if "float" in key:
            assert np.allclose(ours[key], value), key
        else:
            assert ours[key] == value, key
    assert ours["t.float32"] == float(np.float32(0.1)) and ours["t.float64"] == 0.1
    assert ours["t.bool.true"] is True and ours["a.bool"] == [True, False, True]
    assert ours["a.nested"] == [[1, 2, 3], [4], [5, 6]]
    assert ours.value_types["a.nested"] == (GGUFValueType.ARRAY, GGUFValueType.ARRAY, GGUFValueType.INT32)
    assert ours.get("missing", 5) == 5 and "t.string" in ours
    assert ours.tensor("f32.3d").shape == (2, 3, 5) and ours.tensor("f32.3d").dims == (5, 3, 2)


def test_tensor_data_and_dequantized_values(tmp_path):
    path = tmp_path / "t.gguf"
    tensors = write_gguf(path)
    ours = GGUFFile(path)
    for name in ("f32.1d", "f32.3d", "f16.2d", "i32.1d"):
        assert np.array_equal(ours.tensor(name).data, tensors[name])
    for tensor in ours.tensors:
        if tensor.ggml_type == Q.I32:
            continue
        expected = np.asarray(gguf.quants.dequantize(tensor.data, tensor.ggml_type), dtype=np.float32)
        got = gguf_model.dequantize(tensor)
        assert got.dtype == np.float32 and got.shape == tensor.shape and got.flags.writeable
        assert np.array_equal(got, expected.reshape(tensor.shape)), tensor.name


@pytest.mark.parametrize("alignment", [8, 64, 256])
def test_custom_alignment(tmp_path, alignment):
    path = tmp_path / "aligned.gguf"
    write_gguf(path, alignment=alignment)
    ours = GGUFFile(path)
    assert ours.alignment == alignment and ours.data_offset % alignment == 0
    assert_same_as_reader(ours, gguf.GGUFReader(path), skip=("a.nested",))


def test_bundled_file_equals_gguf_reader():
    path = _bundled()
    assert_same_as_reader(GGUFFile(path), gguf.GGUFReader(path))


def test_bundled_metadata_parses_fast():
    import time

    path = _bundled()
    start = time.perf_counter()
    GGUFFile(path)
    # GGUFReader takes seconds here; ours about 0.05 s (the bound leaves room for a busy machine).
    assert time.perf_counter() - start < 1.5


def test_bundled_tensors_dequantize_as_before():
    """Every tensor of the bundled model, renamed and un-permuted as the loader does, equals what the numpy
    reference dequantizer gives for it (bit for bit)."""
    path = _bundled()
    reader = gguf_model.open_gguf(path)
    config = gguf_model.gguf_config(reader, path)
    for (name, weight), tensor in zip(gguf_model.read_gguf_tensors(reader, config, path), reader.tensors):
        expected = np.array(
            gguf.quants.dequantize(tensor.data, tensor.ggml_type), dtype=np.float32, copy=True
        )
        expected = torch.from_numpy(expected.reshape(tensor.shape))
        if name.endswith("q_proj.weight"):
            expected = gguf_model._unpermute(expected, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            expected = gguf_model._unpermute(expected, config["num_key_value_heads"])
        assert weight.dtype == torch.float32 and weight.shape == expected.shape
        assert torch.equal(weight.view(torch.int32), expected.contiguous().view(torch.int32)), name


def _bundled() -> Path:
    try:
        return bundled_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


# --- bad files -------------------------------------------------------------------------------------------------


def test_bad_magic_and_empty_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match=r"bad\.gguf is not a GGUF file: it starts with b'GGML'"):
        GGUFFile(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.gguf is not a GGUF file"):
        GGUFFile(empty)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        GGUFFile(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        open_gguf_file(tmp_path / "missing.gguf")


def test_truncated_files(small_gguf, tmp_path):
    whole = small_gguf.read_bytes()
    parsed = GGUFFile(small_gguf)
    # In the header, in the key/values, in the string array, in the tensor infos, in the tensor data.
    data_end = max(t.data_offset + t.n_bytes for t in parsed.tensors)  # padding may follow
    infos = parsed.data_offset - parsed.alignment - 1
    cuts = [10, 30, 200, len(whole) // 3, infos, parsed.data_offset + 10, data_end - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(
            ValueError, match=rf"cut{cut}\.gguf is not a readable GGUF file: truncated or corrupt"
        ):
            GGUFFile(path)


def test_unsupported_versions_and_byte_order(small_gguf, tmp_path):
    whole = small_gguf.read_bytes()
    for version in (1, 4, 99):
        path = tmp_path / f"v{version}.gguf"
        path.write_bytes(whole[:4] + struct.pack("<I", version) + whole[8:])
        with pytest.raises(ValueError, match=f"GGUF version {version}; chatlm reads versions 2, 3"):
            GGUFFile(path)
    big = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(str(big), "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_uint32("x", 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="big-endian"):
        GGUFFile(big)


def test_corrupt_values(small_gguf, tmp_path):
    whole = bytearray(small_gguf.read_bytes())
    # The first key's value type (after magic, version, counts, key length and "general.architecture").
    at = 24 + 8 + len("general.architecture")
    assert struct.unpack_from("<I", whole, at)[0] == GGUFValueType.STRING
    bad_type = tmp_path / "type.gguf"
    bad_type.write_bytes(whole[:at] + struct.pack("<I", 77) + whole[at + 4 :])
    with pytest.raises(ValueError, match="unknown value type 77"):
        GGUFFile(bad_type)
    # A huge tensor count: reading infos runs off the end.
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(whole[:8] + struct.pack("<Q", 2**40) + whole[16:])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        GGUFFile(huge)


def test_errors_through_the_loaders(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a readable GGUF file: it starts with b'NOPE'"):
        gguf_model.open_gguf(bad)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf_tokenizer(bad)


# --- the cache -------------------------------------------------------------------------------------------------


def test_one_parse_shared_by_tokenizer_and_model(tmp_path, monkeypatch):
    from test_tokenizer import write_llama_gguf  # tests/ is on sys.path (conftest.py)

    path = tmp_path / "shared.gguf"
    write_llama_gguf(path)
    parses = []
    parse = GGUFFile._parse
    monkeypatch.setattr(GGUFFile, "_parse", lambda self, buf: (parses.append(self.path), parse(self, buf))[1])
    load_gguf_tokenizer(path)
    reader = gguf_model.open_gguf(path)
    load_gguf_tokenizer(str(path))
    assert parses == [path]
    assert reader is open_gguf_file(path) is open_gguf_file(tmp_path / "." / "shared.gguf")
    # A rewritten file is parsed again.
    write_gguf(path)
    assert open_gguf_file(path) is not reader and len(parses) == 2
    gguf_file.clear_gguf_cache()
    open_gguf_file(path)
    assert len(parses) == 3


def test_cache_holds_two_files(tmp_path):
    paths = [tmp_path / f"f{i}.gguf" for i in range(3)]
    for p in paths:
        write_gguf(p)
    first = [open_gguf_file(p) for p in paths]
    assert open_gguf_file(paths[2]) is first[2] and open_gguf_file(paths[1]) is first[1]
    assert open_gguf_file(paths[0]) is not first[0]


# --- dequantizers ----------------------------------------------------------------------------------------------

# Where each block type keeps its f16 scales (byte offsets in the block).
F16_SCALES = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
    Q.IQ4_NL: [0],
    Q.IQ4_XS: [0],
}
QUANTIZABLE = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16}


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks: every bit pattern in the quants, finite f16 scales of both signs (subnormal included)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    scales = rng.standard_normal((n_blocks, len(F16_SCALES[qtype]))) * 10.0 ** rng.integers(
        -7, 2, (n_blocks, 1)
    )
    raw_scales = scales.astype(np.float16).view(np.uint8)
    for i, offset in enumerate(F16_SCALES[qtype]):
        raw[:, offset : offset + 2] = raw_scales[:, 2 * i : 2 * i + 2]
    return raw


def reference(raw: np.ndarray, qtype: Q) -> np.ndarray:
    typed = {Q.F32: np.float32, Q.F16: np.float16}.get(qtype)
    data = raw.view(typed) if typed is not None else raw
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


def assert_bit_exact(ours: torch.Tensor, expected: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    got = ours.numpy().reshape(expected.shape)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)
    # F16 NaN payloads may differ (torch's conversion quiets them); every other value is bit-identical.
    assert np.array_equal(got.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


@pytest.mark.parametrize("qtype", sorted(F16_SCALES, key=int), ids=lambda t: t.name)
def test_block_dequantizers_bit_exact_on_random_blocks(qtype):
    rng = np.random.default_rng(int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    # More blocks than one step of the dequantizer, and a number that does not divide into steps.
    n_blocks = gguf_dequant._CHUNK_VALUES // block_size * 2 + 37
    raw = random_blocks(qtype, n_blocks, rng)
    assert_bit_exact(dequantize(raw, qtype), reference(raw, qtype))
    # As a 3-D tensor, from a torch byte tensor.
    raw3 = random_blocks(qtype, 2 * 3 * 4, rng)
    out = dequantize(torch.from_numpy(raw3.reshape(-1)), qtype, (2, 3, 4 * block_size))
    assert out.shape == (2, 3, 4 * block_size)
    assert_bit_exact(out, reference(raw3.reshape(6, -1), qtype))


@pytest.mark.parametrize("qtype", sorted(F16_SCALES, key=int), ids=lambda t: t.name)
def test_block_dequantizers_on_awkward_block_counts(qtype):
    """One block, and one block past a step: slices of single blocks have their own strides and offsets."""
    rng = np.random.default_rng(int(qtype) + 100)
    step = gguf_dequant._CHUNK_VALUES // GGML_QUANT_SIZES[qtype][0]
    for n_blocks in (1, 2, 3, step - 1, step + 1):
        raw = random_blocks(qtype, n_blocks, rng)
        assert_bit_exact(dequantize(raw, qtype), reference(raw, qtype))
        # And from an odd offset into a bigger buffer.
        buffer = torch.from_numpy(np.concatenate([np.zeros(1, np.uint8), raw.reshape(-1)]))
        assert_bit_exact(dequantize(buffer[1:], qtype), reference(raw, qtype))


@pytest.mark.parametrize("qtype", sorted(QUANTIZABLE, key=int), ids=lambda t: t.name)
def test_dequantizers_bit_exact_on_quantized_values(qtype):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((64, 256)) * rng.uniform(0.001, 10, (64, 1))).astype(np.float32)
    values[3] = 0.0  # an all-zero row (d = 0)
    quantized = gguf.quants.quantize(values, qtype)
    assert_bit_exact(dequantize(quantized, qtype, values.shape), reference(quantized, qtype))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_plain_types_on_every_bit_pattern(qtype):
    if qtype == Q.F32:
        raw = np.random.default_rng(2).integers(0, 2**32, 1 << 16, dtype=np.uint32).view(np.uint8)
    else:
        raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)  # every f16/bf16, inf and NaN included
    out = dequantize(raw, qtype)
    assert_bit_exact(out, reference(raw, qtype))
    assert not np.shares_memory(out.numpy(), raw)


def test_other_types_use_the_reference():
    qtype = Q.TQ2_0
    assert qtype not in FAST_TYPES
    values = np.random.default_rng(3).standard_normal((4, 512)).astype(np.float32)
    quantized = gguf.quants.quantize(values, qtype)
    out = dequantize(quantized, qtype, values.shape)
    assert_bit_exact(out, reference(quantized, qtype))


def test_dequantize_checks_sizes_and_leaves_input_alone():
    raw = random_blocks(Q.Q4_1, 4, np.random.default_rng(4))
    before = raw.copy()
    with pytest.raises(ValueError, match="whole number of Q4_1 blocks"):
        dequantize(raw.reshape(-1)[:-1], Q.Q4_1)
    with pytest.raises(ValueError, match="not shape"):
        dequantize(raw, Q.Q4_1, (3, 32))
    readonly = raw.copy()
    readonly.flags.writeable = False
    assert dequantize(readonly, Q.Q4_1).shape == (128,)
    assert np.array_equal(raw, before)


def test_map_is_opened_on_demand_and_checked(tmp_path):
    path = tmp_path / "m.gguf"
    tensors = write_gguf(path)
    parsed = GGUFFile(path)
    assert parsed._mm is None  # parsing leaves no map open
    assert np.array_equal(parsed.tensor("f32.3d").data, tensors["f32.3d"])
    assert parsed._mm is not None
    parsed.close()
    assert parsed._mm is None
    assert torch.equal(
        parsed.tensor("f32.1d").torch_bytes(), torch.from_numpy(tensors["f32.1d"].view(np.uint8))
    )
    parsed.close()
    write_gguf(path, alignment=64)  # a different file at the same path
    with pytest.raises(ValueError, match="has changed since it was read"):
        _ = parsed.tensor("f32.1d").data
