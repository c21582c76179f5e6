"""A corpus of real-world JSON schemas (tests/data/json_schemas.json) held by the grammar engine.

Each entry: ``name``, ``source`` (where such a schema is used), ``prompt`` (a request about its topic) and
``schema`` (Draft 2020-12); the ones llguidance refuses carry ``"expect": "unsupported"`` and ``reason`` (a word
the refusal names: the unimplemented keyword, the regex feature, the format). Every other schema is compiled and
the bundled model answers its prompt under it, greedy and sampled: every reply that completes must be a document
the jsonschema package validates (formats included); a reply cut off by the token limit must still be a prefix
the grammar accepts. All schemas' replies decode in one batch per mode: ``generate(constraint=...)`` with one
`GrammarConstraint` per row, each of its own schema (what ``response_format`` makes for every row of a call), so
that the file runs in about two minutes on two CPU cores (one batch runs as long as its longest row).
"""

from __future__ import annotations

import datetime
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators

CORPUS = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
SUPPORTED = [c for c in CORPUS if c.get("expect") != "unsupported"]
UNSUPPORTED = [c for c in CORPUS if c.get("expect") == "unsupported"]
MAX_NEW = 160  # enough for most replies to complete; the rest are counted as cut off
INSTRUCTION = "Reply with the JSON only."
MIN_COMPLETE = 0.65  # the bundled 135M model loops in ~1 reply of 4 (measured: 73-75% complete at 160 tokens)


def _date_time(value: object) -> bool:
    """RFC 3339 date-time (jsonschema checks it only with the optional rfc3339-validator package)."""
    if not isinstance(value, str):
        return True
    shape = r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)"
    match = re.fullmatch(shape, value)
    if match is None:
        return False
    if match.group(1) == "60":  # a leap second
        value = value[: match.start(1)] + "59" + value[match.end(1) :]
    try:
        datetime.datetime.fromisoformat(value.upper())
    except ValueError:
        return False
    return True


def _uri(value: object) -> bool:
    """An absolute URI's shape (RFC 3986 scheme ':' and no characters a URI cannot hold)."""
    return not isinstance(value, str) or re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s\"<>\\^`{|}]*", value)


def _hostname(value: object) -> bool:
    """RFC 1123 host name."""
    label = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    return not isinstance(value, str) or (len(value) <= 253 and re.fullmatch(rf"{label}(\.{label})*", value))


FORMATS = FormatChecker()  # jsonschema's own checks (date, email, ipv4, ipv6, uuid, ...) plus these
FORMATS.checks("date-time")(_date_time)
FORMATS.checks("uri")(_uri)
FORMATS.checks("hostname")(_hostname)


def _multiple_of(validator, step, instance, schema):
    """multipleOf in decimal: jsonschema divides floats, so 10.2 is no multiple of 0.01 for it (1019.99...)."""
    if validator.is_type(instance, "number") and Decimal(str(instance)) % Decimal(str(step)) != 0:
        yield ValidationError(f"{instance!r} is not a multiple of {step}")


Validator = validators.extend(Draft202012Validator, {"multipleOf": _multiple_of})


def test_the_corpus_is_draft_2020_12():
    names = [c["name"] for c in CORPUS]
    assert len(CORPUS) >= 60 and len(set(names)) == len(names)
    for c in CORPUS:
        Draft202012Validator.check_schema(c["schema"])
        assert c["source"] and c["prompt"], c["name"]
        assert (c.get("expect") == "unsupported") == ("reason" in c), c["name"]
        for fmt in re.findall(r'"format": "([^"]+)"', json.dumps(c["schema"])):
            assert fmt in FORMATS.checkers or c.get("expect") == "unsupported", (
                f"{c['name']}: {fmt} unchecked"
            )


@pytest.fixture(scope="module")
def engine(bundled_model):
    """The tokenizer and the engine's view of it, as ``generate(response_format=...)`` makes it."""
    from chatlm import AutoTokenizer
    from chatlm.generation import grammar

    tok = AutoTokenizer.from_pretrained(None)
    eos = list(bundled_model.generation_config.eos_token_ids)
    return tok, grammar.engine_tokenizer(tok, eos, bundled_model.config.vocab_size)


def test_unsupported_schemas_are_refused_with_their_reason(engine):
    """Exactly the schemas marked unsupported are refused, each with a message that names why: a keyword the
    engine gained (or lost) fails here."""
    from chatlm.generation.grammar import GrammarError, json_schema_grammar

    refused = {}
    for c in CORPUS:
        try:
            json_schema_grammar(c["schema"], engine[1])
        except GrammarError as e:
            refused[c["name"]] = str(e)
    expected = {c["name"] for c in UNSUPPORTED}
    assert set(refused) == expected, (
        f"refused {len(refused)} of {len(CORPUS)}, expected {len(expected)}: "
        f"newly refused {sorted(set(refused) - expected)}, newly compiled {sorted(expected - set(refused))}"
    )
    for c in UNSUPPORTED:
        assert c["reason"] in refused[c["name"]], (c["name"], refused[c["name"]])


