"""chatlm info: counts and sizes read off the files agree with the models that transformers and chatlm load."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from chatlm.auto import AutoModelForCausalLM
from chatlm.cli import main
from chatlm.info import format_info, model_info
from chatlm.models import model_class
from chatlm.models.config import ModelConfig
from checkpoints import VARIANTS
from gguf_export import export_gguf


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_counts_equal_transformers_and_ours(tiny_checkpoints, variant):
    path = tiny_checkpoints[variant]
    info = model_info(path, measure=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert info.total_parameters == theirs.num_parameters()
    if info.num_experts is None:
        assert info.active_parameters == info.total_parameters
    else:  # the routed experts (transformers holds them fused per layer) count k / E
        routed = sum(p.numel() for n, p in theirs.named_parameters() if ".experts." in n)
        kept = routed * info.experts_per_token // info.num_experts
        assert info.active_parameters == info.total_parameters - routed + kept
    assert info.total_parameters == AutoModelForCausalLM.from_pretrained(path).num_parameters()
    assert info.model_type == VARIANTS[variant][0] and info.supported and info.chat_template
    assert info.context_length == theirs.config.max_position_embeddings
    # The tiny checkpoints are float32: as stored is 4 bytes a parameter, and the rest follows.
    n = info.total_parameters
    assert info.stored_types == {"F32": n} and info.stored_bytes == 4 * n
    assert info.weights_bytes == {
        "as stored": 4 * n,
        "float32": 4 * n,
        "bfloat16": 2 * n,
        "8-bit": n,
        "4-bit": n // 2,
    }
    if info.num_experts is None:
        assert info.active_weights_bytes == info.weights_bytes


def test_bundled_gguf_counts_equal_the_loaded_model(bundled_model):
    info = model_info(None, measure=False)
    assert info.format == "gguf" and info.model_type == "llama" and info.chat_template
    assert info.total_parameters == bundled_model.num_parameters()
    assert info.weights_bytes["float32"] == bundled_model.get_memory_footprint(return_buffers=False)
    assert set(info.stored_types) == {"Q4_1", "Q8_0", "F32"}
    assert info.stored_bytes < info.weights_bytes["8-bit"]  # mostly 4.5 bits per weight
    assert info.context_length == 8192


def test_gguf_export_counts_and_stored_bytes(tmp_path, tiny_checkpoints):
    ckpt = tiny_checkpoints["llama"]
    expected = model_info(ckpt, measure=False).total_parameters
    f32 = model_info(export_gguf(ckpt, tmp_path / "f32.gguf", "llama"), measure=False)
    q8 = model_info(export_gguf(ckpt, tmp_path / "q8.gguf", "llama", tensor_type="Q8_0"), measure=False)
    assert f32.total_parameters == q8.total_parameters == expected
    assert f32.stored_bytes == 4 * expected and f32.stored_types == {"F32": expected}
    norms = sum(v for k, v in q8.stored_types.items() if k == "F32")  # 1-D tensors stay F32
    assert q8.stored_bytes == 4 * norms + (expected - norms) // 32 * 34  # Q8_0: 34 bytes per 32 weights


@pytest.mark.parametrize("variant,dtype", [("llama", None), ("mistral", "bfloat16"), ("qwen3", None)])
def test_kv_cache_formula_equals_an_allocation(tiny_checkpoints, variant, dtype):
    info = model_info(tiny_checkpoints[variant], dtype=dtype, measure=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[variant], torch_dtype=dtype or "auto")
    assert info.kv_dtype == str(model.dtype).removeprefix("torch.")
    cache = model.new_cache(1, 1000)
    allocated = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert info.kv_bytes_per_1k_tokens == allocated == info.kv_bytes(1000)
    if variant == "mistral":  # a window of 8 on every layer
        assert info.sliding_layers == info.num_layers and info.sliding_window == 8
        assert info.kv_bytes(1000, windowed=True) == allocated * 8 // 1000
        assert any("sliding" in note or "last 8 tokens" in note for note in info.notes)
    if variant == "qwen3":  # layer 0 full, layer 1 windowed
        assert info.sliding_layers == 1


def test_mixture_of_experts_active_parameters(tmp_path):
    layers, experts, per_token, hidden, inner = 2, 4, 2, 64, 96
    config = transformers.MixtralConfig(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=per_token,
        max_position_embeddings=128,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "mixtral")
    info = model_info(tmp_path / "mixtral", measure=False)
    assert info.total_parameters == model.num_parameters()
    # Each expert is three hidden x inner matrices; a token uses per_token of them in every layer.
    expert_params = layers * experts * 3 * hidden * inner
    assert info.active_parameters == info.total_parameters - expert_params * (experts - per_token) // experts
    assert (info.num_experts, info.experts_per_token) == (experts, per_token)
    one_expert_model = info.total_parameters - expert_params + expert_params // experts
    assert info.size_label == f"4x{one_expert_model / 1e3:.0f}K / 211K-A{info.active_parameters / 1e3:.0f}K"
    assert info.active_weights_bytes["bfloat16"] == 2 * info.active_parameters
    assert info.active_weights_bytes["as stored"] == 4 * info.active_parameters
    assert "active per token" in format_info(info)


def test_speed_estimate_and_json(tiny_checkpoints, capsys):
    info = model_info(tiny_checkpoints["llama"], context_tokens=500)
    assert info.bandwidth_bytes_per_s > 1e8
    per_token = info.active_weights_bytes["bfloat16"] + info.kv_bytes(500)
    assert info.decode_tokens_per_s["bfloat16"] == pytest.approx(info.bandwidth_bytes_per_s / per_token)
    assert info.decode_tokens_per_s["4-bit"] > info.decode_tokens_per_s["bfloat16"]
    assert main(["info", str(tiny_checkpoints["llama"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_parameters"] == info.total_parameters and data["model_type"] == "llama"
    assert main(["info", str(tiny_checkpoints["llama"])]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "KV cache" in text and "tok/s" in text


@pytest.mark.parametrize("bad", ["/nonexistent/model.gguf", "not a model"])
def test_bad_model_is_a_one_line_error(bad, capsys, tmp_path):
    assert main(["info", bad]) == 1
    err = capsys.readouterr().err
    assert err.startswith("chatlm: error: ") and err.count("\n") == 1


def test_corrupt_safetensors_is_a_one_line_error(tmp_path, tiny_checkpoints, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_checkpoints["llama"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    assert main(["info", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "not a valid safetensors file" in err and err.count("\n") == 1


# config.json files without layer_types: the engine, info and transformers each decide which layers have a window.
TINY = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
)
WINDOW = 4
WINDOWED_CONFIGS = {
    # Gemma 2 alternates: layers 0, 2, 4, ... slide, the others are global (13 of 26).
    "gemma2": dict(model_type="gemma2", num_hidden_layers=26, sliding_window=WINDOW),
    # Qwen2 spares the first max_window_layers layers from its window (7 of 28 slide).
    "qwen2": dict(
        model_type="qwen2",
        num_hidden_layers=28,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=21,
    ),
    # Without use_sliding_window, Qwen2's window is off (transformers' default), whatever sliding_window says.
    "qwen2_window_unset": dict(
        model_type="qwen2", num_hidden_layers=28, sliding_window=WINDOW, max_window_layers=21
    ),
}


def write_config_checkpoint(path, fields):
    """A directory with ``fields`` as its config.json and random weights for the model the engine builds from it."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**TINY, **fields}))
    config = ModelConfig.from_file(path / "config.json")
    torch.manual_seed(0)
    model = model_class(config)(config)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, path / "model.safetensors")
    return path


