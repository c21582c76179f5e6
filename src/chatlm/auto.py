"""``AutoModelForCausalLM``, transformers' way in: the architecture comes from the checkpoint's config, the
loading from `chatlm.loading.loader`."""

from __future__ import annotations

import os

from .loading.loader import load_pretrained
from .models.base import CausalLM


class AutoModelForCausalLM:
    """``AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=..., device_map=...)`` as in transformers."""

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        *,
        torch_dtype=None,
        dtype=None,
        device_map=None,
        quantization_config=None,
        gguf_file: str | None = None,
        tp_plan: str | None = None,
        **kwargs,
    ) -> CausalLM:
        """``tp_plan="auto"`` (under ``torchrun --nproc-per-node N``): split the model over the N ranks by its
        architecture's plan (`chatlm.parallel`); every rank then runs the same calls."""
        return load_pretrained(
            pretrained_model_name_or_path,
            torch_dtype=torch_dtype,
            dtype=dtype,
            device_map=device_map,
            quantization_config=quantization_config,
            gguf_file=gguf_file,
            tp_plan=tp_plan,
            **kwargs,
        )
