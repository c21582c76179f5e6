"""Every architecture chatlm claims is checked against transformers: the registry and the parity suite agree."""

from __future__ import annotations

import pytest

from chatlm.models import ARCHITECTURES, model_class
from chatlm.models.config import ModelConfig
from checkpoints import VARIANTS


def test_every_registered_model_type_has_a_parity_checkpoint():
    covered = {model_type for model_type, _ in VARIANTS.values()}
    assert set(ARCHITECTURES) <= covered, f"no tiny checkpoint for {sorted(set(ARCHITECTURES) - covered)}"
    assert covered <= set(ARCHITECTURES), (
        f"variants of unregistered types {sorted(covered - set(ARCHITECTURES))}"
    )


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_registered_class_imports(model_type):
    config = ModelConfig.from_dict(
        dict(
            model_type=model_type,
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    assert model_class(config).__name__.endswith("ForCausalLM")


def test_unknown_model_type_is_a_clear_error():
    config = ModelConfig.from_dict(
        dict(
            model_type="gpt_bigcode",
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
        )
    )
    with pytest.raises(ValueError, match="gpt_bigcode.*not supported"):
        model_class(config)
