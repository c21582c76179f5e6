"""chatlm against transformers on the bundled model: load time, prefill and decode speed, peak memory.

    python benchmarks/bench_core.py                 # full run: float32 and bfloat16, 3 repeats (~5-8 min, 2 cores)
    python benchmarks/bench_core.py --quick         # smoke run: 64-token prompt, 16 new tokens, 1 repeat
    python benchmarks/bench_core.py --json out.json # also save every sample

Each (engine, dtype) pair runs in a subprocess of its own (``--worker ENGINE --dtype DTYPE``, one JSON line on
stdout), so that the peak RSS is that engine's alone and no allocator or thread-pool state carries over. The
workers are interleaved (the engine order alternates from one repeat to the next) and every figure reported is
the median over ``--repeats`` runs: the machine this runs on is shared and noisy.

What is measured, in each worker, after a warm-up (a short generate and a long-prompt prefill):

- load: wall time of ``from_pretrained`` until it returns the model (imports are timed apart, as "import").
- prefill: ``generate(prompt, max_new_tokens=1)`` on a ``--prefill-tokens`` long prompt (the time to the first
  token, which both engines compute with the logits of the last position only); the fastest of a few calls.
- decode: ``generate(short prompt, min_new_tokens=N, max_new_tokens=N)`` greedy, with a streamer that records
  when each token arrives, so the prefill is left out exactly. Two figures: "median step" = 1 / the median time
  between consecutive tokens (robust to bursts of load from other tenants), and "wall" = (N - 1) / (arrival of
  token N - arrival of token 1).
- peak RSS: ``ru_maxrss`` of the worker at its end (loading included: that is where transformers peaks).

The driver also notes how busy the CPUs were with *other* processes while each worker ran (from /proc/stat,
less the worker's own CPU time): "foreign load" in the progress lines and the JSON. Runs with a high foreign
load are the noisy ones; the table says when the median run was disturbed.

Prompts are token ids, not text: the reference chats' prompt ids (``--reference``) repeated to length, or
seeded random ids in [3, vocab) when that file is absent. Neither engine's tokenizer is involved.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("chatlm", "transformers")
DTYPES = ("float32", "bfloat16")
RESULT_TAG = "BENCH_RESULT "
IDLE_LOAD = 0.05  # --wait-idle: the CPUs count as idle below this load
NOISY_LOAD = 0.15  # a worker's run counts as disturbed when other processes took more of the CPUs than this
DEFAULT_REFERENCE = Path("/work/shared/reference/smollm2_greedy.json")
VOCAB_SIZE = 49152  # SmolLM2; ids 0-2 are special tokens
EOS_ID = 2

# name, unit, key in a worker's result, which direction is better
METRICS = (
    ("import", "s", "import_s", "lower"),
    ("load", "s", "load_s", "lower"),
    ("prefill", "tok/s", "prefill_tps", "higher"),
    ("time to first token", "s", "ttft_s", "lower"),
    ("decode, median step", "tok/s", "decode_step_tps", "higher"),
    ("decode, wall", "tok/s", "decode_tps", "higher"),
    ("RSS after load", "MiB", "rss_loaded_mib", "lower"),
    ("peak RSS", "MiB", "peak_rss_mib", "lower"),
)

REQUIRED = {
    "chatlm": ("torch", "chatlm", "gguf"),
    "transformers": ("torch", "transformers", "accelerate", "gguf", "chatlm"),
}


class BenchError(RuntimeError):
    pass


# --- prompts ----------------------------------------------------------------------------------------------------
def prompt_ids(length: int, reference: Path, seed: int = 0) -> tuple[list[int], str]:
    """``length`` token ids: the reference chats' prompt ids, cycled, or seeded random ids without the file."""
    if reference.is_file():
        chats = json.loads(reference.read_text())["chats"]
        pool = [i for chat in chats.values() for i in chat["prompt_ids"]]
        if pool:
            return [pool[i % len(pool)] for i in range(length)], f"{reference} (prompt ids, cycled)"
    import random

    rng = random.Random(seed)
    ids = [rng.randrange(3, VOCAB_SIZE) for _ in range(length)]
    return ids, f"random ids in [3, {VOCAB_SIZE}), seed {seed}"


