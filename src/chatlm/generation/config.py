"""GenerationConfig: the decoding options, with transformers' names, defaults and checks."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class GenerationConfig:
    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    min_p: float | None = None
    repetition_penalty: float | None = 1.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    num_beams: int = 1
    num_return_sequences: int = 1
    use_cache: bool = True
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    # Speculative decoding (chatlm.generation.speculative): drafts from the text so far, or from an assistant model.
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: str = "heuristic"
    assistant_early_exit: int | None = None
    # Keys of generation_config.json that we keep but do not act on (transformers_version, ...).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GenerationConfig:
        names = cls.field_names()
        known = {k: v for k, v in raw.items() if k in names}
        return cls(**known, extra={k: v for k, v in raw.items() if k not in names})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GenerationConfig:
        path = Path(directory) / "generation_config.json"
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e

    @classmethod
    def from_model_config(cls, config) -> GenerationConfig:
        return cls(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )

    def update(self, **kwargs) -> GenerationConfig:
        """A copy with ``kwargs`` applied; a name that is no generation option is a TypeError."""
        unknown = sorted(set(kwargs) - self.field_names())
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(unknown)}")
        new = copy.deepcopy(self)
        for key, value in kwargs.items():
            setattr(new, key, value)
        return new

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, **{k: getattr(self, k) for k in self.field_names()}}

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def validate(self) -> None:
        """Raise ValueError on options that cannot work; warn, as transformers does, on sampling options that
        greedy decoding ignores (``temperature=0.1`` without ``do_sample=True`` decodes greedily)."""
        if self.max_new_tokens is not None and (
            not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.min_new_tokens is not None and self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens!r}")
        if self.num_beams != 1:
            raise ValueError("beam search (num_beams > 1) is not supported; use greedy decoding or sampling")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise ValueError(
                f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}"
            )
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(
                "num_return_sequences > 1 needs do_sample=True: greedy decoding would repeat one answer"
            )
        if self.prompt_lookup_num_tokens is not None and (
            not isinstance(self.prompt_lookup_num_tokens, int) or self.prompt_lookup_num_tokens < 1
        ):
            raise ValueError(
                f"prompt_lookup_num_tokens must be a positive integer, got {self.prompt_lookup_num_tokens!r}"
            )
        if self.max_matching_ngram_size is not None and (
            not isinstance(self.max_matching_ngram_size, int) or self.max_matching_ngram_size < 1
        ):
            raise ValueError(
                f"max_matching_ngram_size must be a positive integer, got {self.max_matching_ngram_size!r}"
            )
        if self.assistant_early_exit is not None and (
            not isinstance(self.assistant_early_exit, int) or self.assistant_early_exit < 1
        ):
            raise ValueError(
                f"assistant_early_exit must be a positive integer, got {self.assistant_early_exit!r}"
            )
        if not isinstance(self.num_assistant_tokens, int) or self.num_assistant_tokens < 1:
            raise ValueError(
                f"num_assistant_tokens must be a positive integer, got {self.num_assistant_tokens!r}"
            )
        if self.num_assistant_tokens_schedule not in ("heuristic", "constant"):
            raise ValueError(
                "num_assistant_tokens_schedule must be 'heuristic' or 'constant', "
                f"got {self.num_assistant_tokens_schedule!r}"
            )
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.do_sample:
            if self.temperature is not None and not self.temperature > 0:
                raise ValueError(
                    f"temperature must be > 0 when sampling, got {self.temperature!r} (use do_sample=False for greedy)"
                )
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
            if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
                raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
            if self.min_p is not None and not 0 <= self.min_p <= 1:
                raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        else:
            ignored = [
                f"{name}={getattr(self, name)}"
                for name, neutral in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 50), ("min_p", None))
                if getattr(self, name) not in (neutral, None)
            ]
            if ignored:
                warnings.warn(
                    f"do_sample is False, so generation is greedy and ignores {', '.join(ignored)}; "
                    "pass do_sample=True to sample",
                    UserWarning,
                    stacklevel=4,
                )
