"""A/B: this checkout's decode speed against another checkout's (a commit before a change), side by side in one run.

    git worktree add ../base <commit>
    python benchmarks/bench_ab.py ../base                          # float32 + int4, 3 rounds (~6 min)
    python benchmarks/bench_ab.py ../base --server --clients 16    # also `chatlm serve` at 16 clients

Each round runs ``chatlm bench`` (the bundled model, 2 threads, a 500-token prompt, 128 greedy tokens) once from
each checkout, in a fresh process whose ``PYTHONPATH`` is that checkout's ``src``, the order flipping every round,
so that a burst of load from elsewhere hits both alike; the table gives each side's median and their ratio. With
``--server``, `bench_server.py` of each checkout runs its server the same way, interleaved too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def run_bench(tree: Path, weights: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [sys.executable, "-m", "chatlm", "bench", "--json", "--threads", str(args.threads)]
    command += [
        "--new-tokens",
        str(args.new_tokens),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--repeats",
        "2",
    ]
    if weights != "float32":
        command += ["--quantization", weights]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{") :])


def run_server(tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        command = [sys.executable, str(tree / "benchmarks" / "bench_server.py"), "--json", f.name]
        command += ["--clients", *map(str, args.clients), "--requests", "2", "--threads", str(args.threads)]
        subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return json.load(open(f.name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path, help="the other checkout (its src/ is imported)")
    p.add_argument("--weights", nargs="+", default=["float32", "int4"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=500)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--server", action="store_true", help="also bench_server.py from each checkout")
    p.add_argument("--clients", type=int, nargs="+", default=[16])
    args = p.parse_args()
    trees = {"this": HERE, "base": args.base.resolve()}
    decode: dict[tuple[str, str], list[float]] = {}
    prefill: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        for weights in args.weights:
            order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
            for name in order:
                result = run_bench(trees[name], weights, args)
                decode.setdefault((name, weights), []).append(result["decode_tokens_per_s"])
                prefill.setdefault((name, weights), []).append(result["prefill_tokens_per_s"])
                print(
                    f"round {round_ + 1} {weights:8s} {name:5s} decode {result['decode_tokens_per_s']:.1f} tok/s"
                )
    print(f"\n{'weights':8s} | {'metric':8s} | {'this':>8s} | {'base':>8s} | this/base")
    for weights in args.weights:
        for metric, table in (("decode", decode), ("prefill", prefill)):
            this, base = (statistics.median(table[name, weights]) for name in trees)
            print(f"{weights:8s} | {metric:8s} | {this:8.1f} | {base:8.1f} | {this / base:.3f}")
    if args.server:
        results: dict[str, list[dict]] = {}
        for round_ in range(args.rounds):
            for name in list(trees) if round_ % 2 == 0 else list(reversed(trees)):
                results.setdefault(name, []).append(run_server(trees[name], args))
        print(f"\n{'clients':7s} | {'this tok/s':>10s} | {'base tok/s':>10s} | this/base")
        for level, clients in enumerate(args.clients):
            this, base = (
                statistics.median(
                    r.get("chatlm", r.get("results"))[level]["tokens_per_second"] for r in results[name]
                )
                for name in trees
            )
            print(f"{clients:7d} | {this:10.1f} | {base:10.1f} | {this / base:.3f}")


if __name__ == "__main__":
    main()
