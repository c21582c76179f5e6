"""Mixture of experts: routing by groups, loading experts in every layout a checkpoint uses, GGUF round trips.
(Parity with transformers on the tiny MoE variants is in test_parity.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from safetensors.torch import save_file

from chatlm.auto import AutoModelForCausalLM
from chatlm.loading.loader import load_state
from chatlm.models.moe import Experts
from checkpoints import write_checkpoint
from gguf_export import export_gguf, quantize_dequantize

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    paths = {name: write_checkpoint(root / name, name) for name in MOE}
    # llama.cpp's qwen2moe has no dense layers: GGUF tests use one whose layers are all sparse
    paths["qwen2_moe_gguf"] = write_checkpoint(root / "qwen2_moe_gguf", "qwen2_moe", mlp_only_layers=[])
    return paths


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {
        name: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in checkpoints.items()
    }


def sample_ids(n=12, seed=0, batch=1):
    return torch.randint(3, 300, (batch, n), generator=torch.Generator().manual_seed(seed))


def moe_blocks(model):
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def test_tokens_are_routed_to_their_experts_in_groups(checkpoints, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3_moe"])
    block = moe_blocks(model)[0]
    x = torch.randn(2, 9, model.config.hidden_size)
    chosen = torch.softmax(block.gate(x.view(-1, x.shape[-1])), -1).topk(block.top_k).indices
    calls = []
    original = Experts.expert
    monkeypatch.setattr(
        Experts, "expert", lambda self, e, rows: calls.append((e, len(rows))) or original(self, e, rows)
    )
    with torch.no_grad():
        block(x)
    # one call per expert that has tokens, on exactly its tokens; experts nobody chose are never run
    assert calls == [
        (e, n) for e, n in enumerate(torch.bincount(chosen.flatten(), minlength=8).tolist()) if n
    ]


def test_one_token_reads_only_its_experts(checkpoints):
    """Decoding a token must not touch the other experts' weights: poisoning them with NaN changes nothing."""
    model = AutoModelForCausalLM.from_pretrained(checkpoints["mixtral"])
    ids = sample_ids(8)
    with torch.no_grad():
        prefilled = model.new_cache(1, 16)
        model(ids[:, :-1], past_key_values=prefilled)
        hidden, chosen = [], []
        hooks = [b.register_forward_pre_hook(lambda m, a: hidden.append(a[0])) for b in moe_blocks(model)]
        expected = model(ids[:, -1:], past_key_values=copy.deepcopy(prefilled)).logits
        for h in hooks:
            h.remove()
        for block, x in zip(moe_blocks(model), hidden):
            top = torch.softmax(block.gate(x.view(1, -1)), -1).topk(block.top_k).indices[0].tolist()
            unused = [e for e in range(block.experts.gate_up_proj.shape[0]) if e not in top]
            chosen.append(top)
            block.experts.gate_up_proj[unused] = float("nan")
            block.experts.down_proj[unused] = float("nan")
        got = model(ids[:, -1:], past_key_values=copy.deepcopy(prefilled)).logits
    assert all(len(c) == 2 for c in chosen)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", MOE)
