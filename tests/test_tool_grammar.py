"""The grammar of a reply that may call strict tools ("auto"): free text stays free, and a call in the model's
syntax is accepted exactly when its arguments follow the strict tool's schema (``jsonschema`` is the oracle).
Replies are driven through the engine token by token, as the bundled tokenizer splits them."""

from __future__ import annotations

import json

import jsonschema
import pytest

from chatlm import AutoTokenizer
from chatlm.generation import grammar

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
ARGUMENTS = [
    ("get_weather", {"city": "Paris", "unit": "C"}),
    ("get_weather", {"city": "Paris"}),
    ("get_weather", {"city": "Paris", "unit": "K"}),
    ("get_weather", {"town": "Paris", "unit": "C"}),
    ("get_weather", {"city": 3, "unit": "F"}),
    ("get_time", {"zone": "CET", "anything": [1, 2]}),  # not strict: any object
    ("delete_all", {}),
]
# (opening before the JSON, a list of calls, the arguments' key, the region marker, what closes a call)
FORMATS = {
    "hermes": ("<tool_call>\n", False, "arguments", "<tool_call>", "</tool_call>"),
    "mistral": ("[TOOL_CALLS]", True, "arguments", "[TOOL_CALLS]", None),
    "llama3_json": ("", False, "parameters", None, None),
}


@pytest.fixture(scope="module")
def engine_tokenizer():
    tok = AutoTokenizer.from_pretrained(None)
    return tok, grammar.engine_tokenizer(tok, [2], 49152)


def _accepts(tok, engine_tok, compiled, reply: str) -> bool:
    """Whether the grammar takes every token of ``reply`` and may end there."""
    import llguidance

    matcher = llguidance.LLMatcher(engine_tok, compiled, log_level=0)
    ids = tok(reply, add_special_tokens=False)["input_ids"]
    return matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids) and matcher.is_accepting()


def _valid(name: str, arguments: dict) -> bool:
    schemas = {t["function"]["name"]: t["function"] for t in TOOLS}
    if name not in schemas:
        return False
    function = schemas[name]
    schema = function["parameters"] if function.get("strict") else {"type": "object"}
    return jsonschema.Draft202012Validator(schema).is_valid(arguments)


@pytest.mark.parametrize("name", FORMATS)
def test_calls_are_accepted_exactly_when_their_arguments_are_valid(engine_tokenizer, name):
    tok, engine_tok = engine_tokenizer
    opening, many, key, marker, close = FORMATS[name]
    compiled = grammar.lark_grammar(
        grammar.tool_reply_grammar(engine_tok, TOOLS, opening, many, key, marker, close), engine_tok
    )
    assert _accepts(tok, engine_tok, compiled, "It is sunny in Paris today.")
    for function, arguments in ARGUMENTS:
        call = json.dumps({"name": function, key: arguments})
        reply = opening + (f"[{call}]" if many else call) + (f"\n{close}" if close else "")
        assert _accepts(tok, engine_tok, compiled, reply) == _valid(function, arguments), reply
        if marker:  # text first, then the call
            assert _accepts(tok, engine_tok, compiled, "Let me check. " + reply) == _valid(
                function, arguments
            )
    if marker:
        # the marker cannot be written as text: past it, only a call
        assert not _accepts(tok, engine_tok, compiled, f"I could write {marker} here")
    if close:  # several calls, one region each
        calls = [
            json.dumps({"name": "get_weather", key: {"city": c, "unit": "C"}}) for c in ("Paris", "Rome")
        ]
        reply = "\n".join(f"{opening}{c}\n{close}" for c in calls)
        assert _accepts(tok, engine_tok, compiled, reply)
