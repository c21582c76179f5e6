"""Structured output: a reply held to a JSON schema by a grammar engine, token by token.

The engine is llguidance (`llguidance` on PyPI): it compiles a JSON schema to a grammar and, at each step, gives
the set of tokens that keep the text a prefix of a valid document (a bitmask over the vocabulary), from the
tokenizer's own vocabulary, so multi-character tokens and tokens that span several JSON pieces are handled
exactly. `GrammarConstraint` is the sampler's `Constraint`: the one sampler (`generation.sampling.RowSampler`)
masks the scores with it before its greedy choice or draw, in ``generate``, the server's batch and speculative
checks alike (a guess the grammar refuses is replaced). Why llguidance rather than xgrammar or outlines-core:
`benchmarks/bench_grammar.py` and benchmarks/README.md.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

try:
    import llguidance
except ImportError:  # an optional engine: structured output says what to install
    llguidance = None


class GrammarError(ValueError):
    """A schema the grammar engine cannot compile, or no engine installed; the message says why."""


def _engine():
    if llguidance is None:
        raise GrammarError("structured output needs the llguidance package: pip install llguidance")
    return llguidance


_TOKENIZERS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def engine_tokenizer(tokenizer, eos: Sequence[int], vocab_size: int):
    """The grammar engine's view of a tokenizer (its vocabulary as bytes), made once per tokenizer (~0.1-1 s):
    ``vocab_size`` is the model's (rows of logits past the tokenizer's vocabulary are never allowed), ``eos``
    the tokens that end the reply once the document is complete."""
    engine = _engine()
    key = (id(tokenizer), tuple(eos), vocab_size)
    with _LOCK:
        cached = _TOKENIZERS.get(key)
        if cached is None or cached[0] is not tokenizer:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise GrammarError("structured output needs a tokenizer backed by the tokenizers library")
            made = engine.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos) or None)
            cached = _TOKENIZERS[key] = (tokenizer, made)
        return cached[1]


def json_schema_grammar(schema: Mapping[str, Any] | bool, engine_tokenizer) -> str:
    """The grammar of the JSON documents that ``schema`` (a JSON Schema, as a dict; True: any JSON value) allows,
    checked: a schema the engine cannot compile (an unknown keyword, a contradiction, a `$ref` it cannot resolve)
    raises `GrammarError` with the engine's reason, never an unconstrained reply."""
    engine = _engine()
    if not isinstance(schema, (Mapping, bool)):
        raise GrammarError(f"a JSON schema is an object (or true), not {type(schema).__name__}")
    try:
        grammar = engine.LLMatcher.grammar_from_json_schema(
            json.dumps(schema if schema is not True else {}), defaults={"whitespace_flexible": False}
        )
    except ValueError as e:
        raise GrammarError(f"the JSON schema cannot be compiled: {e}") from e
    failed, messages = engine.LLMatcher.validate_grammar_with_warnings(grammar, engine_tokenizer)
    if failed:
        raise GrammarError(f"the JSON schema cannot be compiled: {messages[0]}")
    return grammar


class GrammarConstraint:
    """One row's place in a compiled grammar (a `generation.sampling.Constraint`): `mask` gives the tokens that
    may come next, `advance` takes the chosen one, `complete` says the document is whole and only an end of
    sequence may follow (the reply ends there, without spending a token on it)."""

    def __init__(self, engine_tokenizer, grammar: str, vocab_size: int, eos: Sequence[int] = ()):
        self.matcher = _engine().LLMatcher(engine_tokenizer, grammar)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be used: {self.matcher.get_error()}")
        self.vocab_size, self.eos = vocab_size, list(eos)
        self._bits = torch.arange(8, dtype=torch.uint8)
        self._mask: torch.Tensor | None = None  # the next step's, once computed

    def mask(self) -> torch.Tensor:
        """(vocab,) bool: the tokens that keep the text a prefix of a valid document (the end-of-sequence tokens
        once it is complete)."""
        if self._mask is None:
            packed = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
            bits = (packed[:, None] >> self._bits) & 1  # token i at bit i % 8 of byte i // 8
            self._mask = bits.flatten()[: self.vocab_size].bool()
        return self._mask

    def allows(self, token: int) -> bool:
        return self.matcher.validate_tokens([token]) == 1

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._mask = None

    def copy(self) -> GrammarConstraint:
        twin = copy.copy(self)
        twin.matcher = self.matcher.deep_copy()
        return twin

    @property
    def complete(self) -> bool:
        if self.matcher.is_stopped():
            return True
        if not self.matcher.is_accepting():
            return False
        allowed = self.mask().clone()
        allowed[self.eos] = False
        return not bool(allowed.any())
