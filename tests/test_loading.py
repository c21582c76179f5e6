"""Loading: model references, sharded and corrupt files, GGUF round trip, dtypes, devices and statistics."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from chatlm import BitsAndBytesConfig
from chatlm.auto import AutoModelForCausalLM
from gguf_export import export_gguf, quantize_dequantize


@pytest.fixture(scope="module")
def hf_llama(tiny_checkpoints):
    return transformers.AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"], dtype=torch.float32
    ).eval()


def sample_ids(n=12, seed=0):
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def test_sharded_checkpoint_equals_single_file(tmp_path, tiny_checkpoints, hf_llama):
    sharded = tmp_path / "sharded"
    hf_llama.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a = AutoModelForCausalLM.from_pretrained(sharded)
    b = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    x = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, atol=0, rtol=0)


def test_vital_statistics_match_transformers(tiny_checkpoints, hf_llama):
    ours = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    assert ours.num_parameters() == hf_llama.num_parameters()
    # transformers also counts its rotary tables, which we compute on the fly rather than keep as buffers
    assert ours.get_memory_footprint() == hf_llama.get_memory_footprint(return_buffers=False)
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    tied = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama_tied_llama3"])
    hf_tied = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama_tied_llama3"])
    assert tied.num_parameters() == hf_tied.num_parameters()


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", torch.float16])
def test_half_precision_close_to_transformers(tiny_checkpoints, dtype):
    ours = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], torch_dtype=dtype)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"], dtype=torch_dtype
    ).eval()
    assert ours.dtype == torch_dtype
    x = sample_ids()
    with torch.no_grad():
        a, b = ours(x).logits.float(), theirs(x).logits.float()
    assert (a - b).abs().max() < 0.1 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_dtype_auto_reads_the_checkpoint(tmp_path, tiny_checkpoints):
    path = with_config(tmp_path, tiny_checkpoints["llama"], dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto").dtype == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.float32


def test_gguf_round_trip_equals_hf_directory(tmp_path, tiny_checkpoints, hf_llama):
    """Write the tiny llama to GGUF as llama.cpp's converter does (q/k rows permuted), load both, compare."""
    path = export_gguf(hf_llama, tmp_path / "tiny.gguf", "llama")
    ours = AutoModelForCausalLM.from_pretrained(path)
    x = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf_llama(x).logits, atol=1e-5, rtol=0)
    assert ours.config.num_key_value_heads == hf_llama.config.num_key_value_heads


def test_gguf_q8_0_round_trip(tmp_path, tiny_checkpoints, hf_llama):
    """Q8_0: our weights equal the gguf package's dequantization exactly, and our logits equal those of transformers
    running on those weights; against the float model they stay within 8-bit error."""
    path = export_gguf(tiny_checkpoints["llama"], tmp_path / "tiny-q8.gguf", "llama", tensor_type="Q8_0")
    ours = AutoModelForCausalLM.from_pretrained(path)
    expected = {
        k: torch.from_numpy(quantize_dequantize(v.numpy(), "Q8_0")) for k, v in hf_llama.state_dict().items()
    }
    for name, weight in ours.state_dict().items():
        torch.testing.assert_close(weight, expected[name], atol=0, rtol=0, msg=name)
    hf_q8 = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"], dtype=torch.float32
    ).eval()
    hf_q8.load_state_dict(expected)
    x = sample_ids()
    with torch.no_grad():
        a, b = ours(x).logits, hf_llama(x).logits
        torch.testing.assert_close(a, hf_q8(x).logits, atol=1e-5, rtol=0)
    # random weights amplify errors layer after layer: ~3% here, where float16 export gives ~0.1%
    assert (a - b).pow(2).mean().sqrt() < 0.06 * b.pow(2).mean().sqrt()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_gguf_round_trip_qwen2_with_tokenizer(tmp_path, tiny_checkpoints):
    """qwen2 (q/k/v biases, no permutation) in float16, with gpt2 tokenizer metadata and the chat template."""
    from chatlm import AutoTokenizer

    ckpt = tiny_checkpoints["qwen2"]
    path = export_gguf(ckpt, tmp_path / "qwen2.gguf", "qwen2", tensor_type="F16", tokenizer_dir=ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(path)
    x = sample_ids()
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
    assert (a - b).abs().max() < 0.01 * b.abs().max()  # float16 weights
    tok, ref = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(ckpt)
    text = "Hello world! Café 你好 <|im_start|>user"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.chat_template == ref.chat_template and tok.eos_token == ref.eos_token


def test_bundled_gguf_weights_equal_transformers_dequantized(bundled_model, shared_dir):
    """The reference greedy outputs come from transformers' float32 dequantization of this file: the first
    chat's prompt logits decide its first token."""
    ref = json.loads((shared_dir / "reference" / "smollm2_greedy.json").read_text())
    chat = next(iter(ref["chats"].values()))
    with torch.no_grad():
        logits = bundled_model(torch.tensor([chat["prompt_ids"]])).logits
    assert logits.argmax(-1)[0, -1].item() == chat["generated_ids"][0]
    assert bundled_model.config.tie_word_embeddings and bundled_model.config.num_key_value_heads == 3


# --- bad input ------------------------------------------------------------------------------------------------


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_hub_id_offline_names_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="someorg/some-model"):
        AutoModelForCausalLM.from_pretrained("someorg/some-model")


def test_truncated_safetensors(tmp_path, tiny_checkpoints):
    path = tmp_path / "m"
    shutil.copytree(tiny_checkpoints["llama"], path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        AutoModelForCausalLM.from_pretrained(path)


def test_pickled_weights_are_refused(tmp_path, tiny_checkpoints):
    path = tmp_path / "m"
    shutil.copytree(tiny_checkpoints["llama"], path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled"):
        AutoModelForCausalLM.from_pretrained(path)


def test_gguf_with_bad_magic(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        AutoModelForCausalLM.from_pretrained(bad)


def with_config(tmp_path, source, **changes):
    """A copy of a checkpoint whose config.json has keys changed (a value of None removes the key)."""
    path = tmp_path / "edited"
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model_type": "mamba"}, "mamba"),
        ({"hidden_size": None}, "hidden_size"),
        ({"intermediate_size": 96}, "shape"),  # the weights do not fit the config
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}}, "yarn"),
    ],
)
def test_bad_configs(tmp_path, tiny_checkpoints, changes, match):
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(with_config(tmp_path, tiny_checkpoints["llama"], **changes))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}, ValueError, "nf4"),
        ({"quantization_config": {"load_in_8bit": True, "group_size": 64}}, ValueError, "4-bit"),
        ({"quantization_config": "int4"}, TypeError, "quantization_config"),
        ({"torch_dtype": "float64"}, ValueError, "float64"),
        ({"device_map": "tpu"}, ValueError, "tpu"),
        ({"not_an_option": True}, TypeError, "not_an_option"),
    ],
)
def test_bad_load_options(tiny_checkpoints, kwargs, error, match):
    with pytest.raises(error, match=match):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], **kwargs)


def test_bitsandbytes_config_rejects_unknown_fields():
    with pytest.raises(TypeError, match="bogus"):
        BitsAndBytesConfig(load_in_4bit=True, bogus=1)


def test_hub_id_from_the_local_cache_offline(monkeypatch, tmp_path, tiny_checkpoints):
    """A model already in the huggingface_hub cache loads by its id with no network."""
    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_checkpoints["llama"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained("someorg/tiny-llama", cache_dir=str(tmp_path / "hub"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    x = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, atol=0, rtol=0)
