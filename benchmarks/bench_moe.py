"""Mixture-of-experts decode speed: does it follow the active parameters or the total?

    python benchmarks/bench_moe.py            # float32, 1 thread, 32 decode tokens, 7 rounds (~30 s)
    python benchmarks/bench_moe.py --quick    # 16 tokens, 2 rounds
    python benchmarks/bench_moe.py --dtype bfloat16 --json out.json

Three random-weight models, built by chatlm and run by its engine, with the same attention and embeddings:

- moe: Mixtral-style, ``--experts`` experts of width ``--expert-size``, top ``--top-k`` per token;
- dense-total: a llama whose MLP is ``experts * expert_size`` wide: the MoE's total parameter count;
- dense-active: a llama whose MLP is ``top_k * expert_size`` wide: the MoE's parameters used per token.

Decode on a CPU is bound by memory bandwidth: a step streams the weights it uses once. If the MoE reads only the
chosen experts, its decode time sits near dense-active's, far from dense-total's.

One thread by default: decode streams weights, and on the 2-core development VM one thread already draws
14-16 GB/s (float32), while two threads make every op wait for a peer that another process may have
descheduled, which buries the weight traffic under per-op stalls. ``--threads 2`` on an idle machine.

A round times each model once (the models take turns, in alternating order): the median time between
consecutive streamed tokens of a greedy generate (prefill excluded). The table gives the best round (other
processes only ever add time: the least disturbed round is the closest to the machine's real speed) and the
median round. Prefill (one forward over ``--prefill-tokens``, the fastest of 3 per round, the best round) is
shown too: there every expert has tokens, so the MoE reads all its weights, but its compute follows the active
parameters.

``--check-tokens 1 4 8 16`` also times what speculative decoding pays to check guesses: one forward of T tokens
onto a cached prompt (the fastest of 5 per round, the best round), as a multiple of one token's step. A dense
model reads its weights once for all T tokens, so the multiple stays near 1 while the step is bound by memory;
an MoE's T tokens pick different experts, so it reads more of them the more tokens it checks. A round of k
guesses wins only if the tokens it settles (accepted + 1) outnumber that multiple at T = k + 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from chatlm.bench import TokenArrivals
from chatlm.models import model_class
from chatlm.models.config import ModelConfig


def build(model_type: str, intermediate: int, args, **extra) -> torch.nn.Module:
    config = ModelConfig.from_dict(
        dict(
            model_type=model_type,
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 256),
            max_position_embeddings=4096,
            **extra,
        )
    )
    with torch.device("meta"):
        model = model_class(config)(config)
    model = model.to_empty(device="cpu").to(getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # random routing: the router's weights are as random as the rest
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval().requires_grad_(False)


def count(model) -> tuple[int, int]:
    """(total parameters, parameters one token uses): per sparse layer only top_k of the experts count."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = (
                experts.gate_up_proj.numel() + experts.down_proj.numel()
            ) // experts.gate_up_proj.shape[0]
            idle += per_expert * (experts.gate_up_proj.shape[0] - layer.mlp.top_k)
    return total, total - idle


def decode_step_s(model, prompt: torch.Tensor, tokens: int) -> float:
    streamer = TokenArrivals()
    model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, streamer=streamer)
    steps = [b - a for a, b in zip(streamer.times[1:], streamer.times[2:])]  # times[0] is the prompt
    return statistics.median(steps)


def prefill_s(model, prompt: torch.Tensor) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        model(prompt, logits_to_keep=1)
        best = min(best, time.perf_counter() - t0)
    return best


