"""Load on `chatlm serve`: aggregate generated tokens/s and time to first token at 1, 4 and 16 concurrent
streaming clients; optionally llama.cpp's llama-server on the same GGUF file beside it.

    python benchmarks/bench_server.py                          # the bundled model, float32 (~3 min)
    python benchmarks/bench_server.py --quantization int4 --clients 1 4 16 --requests 3
    python benchmarks/bench_server.py --quantization gguf --clients 64 --duration 60 --max-batch 16 \
        --llama-server ~/.cache/llamacpp-build/bin/llama-server    # both servers, 16 slots each, 60 s of load

With ``--duration``, each client sends requests back to back until the time is up (a request that started goes
on to its end); errors (a status other than 200, a broken stream, an error event) are counted, not raised.

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
    """One greedy streaming chat request: its time to first content chunk, its usage record, its text, and
    whether it ended properly ([DONE], no error event)."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, first, usage, text, chunks, done = time.perf_counter(), None, None, "", 0, False
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - sent
                text += chunk["choices"][0]["delta"]["content"]
                chunks += 1
            usage = chunk.get("usage") or usage
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    tokens = usage["completion_tokens"] if usage else chunks
    return dict(ttft=first if first is not None else time.perf_counter() - sent, tokens=tokens, text=text)


async def level(
    url: str, clients: int, requests: int, max_tokens: int, limit: float, duration: float | None
) -> dict:
    """``clients`` at once, each sending ``requests`` requests (or, with ``duration``, requests until it is up)."""
    ttfts: list[float] = []
    tokens = errors = 0
    started = time.perf_counter()

    async def client(k: int) -> None:
        nonlocal tokens, errors
        async with httpx.AsyncClient(timeout=600) as http:
            r = 0
            while (r < requests) if duration is None else (time.perf_counter() - started < duration):
                if time.perf_counter() - started > limit:
                    return
                question = QUESTIONS[(k * 7 + r) % len(QUESTIONS)]
                r += 1
                try:
                    answer = await stream_chat(http, url, [{"role": "user", "content": question}], max_tokens)
                except (httpx.HTTPError, RuntimeError, json.JSONDecodeError):
                    errors += 1
                    continue
                ttfts.append(answer["ttft"])
                tokens += answer["tokens"]

    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - started
    ttfts.sort()
    return dict(
        clients=clients,
        requests=len(ttfts),
        errors=errors,
        tokens=tokens,
        seconds=wall,
        tokens_per_second=tokens / wall,
        ttft_p50=statistics.median(ttfts) if ttfts else float("nan"),
        ttft_p99=ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))] if ttfts else float("nan"),
    )


def run_levels(name: str, url: str, args) -> list[dict]:
    asyncio.run(level(url, 1, 1, 8, 60, None))  # warm-up
    results = []
    for clients in args.clients:
        result = asyncio.run(
            level(url, clients, args.requests, args.max_tokens, args.time_limit, args.duration)
        )
        results.append(result)
        print(f"{name}, {clients} clients: {result['tokens_per_second']:.1f} tok/s", file=sys.stderr)
    return results


def serve_and_load(name: str, server: subprocess.Popen, port: int, args) -> list[dict]:
    """The levels against ``server`` (started, listening on ``port``), which is stopped afterwards."""
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, url)
        return run_levels(name, url, args)
    finally:
        server.terminate()
        server.wait(60)


def table(title: str, results: list[dict]) -> str:
    header = "clients | requests | errors | tokens | seconds | aggregate tok/s | TTFT p50 | TTFT p99"
    lines = [title, header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['clients']:7d} | {r['requests']:8d} | {r['errors']:6d} | {r['tokens']:6d} | {r['seconds']:7.1f} | "
            f"{r['tokens_per_second']:15.1f} | {r['ttft_p50']:7.3f}s | {r['ttft_p99']:7.3f}s"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="what `chatlm serve` serves (default: the bundled model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    p.add_argument("--duration", type=float, default=None, help="instead: seconds of load per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=None, help="chatlm's batch (default: the most clients)")
    p.add_argument("--quantization", choices=("none", "int8", "int4", "gguf"), default="none")
    p.add_argument("--time-limit", type=float, default=300, help="seconds per level at most")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    p.add_argument(
        "--llama-server", metavar="BIN", help="also llama.cpp's llama-server on the same GGUF file"
    )
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    batch = args.max_batch or max(args.clients)
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
    command += ["--max-batch", str(batch), "--max-queue", str(4 * max(args.clients)), "--quiet"]
    command += [args.model] if args.model else []
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    ours = serve_and_load("chatlm", subprocess.Popen(command, env=env), port, args)
    peer = None
    if args.llama_server:
        from chatlm.loading.resolve import resolve_model

        path = str(resolve_model(args.model).path)
        port = free_port()
        threads = str(args.threads or os.cpu_count())
        peer_command = [args.llama_server, "-m", path, "--port", str(port), "-np", str(batch), "-t", threads]
        peer_command += ["-c", str(batch * 1024), "--log-disable"]
        server = subprocess.Popen(peer_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peer = serve_and_load("llama-server", server, port, args)
    load = (
        f"{args.duration:g} s of load per level" if args.duration else f"{args.requests} requests per client"
    )
    print(
        f"\n{args.model or 'bundled SmolLM2-135M-Instruct'}, greedy, max_tokens {args.max_tokens}, {load}, "
        f"{batch} sequences decoded together\n"
    )
    print(table(f"chatlm serve (weights {args.quantization})", ours))
    if peer:
        print()
        print(table(f"llama-server -np {batch}", peer))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "chatlm": ours, "llama-server": peer}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
