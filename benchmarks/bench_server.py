"""Load on `chatlm serve`: aggregate generated tokens/s and time to first token at 1, 4 and 16 concurrent
streaming clients.

    python benchmarks/bench_server.py                          # the bundled model, float32 (~3 min)
    python benchmarks/bench_server.py --quantization int4 --clients 1 4 16 --requests 3

The server runs in its own process (`chatlm serve` on a free port of 127.0.0.1; nothing else is contacted). For
each concurrency level, that many clients each send ``--requests`` streaming chat requests one after another
(greedy, ``--max-tokens``), from one asyncio loop so that the load generator itself stays light. Throughput is
all the replies' tokens (as the server's usage reports them) over the level's wall time; time to first token is
from sending a request to its first content chunk. A level stops early at ``--time-limit`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three colours and say something about each.",
    "Explain what a river delta is.",
    "Write a short poem about the sea.",
    "Why is the sky blue? Explain briefly.",
    "Give three tips for learning to cook.",
    "What do bees make, and how?",
    "Describe a cat to someone who has never seen one.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(server: subprocess.Popen, url: str, limit: float = 300) -> None:
    """Until the server at ``url`` answers /health (SystemExit if it exits or takes over ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while True:
        if server.poll() is not None:
            raise SystemExit("the server exited")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not start in {limit:.0f} s")
        time.sleep(0.3)


async def stream_chat(http: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> dict:
    """One greedy streaming chat request: its time to first content chunk, its usage record and its text."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, first, usage, text = time.perf_counter(), None, None, ""
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - sent
                text += chunk["choices"][0]["delta"]["content"]
            usage = chunk.get("usage") or usage
    return dict(ttft=first if first is not None else time.perf_counter() - sent, usage=usage, text=text)


async def one_request(http: httpx.AsyncClient, url: str, question: str, max_tokens: int) -> tuple[float, int]:
    answer = await stream_chat(http, url, [{"role": "user", "content": question}], max_tokens)
    return answer["ttft"], answer["usage"]["completion_tokens"] if answer["usage"] else 0


async def level(url: str, clients: int, requests: int, max_tokens: int, limit: float) -> dict:
    ttfts: list[float] = []
    tokens = 0
    started = time.perf_counter()

    async def client(k: int) -> None:
        nonlocal tokens
        async with httpx.AsyncClient(timeout=600) as http:
            for r in range(requests):
                if time.perf_counter() - started > limit:
                    return
                question = QUESTIONS[(k * requests + r) % len(QUESTIONS)]
                ttft, n = await one_request(http, url, question, max_tokens)
                ttfts.append(ttft)
                tokens += n

    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - started
    ttfts.sort()
    return dict(
        clients=clients,
        requests=len(ttfts),
        tokens=tokens,
        seconds=wall,
        tokens_per_second=tokens / wall,
        ttft_p50=statistics.median(ttfts),
        ttft_p99=ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="what `chatlm serve` serves (default: the bundled model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quantization", choices=("none", "int8", "int4"), default="none")
    p.add_argument("--time-limit", type=float, default=300, help="seconds per level at most")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "chatlm",
        "serve",
        "--port",
        str(port),
        "--quantization",
        args.quantization,
    ]
    command += ["--max-batch", str(max(args.clients))] + ([args.model] if args.model else [])
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, url)
        asyncio.run(level(url, 1, 1, 8, 60))  # warm-up
        results = []
        for clients in args.clients:
            result = asyncio.run(level(url, clients, args.requests, args.max_tokens, args.time_limit))
            results.append(result)
            print(f"{clients} clients: {result['tokens_per_second']:.1f} tok/s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(60)
    print(
        f"\nchatlm serve, {args.model or 'bundled SmolLM2-135M-Instruct'}, weights {args.quantization}, greedy, "
        f"max_tokens {args.max_tokens}, {args.requests} requests per client\n"
    )
    header = "clients | requests | tokens | seconds | aggregate tok/s | vs 1 client | TTFT p50 | TTFT p99"
    print(header + "\n" + "-" * len(header))
    base = results[0]["tokens_per_second"]
    for r in results:
        print(
            f"{r['clients']:7d} | {r['requests']:8d} | {r['tokens']:6d} | {r['seconds']:7.1f} | "
            f"{r['tokens_per_second']:15.1f} | {r['tokens_per_second'] / base:10.2f}x | "
            f"{r['ttft_p50']:7.3f}s | {r['ttft_p99']:7.3f}s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