# --- the worker: one engine, one dtype, one process -------------------------------------------------------------
def _current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


class _ArrivalTimes:
    """A generate() streamer that notes when each put() comes: first the prompt, then one per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _check_modules(engine: str) -> None:
    missing = [m for m in REQUIRED[engine] if importlib.util.find_spec(m) is None]
    if missing:
        hint = (
            "pip install -e '.[test]'  (transformers==5.24.0, accelerate)" if engine == "transformers" else ""
        )
        raise BenchError(f"the {engine} benchmark needs {', '.join(missing)}, not installed. {hint}".strip())


def run_worker(args) -> dict:
    _check_modules(args.worker)
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from chatlm.loading.resolve import bundled_model_path

    path = bundled_model_path()
    if args.worker == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:
        from chatlm.auto import AutoModelForCausalLM
    import_s = time.perf_counter() - t0
    rss_imported = _current_rss_mib()

    t0 = time.perf_counter()
    if args.worker == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype
        )
        model.eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(None, torch_dtype=dtype)
    load_s = time.perf_counter() - t0
    rss_loaded = _current_rss_mib()
    if model.dtype != dtype:
        raise BenchError(f"{args.worker} loaded the model in {model.dtype}, not {dtype}")

    def generate(ids: list[int], new: int, streamer=None) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long)
        kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "streamer": streamer}
        if args.worker == "transformers":
            kwargs.update(attention_mask=torch.ones_like(x), pad_token_id=EOS_ID)
        out = model.generate(x, **kwargs)
        if out.shape != (1, len(ids) + new):
            raise BenchError(f"{args.worker} generated {tuple(out.shape)}, expected {(1, len(ids) + new)}")
        return out

    long_prompt, source = prompt_ids(args.prefill_tokens, args.reference)
    short_prompt, _ = prompt_ids(args.decode_prompt_tokens, args.reference)

    # Warm-up: first calls pay for lazy initialisation, first-touch page faults, oneDNN kernel selection.
    generate(short_prompt, min(8, args.decode_tokens))
    generate(long_prompt, 1)

    import gc

    gc.collect()
    prefill_times = []
    for _ in range(args.prefill_runs):
        t0 = time.perf_counter()
        generate(long_prompt, 1)
        prefill_times.append(time.perf_counter() - t0)
    prefill_s = min(prefill_times)  # the least disturbed call: other tenants only ever add time

    gc.collect()
    streamer = _ArrivalTimes()
    t0 = time.perf_counter()
    out = generate(short_prompt, args.decode_tokens, streamer)
    generate_s = time.perf_counter() - t0
    arrivals = streamer.times
    if len(arrivals) != args.decode_tokens + 1:
        raise BenchError(
            f"{args.worker}'s streamer got {len(arrivals)} puts, expected {args.decode_tokens + 1} (prompt + tokens)"
        )
    decode_s = arrivals[-1] - arrivals[1]
    steps = [b - a for a, b in zip(arrivals[1:], arrivals[2:])]

    return {
        "engine": args.worker,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompt_source": source,
        "import_s": import_s,
        "load_s": load_s,
        "prefill_tokens": len(long_prompt),
        "prefill_s": prefill_s,
        "prefill_samples_s": prefill_times,
        "prefill_tps": len(long_prompt) / prefill_s,
        "decode_prompt_tokens": len(short_prompt),
        "decode_tokens": args.decode_tokens,
        "ttft_s": arrivals[1] - t0,
        "decode_s": decode_s,
        "decode_tps": (args.decode_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
        "decode_step_median_ms": 1000 * statistics.median(steps),
        "decode_step_tps": 1 / statistics.median(steps),
        "generate_s": generate_s,
        "generated_ids": out[0, len(short_prompt) :].tolist(),
        "rss_imported_mib": rss_imported,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_mib": _peak_rss_mib(),
        "torch": torch.__version__,
    }


# --- the driver -------------------------------------------------------------------------------------------------
def _busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (every core), or nan where /proc/stat is absent."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(limit_s: float) -> float:
    """Wait (at most ``limit_s``) until the CPUs have been idle for 3 s running; return the seconds waited."""
    start = time.perf_counter()
    calm = 0
    while time.perf_counter() - start < limit_s:
        busy0, t0 = _busy_seconds(), time.perf_counter()
        time.sleep(1.0)
        load = (_busy_seconds() - busy0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
        calm = calm + 1 if load < IDLE_LOAD else 0
        if calm >= 3 or load != load:  # idle for 3 s, or no /proc/stat to tell
            break
    return time.perf_counter() - start


def spawn(engine: str, dtype: str, args) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        engine,
        "--dtype",
        dtype,
        "--threads",
        str(args.threads),
        "--prefill-tokens",
        str(args.prefill_tokens),
        "--decode-prompt-tokens",
        str(args.decode_prompt_tokens),
        "--decode-tokens",
        str(args.decode_tokens),
        "--prefill-runs",
        str(args.prefill_runs),
        "--reference",
        str(args.reference),
    ]
    env = dict(os.environ)
    # Same thread count for every library underneath torch; no tokenizers fork warnings.
    env.update(
        OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false"
    )
    busy0, own0, wall0 = _busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{engine} {dtype} worker took more than {args.worker_timeout} s") from e
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            if "error" in result:
                raise BenchError(f"{engine} {dtype} worker: {result['error']}")
            foreign = _busy_seconds() - busy0 - (_children_cpu_seconds() - own0)
            capacity = (time.perf_counter() - wall0) * (os.cpu_count() or 1)
            result["foreign_load"] = max(0.0, foreign / capacity) if capacity > 0 else float("nan")
            return result
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
    raise BenchError(f"{engine} {dtype} worker failed (exit {proc.returncode}):\n{tail}")


def median_of(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _fmt(value: float) -> str:
    if value != value:  # nan
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def summarize(runs: list[dict], engines, dtypes) -> dict:
    summary: dict = {}
    for dtype in dtypes:
        for engine in engines:
            mine = [r for r in runs if r["engine"] == engine and r["dtype"] == dtype]
            summary.setdefault(dtype, {})[engine] = {
                key: {"median": median_of(mine, key), "samples": [r[key] for r in mine]}
                for key in [m[2] for m in METRICS] + ["foreign_load"]
            }
    return summary


def table(summary: dict, engines, dtypes) -> str:
    both = set(engines) == set(ENGINES)
    header = ["dtype", "metric", "chatlm", "transformers", "chatlm/transformers", "better"]
    rows = []
    for dtype in dtypes:
        for name, unit, key, better in METRICS:
            values = {
                e: summary[dtype][e][key]["median"] if e in summary[dtype] else float("nan") for e in ENGINES
            }
            ratio = (
                values["chatlm"] / values["transformers"] if both and values["transformers"] else float("nan")
            )
            rows.append(
                [
                    dtype,
                    f"{name} ({unit})",
                    _fmt(values["chatlm"]),
                    _fmt(values["transformers"]),
                    f"{ratio:.2f}x" if ratio == ratio else "-",
                    f"{better} is better",
                ]
            )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    align = ["<", "<", ">", ">", ">", "<"]
    lines = [" | ".join(f"{h:{a}{w}}" for h, a, w in zip(header, align, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)) for r in rows]
    return "\n".join(lines)


def agreement(runs: list[dict], dtypes) -> list[str]:
    """How many leading greedy tokens chatlm and transformers share (first repeat), per dtype."""
    notes = []
    for dtype in dtypes:
        ids = {r["engine"]: r["generated_ids"] for r in runs if r["dtype"] == dtype}
        if len(ids) == 2:
            a, b = ids["chatlm"], ids["transformers"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            notes.append(f"{dtype}: greedy tokens agree on the first {same} of {len(a)}")
    return notes


def run_driver(args) -> int:
    engines = tuple(args.engines)
    dtypes = tuple(args.dtypes)
    for engine in engines:
        try:
            _check_modules(engine)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        from chatlm.loading.resolve import bundled_model_path

        bundled_model_path()
    except (ImportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    runs: list[dict] = []
    for repeat in range(args.repeats):
        order = engines if repeat % 2 == 0 else engines[::-1]
        for dtype in dtypes:
            for engine in order:
                if args.wait_idle > 0:
                    wait_for_idle(args.wait_idle)
                try:
                    r = spawn(engine, dtype, args)
                except BenchError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
                r["repeat"] = repeat
                runs.append(r)
                print(
                    f"[{repeat + 1}/{args.repeats}] {engine:12s} {dtype:8s}  load {r['load_s']:5.1f} s  "
                    f"prefill {r['prefill_tps']:6.0f} tok/s  decode {r['decode_step_tps']:5.1f} tok/s "
                    f"(wall {r['decode_tps']:5.1f})  "
                    f"peak RSS {r['peak_rss_mib']:5.0f} MiB  foreign load {r['foreign_load']:4.0%}  "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )

    summary = summarize(runs, engines, dtypes)
    first = runs[0]
    print(
        f"\nSmolLM2-135M-Instruct Q4_1 (bundled GGUF), torch {first['torch']}, {first['threads']} threads, "
        f"{platform.processor() or platform.machine()}; median of {args.repeats} run(s) per cell"
    )
    print(
        f"prefill: {args.prefill_tokens}-token prompt, generate(max_new_tokens=1); decode: {args.decode_tokens} "
        f"greedy tokens after a {args.decode_prompt_tokens}-token prompt"
    )
    print(
        "decode tok/s: 'median step' = 1 / median time between consecutive tokens (robust to noise); "
        "'wall' = (N-1) / (last token's arrival - first token's)"
    )
    print(f"prompt ids: {first['prompt_source']}\n")
    print(table(summary, engines, dtypes))
    notes = agreement([r for r in runs if r["repeat"] == 0], dtypes)
    if notes:
        print("\n" + "; ".join(notes))
    loads = [r["foreign_load"] for r in runs if r["foreign_load"] == r["foreign_load"]]
    if loads:
        noisy = sum(load > NOISY_LOAD for load in loads)
        print(
            f"foreign load (other processes' share of the CPUs during a worker): median {statistics.median(loads):.0%}, "
            f"max {max(loads):.0%}; {noisy} of {len(loads)} runs above {NOISY_LOAD:.0%}"
            + (" -- figures are disturbed, rerun on an idle machine or with more --repeats" if noisy else "")
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")

    if args.json:
        payload = {
            "meta": {
                "model": "SmolLM2-135M-Instruct.Q4_1.gguf (bundled)",
                "torch": first["torch"],
                "python": platform.python_version(),
                "machine": platform.machine(),
                "threads": args.threads,
                "repeats": args.repeats,
                "prefill_tokens": args.prefill_tokens,
                "decode_prompt_tokens": args.decode_prompt_tokens,
                "decode_tokens": args.decode_tokens,
                "prefill_runs": args.prefill_runs,
                "prompt_source": first["prompt_source"],
                "decode_definition": "decode_step_tps: 1 / median time between consecutive tokens; "
                "decode_tps: (N-1) / (arrival of last token - arrival of first token); greedy",
                "prefill_definition": "prompt tokens / median time of generate(max_new_tokens=1)",
                "better": {key: better for _, _, key, better in METRICS},
            },
            "summary": summary,
            "runs": runs,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"saved {args.json}")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per (engine, dtype); the median is reported")
    p.add_argument("--quick", action="store_true", help="smoke run: 64-token prompt, 16 new tokens, 1 repeat")
    p.add_argument("--json", metavar="PATH", help="save the summary and every run as JSON")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument(
        "--prefill-runs", type=int, default=3, help="timed prefills per worker (the fastest counts)"
    )
    p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="JSON with chats' prompt_ids")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="before each worker, wait up to S seconds for the CPUs to be idle (on a shared machine)",
    )
    p.add_argument("--worker-timeout", type=float, default=300, help="seconds before a worker is given up")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.prefill_tokens, args.decode_tokens, args.prefill_runs = 1, 64, 16, 1
    if args.decode_tokens < 2 or args.prefill_tokens < 1 or args.decode_prompt_tokens < 1 or args.repeats < 1:
        p.error("need --decode-tokens >= 2, and positive --prefill-tokens, --decode-prompt-tokens, --repeats")
    if args.worker and not args.dtype:
        p.error("--worker needs --dtype")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        try:
            result = run_worker(args)
        except Exception as e:  # reported to the driver as JSON, with the traceback on stderr
            import traceback

            traceback.print_exc()
            print(RESULT_TAG + json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
            return 1
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