def check_s(model, prompt: torch.Tensor, tokens: int, g: torch.Generator) -> float:
    """The fastest of 5 forwards of ``tokens`` new tokens onto the cached prompt (the cache rolled back after)."""
    cache = model.new_cache(1, prompt.shape[1] + tokens)
    model(prompt, past_key_values=cache, logits_to_keep=1)
    best = float("inf")
    for _ in range(5):
        fed = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
        t0 = time.perf_counter()
        model(fed, past_key_values=cache)
        best = min(best, time.perf_counter() - t0)
        cache.trim(tokens)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 decode tokens, 2 rounds")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-size", type=int, default=1024, help="each expert's intermediate size")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--check-tokens",
        type=int,
        nargs="*",
        default=[],
        metavar="T",
        help="also time checking T tokens at once (speculative decoding's verify step)",
    )
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.decode_tokens, args.rounds = 16, 2
    torch.set_num_threads(args.threads)

    moe_options = dict(num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    models = {
        "moe": build("mixtral", args.expert_size, args, **moe_options),
        "dense-total": build("llama", args.experts * args.expert_size, args),
        "dense-active": build("llama", args.top_k * args.expert_size, args),
    }
    g = torch.Generator().manual_seed(1)
    short = torch.randint(0, args.vocab, (1, 16), generator=g)
    long = torch.randint(0, args.vocab, (1, args.prefill_tokens), generator=g)
    with torch.no_grad():
        for model in models.values():  # warm-up: lazy initialisation, first-touch page faults, kernel choice
            model.generate(short, max_new_tokens=4, min_new_tokens=4)
            model(long, logits_to_keep=1)
        decode: dict[str, list[float]] = {name: [] for name in models}
        prefill: dict[str, list[float]] = {name: [] for name in models}
        checks = [1] + [t for t in args.check_tokens if t != 1] if args.check_tokens else []
        check: dict[tuple[str, int], list[float]] = {(n, t): [] for n in models for t in checks}
        for r in range(args.rounds):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                decode[name].append(decode_step_s(models[name], short, args.decode_tokens))
                prefill[name].append(prefill_s(models[name], long))
                for t in checks:
                    check[name, t].append(check_s(models[name], long, t, g))
                print(
                    f"round {r + 1}/{args.rounds} {name:12s} decode {1 / decode[name][-1]:6.1f} tok/s",
                    file=sys.stderr,
                )

    bytes_per = torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(
        f"\n{args.layers} layers, hidden {args.hidden}, {args.experts} experts x {args.expert_size} top-{args.top_k}, "
        f"{args.dtype}, {args.threads} threads, torch {torch.__version__}; {args.rounds} rounds of "
        f"{args.decode_tokens} decode tokens\n"
    )
    header = (
        f"{'model':12s} | {'total params':>12s} | {'active params':>13s} | {'decode tok/s':>12s} | "
        f"{'ms/token':>8s} | {'GB/s (active)':>13s} | {'median round':>12s} | {'prefill tok/s':>13s}"
    )
    print(header + "\n" + "-" * len(header))
    results = {}
    for name, model in models.items():
        total, active = count(model)
        best, median = min(decode[name]), statistics.median(decode[name])
        results[name] = dict(
            total_params=total,
            active_params=active,
            decode_best_step_s=best,
            decode_median_step_s=median,
            decode_samples_s=decode[name],
            prefill_tps=args.prefill_tokens / min(prefill[name]),
        )
        print(
            f"{name:12s} | {total / 1e6:10.1f} M | {active / 1e6:11.1f} M | {1 / best:12.1f} | {1000 * best:8.2f} | "
            f"{active * bytes_per / best / 1e9:13.1f} | {1 / median:6.1f} tok/s | {results[name]['prefill_tps']:13.0f}"
        )
    for key, label in (("decode_best_step_s", "best rounds"), ("decode_median_step_s", "median rounds")):
        moe, dense_total, dense_active = (results[n][key] for n in models)
        print(
            f"{label}: moe decode time / dense-active {moe / dense_active:.2f}x, / dense-total {moe / dense_total:.2f}x"
        )
    if checks:
        print(
            "\nchecking T tokens in one forward (speculative decoding's verify), as a multiple of one token's:"
        )
        print(f"{'model':12s} | " + " | ".join(f"T={t:<3d}" for t in checks))
        for name in models:
            one = min(check[name, 1])
            results[name]["check_s"] = {t: min(check[name, t]) for t in checks}
            print(f"{name:12s} | " + " | ".join(f"{min(check[name, t]) / one:5.2f}" for t in checks))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
