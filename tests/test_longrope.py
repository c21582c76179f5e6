"""Phi-3 config.json files as the Hub has them (rope_scaling, top-level original_max_position_embeddings, "su")
load to the same model as the transformers 5 form (rope_parameters) that the parity tests use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from chatlm.auto import AutoModelForCausalLM
from test_parity import prompt


@pytest.mark.parametrize("rope_type", ["longrope", "su"])
def test_hub_style_phi3_config_loads_the_same_model(tmp_path, tiny_checkpoints, rope_type):
    src = tiny_checkpoints["phi3_longrope"]
    raw = json.loads((src / "config.json").read_text())
    rope = dict(raw.pop("rope_parameters"))
    old = tmp_path / "old"
    shutil.copytree(src, old)
    raw["rope_theta"] = rope.pop("rope_theta")
    rope.pop("original_max_position_embeddings")  # the Hub's files keep it at the top level only
    rope.pop("rope_type")
    raw["rope_scaling"] = {"type": rope_type, **rope}
    (old / "config.json").write_text(json.dumps(raw))
    new, hub = AutoModelForCausalLM.from_pretrained(src), AutoModelForCausalLM.from_pretrained(old)
    assert hub._longrope_context == new._longrope_context == 16
    ids = prompt(20, new.config.vocab_size, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(hub(ids).logits, new(ids).logits, atol=0, rtol=0)


def test_long_factors_take_over_per_call(tiny_checkpoints):
    """Positions up to the original context rotate with the short factors; a call reaching past it with the long
    ones, for all its positions (so the same prefix gives other logits once the call is longer)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["phi3_longrope"])
    ids = prompt(20, model.config.vocab_size, seed=5)
    with torch.no_grad():
        short, long = model(ids[:, :16]).logits, model(ids).logits[:, :16]
    assert (short - long).abs().max() > 1e-2
