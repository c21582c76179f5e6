"""Model files that lie or are broken, made here from a tiny checkpoint and its GGUF export: each one is refused by
`from_pretrained` with a ValueError that names the problem, before the model is built or its weights are read.
The GGUF variants are rewritten with the gguf package's own reader and writer (or one field patched in place)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from chatlm import AutoModelForCausalLM
from checkpoints import write_checkpoint
from gguf_export import export_gguf

ARRAY = gguf.GGUFValueType.ARRAY


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("broken")
    checkpoint = write_checkpoint(root / "llama", "llama")
    return checkpoint, export_gguf(checkpoint, root / "tiny.gguf", "llama", "F32", tokenizer_dir=checkpoint)


def rewrite_gguf(source: Path, dest: Path, metadata: dict | None = None, retype: dict | None = None) -> Path:
    """A copy of ``source`` with some metadata replaced (key -> (value, value type)) and some F32 tensors'
    declared type replaced (name -> type: the data stays F32, so the declaration lies)."""
    metadata, retype = metadata or {}, retype or {}
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(dest), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in metadata:
            continue
        kind = field.types[0]
        writer.add_key_value(key, field.contents(), kind, field.types[-1] if kind == ARRAY else None)
    for key, (value, kind) in metadata.items():
        writer.add_key_value(key, value, kind)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name in retype:
            block, size = gguf.GGML_QUANT_SIZES[retype[tensor.name]]
            *rows, width = (int(d) for d in reversed(tensor.shape))
            # the byte shape such a tensor would have: the writer declares that, and writes the F32 bytes given
            shape = (*rows, width // block * size)
            writer.add_tensor(
                tensor.name, data.view(np.uint8), raw_shape=shape, raw_dtype=retype[tensor.name]
            )
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def overlapping(source: Path, dest: Path) -> Path:
    """A copy whose second tensor is declared at the first one's offset (the two overlap)."""
    reader = gguf.GGUFReader(source)
    first, second = reader.tensors[0], reader.tensors[1]
    data = bytearray(source.read_bytes())
    # a tensor's info: name (u64 length + bytes), u32 dims, u64 per dim, u32 type, u64 offset
    name = second.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    at += 4 + 8 * len(second.shape) + 4
    first_offset = int(first.data_offset) - (int(second.data_offset) - struct.unpack_from("<Q", data, at)[0])
    struct.pack_into("<Q", data, at, first_offset)
    dest.write_bytes(bytes(data))
    return dest


U32, I32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32
GGUF_CASES = {
    "F32 data declared Q4_0": (
        lambda src, dst: rewrite_gguf(
            src, dst, retype={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q4_0}
        ),
        "does not match its data",
    ),
    "overlapping tensors": (overlapping, "overlaps"),
    "head_count_kv = 0": (
        lambda src, dst: rewrite_gguf(src, dst, {"llama.attention.head_count_kv": (0, U32)}),
        "num_key_value_heads",
    ),
    "negative feed_forward_length": (
        lambda src, dst: rewrite_gguf(src, dst, {"llama.feed_forward_length": (-5, I32)}),
        "intermediate_size",
    ),
    "block_count = 10**6": (
        lambda src, dst: rewrite_gguf(src, dst, {"llama.block_count": (10**6, U32)}),
        "block_count says 1000000 layers",
    ),
    "embedding not the vocabulary's size": (
        lambda src, dst: rewrite_gguf(src, dst, {"llama.vocab_size": (5000, U32)}),
        "token embedding",
    ),
}


@pytest.mark.parametrize("case", list(GGUF_CASES), ids=list(GGUF_CASES))
def test_broken_gguf_files_are_refused_by_name(tiny, tmp_path, case):
    make, message = GGUF_CASES[case]
    path = make(tiny[1], tmp_path / "broken.gguf")
    for quantization in (None, "keep"):  # as transformers loads it, and as chat/serve run it
        options = {}
        if quantization:
            from chatlm.quantization import QuantizationConfig

            options["quantization_config"] = QuantizationConfig(keep_gguf_blocks=True)
        with pytest.raises(ValueError, match=message):
            AutoModelForCausalLM.from_pretrained(path, **options)


def test_the_unbroken_gguf_loads(tiny, tmp_path):
    """The rewriting itself breaks nothing: a copy with no changes loads and equals the original."""
    copy = rewrite_gguf(tiny[1], tmp_path / "copy.gguf")
    ids = torch.tensor([[1, 5, 9, 3]])
    a = AutoModelForCausalLM.from_pretrained(tiny[1])(ids).logits
    b = AutoModelForCausalLM.from_pretrained(copy)(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _folder(tiny, tmp_path, **config) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny[0], folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **config}))
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num_key_value_heads": 0}, "num_key_value_heads"),
        ({"intermediate_size": -1}, "intermediate_size"),
        ({"num_hidden_layers": 10**6}, "num_hidden_layers = 1000000"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"vocab_size": 10**12}, "vocab_size"),
    ],
    ids=["no kv heads", "negative MLP", "a million layers", "a string", "a trillion tokens"],
)
def test_broken_configs_are_refused_by_name(tiny, tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(_folder(tiny, tmp_path, **config))


def test_a_table_that_does_not_fit_the_vocabulary_is_refused_from_its_header(tiny, tmp_path):
    """config.json's vocabulary differs from the embedding table's rows: refused from the headers' shapes, before
    the model's weights are read."""
    folder = _folder(tiny, tmp_path, vocab_size=5000)
    with pytest.raises(ValueError, match=r"(embed_tokens|lm_head).weight.*the config implies \(5000, "):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_weight_map_cannot_lead_out_of_the_model_folder(tiny, tmp_path):
    folder = _folder(tiny, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    for target in (str(outside), "../elsewhere.safetensors"):
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": target, "x": target}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match="outside the model's folder"):
            AutoModelForCausalLM.from_pretrained(folder)


def test_nan_weights_fail_generation_with_a_clear_error(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    for options in ({}, {"do_sample": True}):
        with pytest.raises(ValueError, match="not finite"):
            model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, **options)