def test_fused_transformers5_layout_loads(tmp_path, checkpoints, hf_models, name):
    """transformers 5 keeps experts fused in memory (experts.gate_up_proj, experts.down_proj): a checkpoint written
    from its state dict as it is loads too, to the same model."""
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_bytes((checkpoints[name] / "config.json").read_bytes())
    state = {k: v.contiguous() for k, v in hf_models[name].state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(path / "model.safetensors"))
    fused, per_expert = (
        AutoModelForCausalLM.from_pretrained(path),
        AutoModelForCausalLM.from_pretrained(checkpoints[name]),
    )
    for (k, a), (_, b) in zip(fused.state_dict().items(), per_expert.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    assert fused.num_parameters() == hf_models[name].num_parameters()


def _checkpoint_tensors(path):
    from chatlm.loading.safetensors_weights import read_safetensors

    return list(read_safetensors(path))


def _fresh(path):
    from chatlm.models import model_class
    from chatlm.models.config import ModelConfig

    config = ModelConfig.from_file(path / "config.json")
    with torch.device("meta"):
        return model_class(config)(config)


def test_every_expert_assigned_exactly_once(checkpoints):
    path = checkpoints["mixtral"]
    tensors = _checkpoint_tensors(path)
    expert = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    without = [(k, v) for k, v in tensors if k != expert]
    with pytest.raises(ValueError, match=r"lacks model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        load_state(_fresh(path), without, torch.float32, torch.device("cpu"), "ckpt")
    twice = tensors + [(expert, dict(tensors)[expert])]
    with pytest.raises(ValueError, match="w3.weight' appears twice"):
        load_state(_fresh(path), twice, torch.float32, torch.device("cpu"), "ckpt")
    # one expert into another's slot: the shape fits, the slot is taken
    moved = [(k.replace("experts.2.w3", "experts.1.w3"), v) if k == expert else (k, v) for k, v in tensors]
    with pytest.raises(ValueError, match="another tensor filled"):
        load_state(_fresh(path), moved, torch.float32, torch.device("cpu"), "ckpt")
    whole = tensors + [("model.layers.0.mlp.experts.down_proj", torch.zeros(4, 64, 128))]
    with pytest.raises(ValueError, match="appears twice"):
        load_state(_fresh(path), whole, torch.float32, torch.device("cpu"), "ckpt")
    wrong = [(k, v[:, :-1]) if k == expert else (k, v) for k, v in tensors]
    with pytest.raises(ValueError, match=r"w3\.weight' has shape \(128, 63\)"):
        load_state(_fresh(path), wrong, torch.float32, torch.device("cpu"), "ckpt")
    extra = tensors + [("model.layers.0.block_sparse_moe.experts.4.w1.weight", torch.zeros(128, 64))]
    with pytest.raises((ValueError, IndexError)):
        load_state(_fresh(path), extra, torch.float32, torch.device("cpu"), "ckpt")


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe_gguf", "qwen3_moe"])
def test_gguf_round_trip(tmp_path, checkpoints, hf_models, name):
    """Experts stacked as llama.cpp writes them (blk.N.ffn_{gate,up,down}_exps, the router ffn_gate_inp, qwen2moe's
    *_shexp), in float32: the same logits as transformers."""
    model_type = name.removesuffix("_gguf")
    path = export_gguf(checkpoints[name], tmp_path / f"{name}.gguf", model_type)
    ours = AutoModelForCausalLM.from_pretrained(path)
    assert ours.config.model_type == model_type
    x = sample_ids(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf_models[name](x).logits, atol=1e-4, rtol=0)


def test_gguf_shared_expert_gate_as_a_vector(tmp_path, checkpoints, hf_models, monkeypatch):
    """Some qwen2moe files store ffn_gate_inp_shexp as a vector (llama.cpp's {n_embd}); HF's is one row."""
    from gguf_export import ARCHS, ArchHooks

    hooks = ARCHS["qwen2_moe"]

    def vector_gate(state, config):
        out = hooks.tensors(state, config)
        return {k: w.reshape(-1) if k.endswith("shared_expert_gate.weight") else w for k, w in out.items()}

    monkeypatch.setitem(ARCHS, "qwen2_moe_vector", ArchHooks(hooks.arch, vector_gate, hooks.metadata))
    path = export_gguf(checkpoints["qwen2_moe_gguf"], tmp_path / "vector.gguf", "qwen2_moe_vector")
    ours = AutoModelForCausalLM.from_pretrained(path)
    x = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf_models["qwen2_moe_gguf"](x).logits, atol=1e-4, rtol=0)


def test_gguf_q8_0_stacked_experts(tmp_path, checkpoints, hf_models):
    """3-D quantized expert stacks dequantize to exactly the gguf package's values."""
    path = export_gguf(checkpoints["qwen2_moe_gguf"], tmp_path / "q8.gguf", "qwen2_moe", tensor_type="Q8_0")
    ours = AutoModelForCausalLM.from_pretrained(path)
    hf = hf_models["qwen2_moe_gguf"]
    expected = {
        k: torch.from_numpy(quantize_dequantize(v.numpy(), "Q8_0")) for k, v in hf.state_dict().items()
    }
    for name, weight in ours.state_dict().items():
        torch.testing.assert_close(weight, expected[name], atol=0, rtol=0, msg=name)


def test_old_per_expert_mixtral_gguf(tmp_path, checkpoints, hf_models):
    """Mixtral GGUF files from before llama.cpp stacked experts name one tensor per expert, blk.N.ffn_gate.E.weight
    (gguf's tables no longer have these names, so the file's tensors are unstacked here rather than written)."""
    from chatlm.loading import gguf_model

    path = export_gguf(checkpoints["mixtral"], tmp_path / "mixtral.gguf", "mixtral")
    reader = gguf_model.open_gguf(path)
    config = gguf_model.gguf_config(reader, path)
    names = {t.name: t.name for t in reader.tensors}
    old = []
    for (name, w), gguf_name in zip(gguf_model.read_gguf_tensors(reader, config, path), names):
        if "_exps." not in gguf_name:
            old.append((name, w))
            continue
        bid, kind = gguf_name.split(".")[1], gguf_name.split(".")[2].removesuffix("_exps")
        old += [(gguf_model.hf_name(f"blk.{bid}.{kind}.{e}.weight"), expert) for e, expert in enumerate(w)]
    assert gguf_model.hf_name("blk.3.ffn_up.5.weight") == "model.layers.3.mlp.experts.5.up_proj.weight"
    ours = _fresh(checkpoints["mixtral"])
    load_state(ours, old, torch.float32, torch.device("cpu"), str(path))
    x = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf_models["mixtral"](x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MOE)
def test_bfloat16_close_to_transformers(checkpoints, name):
    ours = AutoModelForCausalLM.from_pretrained(checkpoints[name], torch_dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.bfloat16).eval()
    x = sample_ids(batch=2)
    with torch.no_grad():
        a, b = ours(x).logits.float(), theirs(x).logits.float()
    assert (a - b).abs().max() < 0.1 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
