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


# JSON as models write it (and as a forced call's opening begins it): ", " and ": ", no other spaces
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
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
    document = json.dumps(schema if schema is not True else {})
    return _checked(
        lambda: engine.LLMatcher.grammar_from_json_schema(document, defaults=_JSON_STYLE),
        engine_tokenizer,
        "the JSON schema",
    )


def _checked(build, engine_tokenizer, what: str) -> str:
    """The grammar ``build`` makes, validated against the tokenizer: any failure a `GrammarError` saying why."""
    try:
        grammar = build()
    except ValueError as e:
        raise GrammarError(f"{what} cannot be compiled: {e}") from e
    failed, messages = _engine().LLMatcher.validate_grammar_with_warnings(grammar, engine_tokenizer)
    if failed:
        raise GrammarError(f"{what} cannot be compiled: {messages[0]}")
    return grammar


def tool_call_schema(
    tools: Sequence[Mapping[str, Any]], arguments_key: str, many: bool, free_arguments: bool = False
) -> dict[str, Any]:
    """The JSON schema of a forced tool call, ``{"name": ..., arguments_key: {...}}`` for one of ``tools``
    (OpenAI's ``{"type": "function", "function": {...}}``; ``many``: a list of such calls, as Mistral writes
    them). A call's arguments follow its function's parameter schema (``free_arguments``: any JSON object, for
    the tools not marked ``strict``)."""
    calls = []
    for tool in tools:
        function = tool.get("function", tool)
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if free_arguments and not function.get("strict"):
            parameters = {"type": "object"}
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "array", "items": call, "minItems": 1} if many else call


def _schema_json(schema: Mapping[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": _JSON_STYLE})


def _literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON's escapes are Lark's


def tool_reply_grammar(
    engine_tokenizer,
    tools: Sequence[Mapping[str, Any]],
    opening: str,
    many: bool,
    arguments_key: str,
    marker: str | None,
    close: str | None,
) -> str:
    """The grammar of a reply that may call tools ("auto") in one model's syntax, its calls held to the schema
    (`tool_call_schema`: strict tools' arguments to their parameter schemas, the others' to any object) while
    free text stays free. ``opening``: how a call starts up to its JSON (``<tool_call>\n``, ``[TOOL_CALLS]``;
    "" for a reply that is only a JSON call), ``many``: the JSON is a list of calls; ``marker``: the syntax's region marker in it (text that cannot
    appear outside a call, so a call cannot be written past the grammar); ``close``: what ends a call (a newline
    before it, as the templates write it). A marker that is one special token is matched as that token."""
    call = _schema_json(tool_call_schema(tools, arguments_key, many, free_arguments=True))
    if not marker:  # the reply is prose, or one JSON call (prose cannot start with "{")
        return f"start: TEXT | call\nTEXT: /([^{{](?s:.*))?/\ncall: %json {call}\n"
    ids = engine_tokenizer.tokenize_str(marker)
    # a marker that is one special token is matched as that token (the engine never spells one in text)
    head = f"<{marker}>" if len(ids) == 1 and engine_tokenizer.is_special_token(ids[0]) else "head"
    rest = opening[len(marker) :]  # between the marker and the JSON
    one = " ".join(filter(None, [_literal(rest) if rest else "", "call_json"]))
    if close:  # closed regions: one call each, more may follow, each opened again
        one += " " + _literal("\n" + close)
        again = _literal("\n") + " " + (head if head != "head" else _literal(marker))
        calls = f"calls: {one} ({again} {one})* /[ \\t\\r\\n]*/"
    else:  # the rest of the reply is the calls (a JSON list)
        calls = f"calls: {one}"
    lines = [
        f"start: TEXT | {'TEXT ' if head != 'head' else ''}{head} calls",
        f"TEXT: /(?s:.*)/ & ~/(?s:.*{_regex(marker)}.*)/",  # free text never holds the marker
        calls,
        f"call_json: %json {call}",
    ]
    if head == "head":  # lazy: the free text ends at the first marker, and the call starts there
        lines.insert(2, f"head[lazy]: /(?s:.*){_regex(marker)}/")
    return "\n".join(lines) + "\n"


def _regex(text: str) -> str:
    """``text`` matched literally by a regex (Rust's syntax: escaping "<" would make a word boundary)."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~" else c for c in text)


def lark_grammar(text: str, engine_tokenizer) -> str:
    """A Lark grammar (llguidance's dialect), checked as `json_schema_grammar` checks a schema."""
    return _checked(lambda: _engine().LLMatcher.grammar_from_lark(text), engine_tokenizer, "the grammar")


class GrammarConstraint:
    """One row's place in a compiled grammar (a `generation.sampling.Constraint`): `mask` gives the tokens that
    may come next, `advance` takes the chosen one, `complete` says the document is whole and only an end of
    sequence may follow (the reply ends there, without spending a token on it)."""

    def __init__(
        self,
        engine_tokenizer,
        grammar: str,
        vocab_size: int,
        eos: Sequence[int] = (),
        begun: Sequence[int] = (),
    ):
        """``begun``: tokens of the document that the prompt already holds (a forced tool call's opening): the
        reply goes on from there."""
        self.matcher = _engine().LLMatcher(engine_tokenizer, grammar)
        if begun and self.matcher.consume_tokens(list(begun)):
            self.matcher.consume_tokens([])  # keep the error reported below
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
