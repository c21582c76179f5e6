"""The prefix cache against computing every prompt whole: a 10-turn chat, and 16 server clients sharing a long
system prompt.

    python benchmarks/bench_prefix_cache.py              # both parts, the bundled model (~4 min on 2 cores)
    python benchmarks/bench_prefix_cache.py chat --repeats 3
    python benchmarks/bench_prefix_cache.py server --clients 16

``chat``: the loop of ``chatlm chat`` (render the chat with its template, fetch the longest cached prefix, generate
greedily with a streamer, store prompt and reply), ten user turns of about 40 tokens, replies capped at 64 tokens;
with a `PrefixCache` and without one, alternating, ``--repeats`` times each. Greedy replies are the same both ways,
so both runs see the same chats. Time to first token is from the call to the first token at the streamer.

``server``: ``chatlm serve`` in its own process, once with ``--cache-ram 1024`` and once with ``--cache-ram 0``;
``--clients`` streaming clients at once, each with the same ~1,000-token system prompt and a question of its own
(about 30 tokens), ``max_tokens`` 16. Aggregate time to first token is the clients' mean (and their sum);
prompt tokens computed come from the server's ``/metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
import torch
from bench_server import free_port, stream_chat, wait_until_up

USER_TURNS = [
    "Hello! I am planning a trip to Portugal next spring and I would like some help. Could you tell me which "
    "cities are worth visiting for a first-time traveller?",
    "That sounds lovely. How many days would you recommend spending in Lisbon, and what are the neighbourhoods "
    "that I should not miss while I am there?",
    "I also like the sea. Are there beaches near Lisbon that I can reach by train in less than an hour, and are "
    "they crowded in April or May?",
    "What about food? Please list a few traditional dishes I should try, and say which ones are good for someone "
    "who does not eat meat.",
    "Great. Now, between Porto and the Algarve, which one would you pick for three days if I enjoy walking, "
    "old towns and quiet evenings?",
    "How do I get from Lisbon to Porto? Compare the train, the bus and driving a rented car by time, price and "
    "comfort, please.",
    "I would like to see some wine country too. Is the Douro valley reachable as a day trip from Porto, or "
    "should I stay a night there?",
    "Could you suggest a budget per day for a mid-range traveller, including a hotel, meals and transport, in "
    "euros, for both cities?",
    "Which words of Portuguese would be most useful to learn before I go? Give me ten with their meaning and a "
    "hint on how to say them.",
    "Thank you. Finally, please summarise the whole plan in a short day-by-day list that I can print and take "
    "with me on the trip.",
]

SYSTEM_RULE = (
    "Rule {n}: when a customer asks about order number {n}, check the warehouse record, confirm the delivery "
    "address, and answer politely in one sentence."
)
QUESTIONS = [
    "My parcel has not arrived yet after ten days of waiting. What should I do now, and who should I contact?",
    "Can I change the delivery address of an order that I placed this morning, before it leaves the warehouse?",
    "Do you ship to Norway and Switzerland, and are there any extra customs fees that I would have to pay there?",
    "I received the wrong colour of the jacket I ordered. How do I return it and get the right one instead?",
]


def system_prompt(tokenizer, tokens: int) -> str:
    """Shop rules, as many as make about ``tokens`` tokens."""
    rules, n = [], 1
    while len(tokenizer(" ".join(rules))["input_ids"]) < tokens:
        rules.append(SYSTEM_RULE.format(n=n))
        n += 1
    return "You are the assistant of an online shop. " + " ".join(rules)


# -- the chat ----------------------------------------------------------------------------------------------------


def one_chat(model, tokenizer, cache, max_new_tokens: int) -> dict:
    from chatlm import TextStreamer
    from chatlm.chat_turn import ChatTurn
    from chatlm.generation.prefix_cache import PrefixCache

    class FirstToken(TextStreamer):
        def put(self, value) -> None:
            if not self.next_tokens_are_prompt and self.first is None:
                self.first = time.perf_counter()
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pass

    store = PrefixCache() if cache else None
    messages, ttfts, prompts, reused = [], [], [], []
    started = time.perf_counter()
    for text in USER_TURNS:
        messages.append({"role": "user", "content": text})
        prompt = ChatTurn.render(tokenizer, messages).prompt_ids
        streamer = FirstToken(tokenizer, skip_prompt=True)
        streamer.first = None
        called = time.perf_counter()
        past = store.fetch(model, prompt, limit=len(prompt) - 1) if store else None
        reused.append(past.get_seq_length() if past else 0)
        output = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, streamer=streamer, past_key_values=past
        )
        if store:
            store.insert_cache(past)
        ttfts.append(streamer.first - called)
        prompts.append(len(prompt))
        reply = tokenizer.decode(output[0, len(prompt) :].tolist(), skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
    total = time.perf_counter() - started
    return dict(total=total, ttfts=ttfts, prompts=prompts, reused=reused, replies=messages[1::2])


def bench_chat(args) -> dict:
    from chatlm import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(None)
    model = AutoModelForCausalLM.from_pretrained(None, quantization_config=quantization(args.quantization))
    model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=4)  # warm-up
    runs = {True: [], False: []}
    for repeat in range(args.repeats):
        for cache in (True, False) if repeat % 2 == 0 else (False, True):
            runs[cache].append(one_chat(model, tokenizer, cache, args.max_new_tokens))
            print(
                f"chat, cache {'on' if cache else 'off'}: {runs[cache][-1]['total']:.1f} s", file=sys.stderr
            )
    same = all(r["replies"] == runs[False][0]["replies"] for r in runs[True] + runs[False])

    def median(cache: bool, pick) -> float:
        return statistics.median(pick(r) for r in runs[cache])

    prompts, reused = runs[True][0]["prompts"], runs[True][0]["reused"]
    rows = [
        ("time to first token, turn 1 (s)", lambda r: r["ttfts"][0]),
        ("time to first token, turn 10 (s)", lambda r: r["ttfts"][-1]),
        ("time to first token, mean of 10 turns (s)", lambda r: statistics.mean(r["ttfts"])),
        ("the whole chat (s)", lambda r: r["total"]),
    ]
    print(
        f"\n10-turn chat, bundled SmolLM2-135M-Instruct, weights {args.quantization}, {args.threads} threads, replies <= "
        f"{args.max_new_tokens} tokens, prompts {prompts[0]}..{prompts[-1]} tokens, median of {args.repeats}; "
        f"replies identical with and without the cache: {same}; prompt tokens reused per turn: {reused}\n"
    )
    print("metric | cache off | cache on | off / on\n--- | --- | --- | ---")
    table = {}
    for name, pick in rows:
        off, on = median(False, pick), median(True, pick)
        table[name] = dict(off=off, on=on, ratio=off / on)
        print(f"{name} | {off:.3f} | {on:.3f} | {off / on:.1f}x")
    return dict(same_replies=same, prompts=prompts, table=table)


def quantization(name: str):
    from chatlm import QuantizationConfig

    return (
        None
        if name == "none"
        else QuantizationConfig(load_in_8bit=name == "int8", load_in_4bit=name == "int4")
    )


# -- the server --------------------------------------------------------------------------------------------------


async def ask(http: httpx.AsyncClient, url: str, system: str, question: str) -> dict:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return await stream_chat(http, url, messages, 16)


def metrics(url: str) -> dict[str, float]:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line and line[0] != "#"}


def serve_once(args, cache_ram: int, system: str, questions: list[str]) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "chatlm", "serve", "--port", str(port), "--cache-ram", str(cache_ram)]
    command += ["--max-batch", str(args.clients), "--quantization", args.quantization]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    server = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, url)

        async def everyone() -> list[dict]:
            async with httpx.AsyncClient(timeout=900) as http:
                await ask(http, url, "Be brief.", "Hi")  # warm-up, shares nothing with the rest
                before = metrics(url)
                started = time.perf_counter()
                answers = await asyncio.gather(*(ask(http, url, system, q) for q in questions))
                wall = time.perf_counter() - started
                after = metrics(url)
                return answers, wall, before, after

        answers, wall, before, after = asyncio.run(everyone())
    finally:
        server.terminate()
        server.wait(60)
    computed = after["chatlm_prompt_tokens_computed_total"] - before["chatlm_prompt_tokens_computed_total"]
    return dict(
        ttfts=[a["ttft"] for a in answers],
        texts=[a["text"] for a in answers],
        prompt_tokens=sum(a["usage"]["prompt_tokens"] for a in answers),
        cached=sum(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers),
        computed=computed,
        wall=wall,
    )


def bench_server(args) -> dict:
    from chatlm import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(None)
    system = system_prompt(tokenizer, args.system_tokens)
    questions = [f"Customer {k + 1} asks: {QUESTIONS[k % len(QUESTIONS)]}" for k in range(args.clients)]
    shared = len(tokenizer.apply_chat_template([{"role": "system", "content": system}])["input_ids"])
    results = {}
    for cache_ram in (1024, 0):
        results[cache_ram] = serve_once(args, cache_ram, system, questions)
        print(f"server, cache-ram {cache_ram}: {results[cache_ram]['wall']:.1f} s", file=sys.stderr)
    on, off = results[1024], results[0]
    per_client = (on["prompt_tokens"] / args.clients) - shared
    print(
        f"\n{args.clients} streaming clients at once, `chatlm serve` (bundled model, weights {args.quantization}, {args.threads} "
        f"threads, --max-batch {args.clients}), a shared system prompt of {shared} tokens + "
        f"{per_client:.0f} tokens each, max_tokens 16; replies identical: {on['texts'] == off['texts']}\n"
    )
    print("metric | cache off | cache on | off / on\n--- | --- | --- | ---")
    rows = [
        ("prompt tokens computed", off["computed"], on["computed"]),
        ("prompt tokens reported cached", off["cached"], on["cached"]),
        ("mean time to first token (s)", statistics.mean(off["ttfts"]), statistics.mean(on["ttfts"])),
        ("sum of times to first token (s)", sum(off["ttfts"]), sum(on["ttfts"])),
        ("last first token (s)", max(off["ttfts"]), max(on["ttfts"])),
        ("all replies done (s)", off["wall"], on["wall"]),
    ]
    for name, a, b in rows:
        ratio = f"{a / b:.1f}x" if b else "-"
        print(f"{name} | {a:.3f} | {b:.3f} | {ratio}")
    print(f"\ntarget: computed <= {shared} + {args.clients} x 40 = {shared + 40 * args.clients}")
    return dict(shared=shared, on=on, off=off)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", choices=("chat", "server", "both"), default="both")
    p.add_argument("--repeats", type=int, default=2, help="chats with and without the cache, each")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--quantization", choices=("none", "int8", "int4"), default="none", help="the model's weights"
    )
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    results = {}
    if args.part in ("chat", "both"):
        results["chat"] = bench_chat(args)
    if args.part in ("server", "both"):
        results["server"] = bench_server(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