def windowed_layers(model) -> int:
    """How many layers, on a prompt longer than the window, get a mask that hides the first token from the last."""
    hidden_first = []

    def look(attn, args):  # forward(x, cos, sin, masks, cache): the mask this layer attends with
        mask = args[3][attn.attention_type]
        hidden_first.append(mask is not None and not mask[..., -1, 0].any())

    hooks = [layer.self_attn.register_forward_pre_hook(look) for layer in model.model.layers]
    with torch.no_grad():
        model(torch.arange(WINDOW + 3)[None])
    for hook in hooks:
        hook.remove()
    assert len(hidden_first) == len(model.model.layers)
    return sum(hidden_first)


@pytest.mark.parametrize("name", sorted(WINDOWED_CONFIGS))
def test_sliding_window_layers_equal_the_engine_and_transformers(tmp_path, capsys, name):
    fields = WINDOWED_CONFIGS[name]
    path = write_config_checkpoint(tmp_path / name, fields)
    theirs = transformers.AutoConfig.for_model(**TINY, **fields).layer_types
    expected = sum(kind == "sliding_attention" for kind in theirs)
    assert main(["info", str(path), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert (
        reported["sliding_layers"] == expected == windowed_layers(AutoModelForCausalLM.from_pretrained(path))
    )
    assert reported["sliding_window"] == (WINDOW if expected else None)
    assert reported["num_layers"] == fields["num_hidden_layers"]


def test_gguf_sliding_window_layers_equal_the_engine_and_transformers(tmp_path):
    # llama.cpp's converter writes Gemma 2's window but not which layers use it.
    fields = WINDOWED_CONFIGS["gemma2"]
    gguf = export_gguf(write_config_checkpoint(tmp_path / "gemma2", fields), tmp_path / "g.gguf", "gemma2")
    theirs = transformers.Gemma2Config(**TINY, **fields).layer_types
    info = model_info(gguf, measure=False)
    assert info.sliding_layers == sum(kind == "sliding_attention" for kind in theirs) == 13
    assert info.sliding_layers == windowed_layers(AutoModelForCausalLM.from_pretrained(gguf))
    assert info.sliding_window == WINDOW and info.num_layers == 26
