"""Speculative decoding on the bundled model, side by side with plain greedy decoding in one run.

    python benchmarks/bench_speculative.py            # 2 threads, best of 3 per row (~2 min)
    python benchmarks/bench_speculative.py --repeats 5 --new-tokens 200

Two chats: one that edits a paragraph it is given (its reply quotes the prompt: prompt lookup's case) and one
that answers an open question (nothing to quote). For each weight format (float32, and 4-bit: the GGUF's Q4_1
blocks kept) the rows are plain greedy decoding, prompt lookup with 5 and 10 guesses, self-speculation (the
model's first 8 of its 30 layers draft), and a draft model: the 4-bit bundled model drafting for the float32 one
(the same tokenizer, 6x cheaper per token). Every speculative row must
give plain decoding's reply token for token (the script stops if not). Decode tok/s counts the reply's tokens
after the first over the time between the first token's arrival and the last's (prefill left out); the
acceptance rate is accepted / proposed guesses.

Then a batch of four chats at once (two edits, two open questions, left-padded) in float32: plain batched
decoding against prompt lookup and the int4 draft, which must give plain batched decoding's replies. Tok/s there
is all rows' reply tokens after the first column over the time from the first column to the last.
"""

from __future__ import annotations

import argparse

import torch

from chatlm import AutoModelForCausalLM, AutoTokenizer, QuantizationConfig
from chatlm.bench import TokenArrivals

PARAGRAPH = (
    "The river Danube rises in the Black Forest of Germany and flows for about 2,850 kilometres through ten "
    "countries before it empties into the Black Sea. Along its course it passes four capital cities: Vienna, "
    "Bratislava, Budapest and Belgrade. For centuries it has been a highway for trade and a border between empires."
)
CHATS = {
    "edit a paragraph": "Repeat this paragraph exactly, with 'river' changed to 'River':\n\n" + PARAGRAPH,
    "open question": "Why do rivers meander? Explain in a few sentences.",
}
BATCH = [
    CHATS["edit a paragraph"],
    CHATS["open question"],
    "Rewrite this paragraph in British spelling, changing nothing else:\n\n" + PARAGRAPH,
    "What is a river delta? Answer briefly.",
]


def run(model, ids, new_tokens: int, **options) -> tuple[list[int], float, object]:
    arrivals = TokenArrivals()
    out = model.generate(ids, max_new_tokens=new_tokens, streamer=arrivals, **options)
    reply = out[0, ids.shape[1] :].tolist()
    tps = (len(reply) - 1) / (arrivals.times[-1] - arrivals.times[1]) if len(reply) > 1 else 0.0
    stats = getattr(model, "last_speculation", None) if options else None
    return reply, tps, stats


def run_batch(model, batch, new_tokens: int, **options) -> tuple[list[list[int]], float, object]:
    arrivals = TokenArrivals()
    out = model.generate(**batch, max_new_tokens=new_tokens, streamer=arrivals, **options)
    prompt = batch["input_ids"].shape[1]
    eos = set(model.generation_config.eos_token_ids)
    replies = []
    for row in out[:, prompt:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        replies.append(row[:end])
    tokens = sum(len(r) for r in replies) - len(replies)
    tps = tokens / (arrivals.times[-1] - arrivals.times[1]) if len(arrivals.times) > 2 else 0.0
    stats = getattr(model, "last_speculation", None) if options else None
    return replies, tps, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(None)
    models = {
        "float32": AutoModelForCausalLM.from_pretrained(None),
        "int4": AutoModelForCausalLM.from_pretrained(
            None, quantization_config=QuantizationConfig(load_in_4bit=True)
        ),
    }
    rows = []
    for chat, text in CHATS.items():
        ids = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt"
        )["input_ids"]
        for weights, model in models.items():
            configs = {"plain": {}, "prompt lookup 5": dict(prompt_lookup_num_tokens=5)}
            configs["prompt lookup 10"] = dict(prompt_lookup_num_tokens=10)
            configs["self-speculation, 8 of 30 layers"] = dict(assistant_early_exit=8, num_assistant_tokens=4)
            if weights == "float32":
                configs["draft: int4 bundled"] = dict(assistant_model=models["int4"])
            best: dict[str, tuple[float, object]] = {}
            reference = None
            for _ in range(args.repeats):
                for name, options in configs.items():  # interleaved, so that load bursts hit every row alike
                    reply, tps, stats = run(model, ids, args.new_tokens, **options)
                    if reference is None:
                        reference = reply
                    if reply != reference:
                        raise SystemExit(
                            f"{chat} / {weights} / {name}: the reply differs from plain greedy decoding"
                        )
                    if tps > best.get(name, (0.0, None))[0]:
                        best[name] = (tps, stats)
            plain = best["plain"][0]
            for name, (tps, stats) in best.items():
                rate = f"{stats.acceptance_rate:.0%} of {stats.proposed}" if stats is not None else "-"
                rows.append((chat, weights, name, len(reference), tps, tps / plain, rate))
    tok.padding_side = "left"
    batch = tok.apply_chat_template(
        [[{"role": "user", "content": text}] for text in BATCH],
        add_generation_prompt=True,
        padding=True,
        return_tensors="pt",
    )
    configs = {"plain": {}, "prompt lookup 10": dict(prompt_lookup_num_tokens=10)}
    configs["draft: int4 bundled"] = dict(assistant_model=models["int4"])
    best = {}
    reference = None
    for _ in range(args.repeats):
        for name, options in configs.items():
            replies, tps, stats = run_batch(models["float32"], batch, args.new_tokens, **options)
            reference = reference or replies
            if replies != reference:
                raise SystemExit(f"batch / {name}: the replies differ from plain batched greedy decoding")
            if tps > best.get(name, (0.0, None))[0]:
                best[name] = (tps, stats)
    for name, (tps, stats) in best.items():
        rate = f"{stats.acceptance_rate:.0%} of {stats.proposed}" if stats is not None else "-"
        tokens = sum(len(r) for r in reference)
        rows.append(("batch of 4", "float32", name, tokens, tps, tps / best["plain"][0], rate))
    print(f"bundled SmolLM2-135M-Instruct, {args.threads} threads, greedy, best of {args.repeats}")
    header = ("chat", "weights", "decoding", "tokens", "decode tok/s", "vs plain", "accepted")
    widths = [max(len(str(r[i])) if i != 4 else 8 for r in rows + [header]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        cells = [r[0], r[1], r[2], str(r[3]), f"{r[4]:.1f}", f"{r[5]:.2f}x", r[6]]
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)))


if __name__ == "__main__":
    main()