def _prompts(tok, entries) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries' chat prompts, left-padded, and their attention mask."""
    rows = []
    for c in entries:
        chat = [{"role": "user", "content": f"{c['prompt']} {INSTRUCTION}"}]
        rows.append(
            tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"][0]
        )
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def _decode(model, tok, engine_tok, entries, seed: int, **sampling) -> list[tuple[list[int], object]]:
    """Each entry's reply tokens (its end-of-sequence token included, if it wrote one) and its row's constraint
    (its place in the grammar once the row ended), all entries decoded in one batch."""
    from chatlm.generation.grammar import GrammarConstraint, json_schema_grammar

    vocab, eos = model.config.vocab_size, list(model.generation_config.eos_token_ids)
    grammars = iter([json_schema_grammar(c["schema"], engine_tok) for c in entries])
    made = []

    def constraint():  # generate makes one per row, in row order
        made.append(GrammarConstraint(engine_tok, next(grammars), vocab, eos))
        return made[-1]

    ids, mask = _prompts(tok, entries)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=MAX_NEW,
        constraint=constraint,
        tokenizer=tok,
        generator=torch.Generator().manual_seed(seed),
        **sampling,
    )
    assert len(made) == len(entries)
    replies = []
    for row in out[:, ids.shape[1] :].tolist():  # finished rows are padded with the pad (= end) token
        end = next((i for i, t in enumerate(row) if t in eos), None)
        replies.append(row if end is None else row[: end + 1])
    return list(zip(replies, made))


class Tally:
    """The replies checked: how many completed, the invalid ones (why, and the text), the ones cut off."""

    def __init__(self):
        self.complete, self.invalid, self.cut = 0, [], []

    def check(self, engine_tok, eos, entry, mode: str, tokens: list[int], row, text: str) -> None:
        import llguidance

        from chatlm.generation.grammar import json_schema_grammar

        name = f"{entry['name']} ({mode})"
        if not (tokens and tokens[-1] in eos) and not row.complete:  # ran out of tokens
            assert len(tokens) == MAX_NEW, f"{name} stopped early, incomplete: {text!r}"
            replay = llguidance.LLMatcher(engine_tok, json_schema_grammar(entry["schema"], engine_tok))
            assert replay.validate_tokens(tokens) == len(tokens), f"{name} is no valid prefix: {text!r}"
            self.cut.append(name)
            return
        self.complete += 1
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            self.invalid.append(f"{name}: not JSON ({e}): {text!r}")
            return
        validator = Validator(entry["schema"], format_checker=FORMATS)
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        if errors:
            where = "/".join(map(str, errors[0].absolute_path))
            self.invalid.append(f"{name}: {errors[0].message} at /{where}: {text!r}")

    def summary(self) -> str:
        total = self.complete + len(self.cut)
        return (
            f"{len(CORPUS)} schemas ({len(SUPPORTED)} supported, {len(UNSUPPORTED)} refused); {total} replies: "
            f"{self.complete} complete ({100 * self.complete / max(total, 1):.0f}%), {len(self.invalid)} of them "
            f"invalid; {len(self.cut)} cut off at {MAX_NEW} tokens: {', '.join(self.cut)}"
        )


def _run(model, engine, entries, mode: str, seed: int, tally: Tally, **sampling) -> None:
    tok, engine_tok = engine
    eos = list(model.generation_config.eos_token_ids)
    for entry, (tokens, row) in zip(entries, _decode(model, tok, engine_tok, entries, seed, **sampling)):
        text = tok.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
        tally.check(engine_tok, eos, entry, mode, tokens, row, text)


def test_replies_follow_every_supported_schema(bundled_model, engine):
    """Greedy and sampled (temperature 1, no top-k) replies to every supported schema: each one that completes is
    valid under jsonschema; one cut off at the token limit is a prefix the grammar accepts; most complete."""
    tally = Tally()
    _run(bundled_model, engine, SUPPORTED, "greedy", 0, tally, do_sample=False)
    # top_k=0: the whole vocabulary stays in play, so the grammar alone keeps the documents valid
    _run(bundled_model, engine, SUPPORTED, "sampled", 1, tally, do_sample=True, temperature=1.0, top_k=0)
    print(tally.summary())
    assert not tally.invalid, tally.summary() + "\n" + "\n".join(tally.invalid)
    assert tally.complete >= MIN_COMPLETE * (tally.complete + len(tally.cut)), tally.summary()


@pytest.mark.parametrize("warper", [{}, {"top_k": 0, "top_p": 0.9}], ids=["default top_k=50", "top_p=0.9"])
def test_sampled_replies_with_top_k_or_top_p(bundled_model, engine, warper):
    """Sampled with the model's own generation config (top_k=50), or with top_p as OpenAI clients send it, the
    replies are as valid as without them: the grammar masks the scores before the warpers pick, so a row never
    ends early because the tokens they kept were all refused."""
    short = [
        "sentiment_classification",
        "get_weather_tool",
        "chess_move",
        "survey_response",
        "consent_record",
    ]
    entries, tally = [c for c in SUPPORTED if c["name"] in short], Tally()
    _run(
        bundled_model,
        engine,
        entries,
        f"sampled, {warper}",
        3,
        tally,
        do_sample=True,
        temperature=1.0,
        **warper,
    )
    assert not tally.invalid, tally.summary() + "\n" + "\n".join(tally.invalid)
