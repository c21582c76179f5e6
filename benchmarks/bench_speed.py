"""chatlm against its peers on the bundled model, side by side in one run: load time, prefill and decode speed, peak
memory and the share of the memory bandwidth that decoding uses; and a synthetic 1B-parameter model.

    python benchmarks/bench_speed.py                  # SmolLM2-135M Q4_1, 2 threads, 500-token prompt, 128 new tokens
    python benchmarks/bench_speed.py --quick          # 100-token prompt, 16 new tokens, 1 repeat
    python benchmarks/bench_speed.py --quality        # also the perplexity of each on chatlm's shipped text
    python benchmarks/bench_speed.py --json out.json  # also save every figure
    python benchmarks/bench_speed.py --synthetic-1b   # a random-weight 1B llama: decode speed and bandwidth use

The peers, each in a worker subprocess of its own (``--worker ...``, one JSON line on stdout), so that its peak RSS
is its own and no thread pool or allocator state carries over:

- chatlm: float32, bfloat16, and int8 / int4 weight quantization (in ``--quant-dtypes``) when chatlm has it (a
  worker whose ``from_pretrained`` refuses the quantization config is reported as skipped, with the reason). The
  worker is ``chatlm.bench.run_bench``, the code behind ``chatlm bench``.
- transformers (5.24): float32 and bfloat16, from the same GGUF (``from_pretrained(dir, gguf_file=...)``, which
  dequantizes it to plain float weights, as chatlm does), timed by the same ``chatlm.bench.time_generate``.
- llama.cpp through ``llama_cpp`` (llama-cpp-python), on the GGUF as it is (Q4_1 / Q8_0 blocks), only if that
  package is importable: it builds llama.cpp from source (15-20 minutes on 2 cores), so it is not a dependency of
  chatlm or of its tests. Without it the row is skipped with a note.

Every engine gets the same prompt token ids (chatlm's shipped text, tokenized by the bundled model's tokenizer,
cycled to ``--prompt-tokens``), decodes greedily exactly ``--new-tokens`` tokens, after one warm-up run, and reports
the best of ``--repeats`` runs: time to first token, prefill tokens/s (prompt / time to first token) and decode
tokens/s ((N - 1) / (last token's arrival - first token's)). Peak RSS is the high-water mark from before loading to
the end of the runs (reset first, on Linux); "+" is its increase over the worker's RSS before loading.

``--synthetic-1b`` writes a random-weight llama with 1.04B parameters (Llama 3.2 1B's shape with a 32K vocabulary,
tied embeddings) as bfloat16 safetensors into a temporary directory, then loads it with chatlm in float32,
bfloat16 and the quantizations chatlm has, and measures decode speed and the share of the measured bandwidth.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402  (its CPU-load helpers)

RESULT_TAG = "BENCH_SPEED_RESULT "
EOS_ID = 2  # SmolLM2
LLAMA_CPP_NOTE = (
    "llama.cpp: skipped, llama_cpp (llama-cpp-python) is not installed; `pip install llama-cpp-python` builds "
    "llama.cpp from source (15-20 minutes on 2 cores)"
)
# Llama 3.2 1B's shape with a 32K vocabulary: 1.04B parameters, tied embeddings.
SYNTHETIC_1B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    torch_dtype="bfloat16",
)


# --- workers ------------------------------------------------------------------------------------------------------


def _record(load_s, ttft, prefill_tps, decode_tps, rss_mib, weights, bandwidth, **extra) -> dict:
    """One engine's figures, in the same keys for every engine; ``rss_mib`` is (baseline, after load, peak)."""
    baseline, after_load, peak = rss_mib
    return {
        "load_s": load_s,
        "ttft_s": ttft,
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode_tps,
        "rss_baseline_mib": baseline,
        "rss_after_load_mib": after_load,
        "peak_rss_mib": peak,
        "peak_rss_increase_mib": peak - baseline,
        "weights_bytes_per_token": weights,
        "bandwidth_bytes_per_s": bandwidth,
        "decode_bytes_per_s": weights * decode_tps,
        "bandwidth_fraction": weights * decode_tps / bandwidth,
        "quality": None,
        **extra,
    }


def _peer_start(args) -> tuple[float, list[int], Path, float, float]:
    """What a peer's worker measures before it loads the bundled GGUF: the bandwidth, the prompt ids, the file, the
    RSS baseline (high-water mark reset) and the load's start time."""
    from chatlm.bench import current_rss_mib, reset_peak_rss
    from chatlm.info import memory_bandwidth
    from chatlm.loading.resolve import bundled_model_path

    bandwidth = memory_bandwidth("cpu")
    prompt = _common_prompt(args.prompt_tokens)
    path = bundled_model_path()
    reset_peak_rss()
    return bandwidth, prompt, path, current_rss_mib(), time.perf_counter()


def _common_prompt(length: int) -> list[int]:
    from chatlm.bench import prompt_from_text
    from chatlm.tokenizer import AutoTokenizer

    return prompt_from_text(AutoTokenizer.from_pretrained(None), length)


def worker_chatlm(args) -> dict:
    from chatlm.bench import run_bench

    model = args.model or None
    try:
        result = run_bench(
            model,
            dtype=args.dtype,
            quantization=args.quantization,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            quality=args.quality,
            threads=args.threads,
            device="cpu",
        )
    except ValueError as e:
        if args.quantization != "none" and "not supported" in str(e):
            return {"skipped": str(e)}
        raise
    return result.to_dict()


def worker_transformers(args) -> dict:
    import torch
    import transformers

    from chatlm.bench import (
        current_rss_mib,
        decode_weight_bytes,
        peak_rss_mib,
        time_generate,
    )

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    bandwidth, prompt, path, baseline, start = _peer_start(args)
    dtype = getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype
    )
    model.eval()
    load_s = time.perf_counter() - start
    after_load = current_rss_mib()
    mask = {"attention_mask": torch.ones(1, len(prompt), dtype=torch.long), "pad_token_id": EOS_ID}
    time_generate(model, prompt, 2, **mask)  # warm-up
    runs = [time_generate(model, prompt, args.new_tokens, **mask) for _ in range(args.repeats)]
    peak = peak_rss_mib()
    weights = decode_weight_bytes(model)
    decode = max(r.decode_tps for r in runs)
    result = _record(
        load_s,
        min(r.ttft_s for r in runs),
        max(r.prefill_tps for r in runs),
        decode,
        (baseline, after_load, peak),
        weights,
        bandwidth,
        threads=torch.get_num_threads(),
    )
    if args.quality:
        from chatlm.quality import DEFAULT_TEXT, perplexity
        from chatlm.tokenizer import AutoTokenizer

        ppl = perplexity(model, AutoTokenizer.from_pretrained(None))
        result["quality"] = {"text": f"chatlm/data/{DEFAULT_TEXT}", **ppl.to_dict()}
    return result


def _gguf_bytes_per_token(path: Path) -> int:
    """Stored bytes one llama.cpp decode step reads: every tensor, the token embedding one row (unless it is also
    the output matrix, with no output.weight)."""
    from chatlm.loading.gguf_model import open_gguf

    tensors = {t.name: t for t in open_gguf(path).tensors}
    total = sum(t.n_bytes for t in tensors.values())
    embedding = tensors.get("token_embd.weight")
    if embedding is not None and "output.weight" in tensors:
        rows = int(embedding.shape[0])  # row-major: (vocabulary, hidden)
        total -= embedding.n_bytes - embedding.n_bytes // rows
    return total


def worker_llama_cpp(args) -> dict:
    """llama.cpp via llama-cpp-python (only where it is installed; it is no dependency of chatlm)."""
    import llama_cpp

    from chatlm.bench import current_rss_mib, peak_rss_mib

    bandwidth, prompt, path, baseline, start = _peer_start(args)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=args.prompt_tokens + args.new_tokens + 16,
        n_batch=max(512, args.prompt_tokens),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    after_load = current_rss_mib()

    def run(new_tokens: int) -> tuple[float, float]:
        llm.reset()  # no reuse of the previous run's cached prompt
        times = []
        begin = time.perf_counter()
        greedy = dict(top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        for _token in llm.generate(prompt, **greedy):  # does not stop at end-of-sequence: the count does
            times.append(time.perf_counter())
            if len(times) == new_tokens:
                break
        return times[0] - begin, (new_tokens - 1) / (times[-1] - times[0])

    run(2)  # warm-up
    runs = [run(args.new_tokens) for _ in range(args.repeats)]
    peak = peak_rss_mib()
    weights = _gguf_bytes_per_token(path)
    ttft = min(r[0] for r in runs)
    decode = max(r[1] for r in runs)
    return _record(
        load_s,
        ttft,
        len(prompt) / ttft,
        decode,
        (baseline, after_load, peak),
        weights,
        bandwidth,
        threads=args.threads,
        version=getattr(llama_cpp, "__version__", "?"),
    )


WORKERS = {"chatlm": worker_chatlm, "transformers": worker_transformers, "llama.cpp": worker_llama_cpp}


# --- the synthetic 1B model ---------------------------------------------------------------------------------------
def write_synthetic(directory: Path, config: dict, shard_bytes: int = 1 << 30) -> int:
    """A random-weight checkpoint of ``config`` in bfloat16 safetensors shards (norms at 1, the rest N(0, 0.02)),
    built from chatlm's module tree on the meta device, one tensor at a time; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    from chatlm.models import model_class
    from chatlm.models.config import ModelConfig

    model_config = ModelConfig.from_dict(config)
    with torch.device("meta"):
        model = model_class(model_config)(model_config)
    model.tie_weights()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}  # the tied lm_head appears once
    generator = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shards: list[dict] = [{}]
    size = 0
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        if len(shape) == 1:
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        if size and size + tensor.numel() * 2 > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.numel() * 2
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()
    index = {
        "metadata": {"total_size": sum(2 * _numel(s) for s in shapes.values())},
        "weight_map": weight_map,
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(_numel(s) for s in shapes.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- the driver ---------------------------------------------------------------------------------------------------
def spawn(engine: str, dtype: str, quantization: str, args, model: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--dtype", dtype]
    cmd += ["--quantization", quantization, "--threads", str(args.threads)]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    cmd += ["--repeats", str(args.repeats)] + (["--quality"] if args.quality else [])
    cmd += ["--model", model] if model else []
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false"
    )
    if args.wait_idle:
        bench_core.wait_for_idle(args.wait_idle)
    busy0, own0, wall0 = bench_core._busy_seconds(), bench_core._children_cpu_seconds(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"took more than {args.worker_timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            foreign = bench_core._busy_seconds() - busy0 - (bench_core._children_cpu_seconds() - own0)
            capacity = (time.perf_counter() - wall0) * (os.cpu_count() or 1)
            result["foreign_load"] = max(0.0, foreign / capacity) if capacity > 0 else float("nan")
            result["wall_s"] = time.perf_counter() - wall0
            return result
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"error": f"exit {proc.returncode}: {tail}"}


def label(engine: str, dtype: str, quantization: str) -> str:
    if engine == "llama.cpp":
        return "llama.cpp Q4_1 GGUF"
    return f"{engine} {dtype}" + ("" if quantization == "none" else f" {quantization}")


def _f(value, digits: int = 3) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("-+-".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
    return "\n".join(lines)


def results_table(results: dict[str, dict], quality: bool) -> str:
    header = [
        "engine",
        "load s",
        "TTFT s",
        "prefill tok/s",
        "decode tok/s",
        "peak RSS MiB",
        "weights/token MB",
    ]
    header += ["bandwidth used", "foreign load (workers)"] + (["perplexity"] if quality else [])
    rows = []
    for name, r in results.items():
        if "skipped" in r or "error" in r:
            continue
        row = [
            name,
            _f(r["load_s"]),
            _f(r["ttft_s"]),
            _f(r["prefill_tokens_per_s"]),
            _f(r["decode_tokens_per_s"]),
            f"{r['peak_rss_mib']:,.0f} (+{r['peak_rss_increase_mib']:,.0f})",
            _f(r["weights_bytes_per_token"] / 1e6),
            f"{r['bandwidth_fraction']:.0%}",
            _loads(r),
        ]
        if quality:
            row.append(f"{r['quality']['perplexity']:.3f}" if r.get("quality") else "-")
        rows.append(row)
    return _table(header, rows)


def _loads(r: dict) -> str:
    """The foreign load of each worker behind a row."""
    return ", ".join(f"{x:.0%}" for x in r.get("foreign_loads", [r.get("foreign_load", float("nan"))]))


RATIO_METRICS = (  # name, key, better
    ("load", "load_s", "lower"),
    ("prefill", "prefill_tokens_per_s", "higher"),
    ("decode", "decode_tokens_per_s", "higher"),
    ("peak RSS", "peak_rss_mib", "lower"),
)


def ratio_table(results: dict[str, dict]) -> str:
    ok = {k: r for k, r in results.items() if "skipped" not in r and "error" not in r}
    ours = [k for k in ok if k.startswith("chatlm")]
    peers = [k for k in ok if not k.startswith("chatlm")]
    rows = []
    for mine in ours:
        for peer in peers:
            rows.append(
                [f"{mine} / {peer}"]
                + [
                    f"{ok[mine][key] / ok[peer][key]:.2f}x" if ok[peer][key] else "-"
                    for _, key, _ in RATIO_METRICS
                ]
            )
    header = ["chatlm / peer"] + [f"{name} ({better} is better)" for name, _, better in RATIO_METRICS]
    return _table(header, rows) if rows else "(no peer ran: no ratios)"


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def run_peers(args) -> dict:
    configs = [("chatlm", "float32", "none"), ("transformers", "float32", "none")]
    configs += [("chatlm", "bfloat16", "none"), ("transformers", "bfloat16", "none")]
    configs += [("chatlm", d, q) for q in ("int8", "int4") for d in args.quant_dtypes]
    notes = []
    if importlib.util.find_spec("llama_cpp") is not None:
        configs.append(("llama.cpp", "float32", "none"))
    else:
        notes.append(LLAMA_CPP_NOTE)
    if importlib.util.find_spec("transformers") is None:
        configs = [c for c in configs if c[0] != "transformers"]
        notes.append("transformers: skipped, not installed (pip install -e '.[test]')")
    configs = [c for c in configs if c[0] in args.engines and (c[0] == "llama.cpp" or c[1] in args.dtypes)]
    results: dict[str, dict] = {}
    for engine, dtype, quantization in configs:
        name = label(engine, dtype, quantization)
        results[name] = run_config(name, engine, dtype, quantization, args, notes)
    return {"results": results, "notes": notes}


def run_config(
    name: str, engine: str, dtype: str, quantization: str, args, notes: list[str], model=None
) -> dict:
    """``--rounds`` workers, plus up to ``--retries`` more while the last one was disturbed (other processes took
    more than 15% of the CPUs); each figure is the best over them."""
    print(f"running {name} ...", file=sys.stderr, flush=True)
    best: dict | None = None
    runs = 0
    while True:
        r = spawn(engine, dtype, quantization, args, model=model)
        runs += 1
        if "skipped" in r or "error" in r:
            best = r if best is None else best
            break
        best = r if best is None else _best_of(best, r)
        print(
            f"  decode {r['decode_tokens_per_s']:.1f} tok/s, prefill {r['prefill_tokens_per_s']:.0f} tok/s, "
            f"load {r['load_s']:.2f} s, foreign load {r['foreign_load']:.0%}",
            file=sys.stderr,
            flush=True,
        )
        noisy = r["foreign_load"] > bench_core.NOISY_LOAD
        if runs >= args.rounds and not (noisy and runs < args.rounds + args.retries):
            break
    if "skipped" in best:
        notes.append(f"{name}: skipped, {best['skipped']}")
    elif "error" in best:
        notes.append(f"{name}: failed, {best['error']}")
    return best


def _best_of(a: dict, b: dict) -> dict:
    """The best of two workers, figure by figure (other processes only ever add time and memory)."""
    out = dict(a)
    for key in ("load_s", "ttft_s", "peak_rss_mib", "rss_after_load_mib", "peak_rss_increase_mib"):
        out[key] = min(a[key], b[key])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "bandwidth_bytes_per_s"):
        out[key] = max(a[key], b[key])
    out["decode_bytes_per_s"] = out["weights_bytes_per_token"] * out["decode_tokens_per_s"]
    out["bandwidth_fraction"] = out["decode_bytes_per_s"] / out["bandwidth_bytes_per_s"]
    out["foreign_loads"] = a.get("foreign_loads", [a["foreign_load"]]) + [b["foreign_load"]]
    out["foreign_load"] = min(out["foreign_loads"])
    return out


def run_synthetic(args) -> dict:
    notes = []
    with tempfile.TemporaryDirectory(prefix="chatlm-synthetic-1b-", dir=args.synthetic_dir) as tmp:
        start = time.perf_counter()
        params = write_synthetic(Path(tmp), SYNTHETIC_1B)
        print(
            f"wrote a random {params / 1e9:.2f}B-parameter llama in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )
        configs = [("float32", "none"), ("bfloat16", "none")]
        configs += [(d, q) for q in ("int8", "int4") for d in args.quant_dtypes]
        configs = [c for c in configs if c[0] in args.dtypes]
        results = {}
        for dtype, quantization in configs:
            name = label("chatlm", dtype, quantization)
            results[name] = run_config(name, "chatlm", dtype, quantization, args, notes, model=tmp)
    return {"parameters": params, "results": results, "notes": notes}


def synthetic_table(results: dict[str, dict]) -> str:
    header = ["chatlm", "load s", "decode tok/s", "ms/token", "weights/token GB", "GB/s", "bandwidth used"]
    header += ["peak RSS MiB", "foreign load (workers)"]
    rows = []
    for name, r in results.items():
        if "skipped" in r or "error" in r:
            continue
        rows.append(
            [
                name,
                _f(r["load_s"]),
                _f(r["decode_tokens_per_s"]),
                _f(1000 / r["decode_tokens_per_s"]),
                _f(r["weights_bytes_per_token"] / 1e9),
                _f(r["decode_bytes_per_s"] / 1e9),
                f"{r['bandwidth_fraction']:.0%}",
                f"{r['peak_rss_mib']:,.0f} (+{r['peak_rss_increase_mib']:,.0f})",
                _loads(r),
            ]
        )
    return _table(header, rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100-token prompt, 16 new tokens, 1 repeat")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=500)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per worker; the best counts (default 3)"
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="workers per configuration; the best counts (default 1)"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="extra workers while the last was disturbed by other processes (default 2)",
    )
    p.add_argument("--quality", action="store_true", help="also each engine's perplexity on chatlm's text")
    p.add_argument(
        "--engines",
        nargs="+",
        default=list(WORKERS),
        choices=list(WORKERS),
        help="which engines to run (default: all that are installed)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="run only the rows in these compute dtypes (default both)",
    )
    p.add_argument(
        "--quant-dtypes",
        nargs="+",
        default=["bfloat16"],
        choices=["float32", "bfloat16"],
        help="compute dtypes of the int8 / int4 rows (default bfloat16)",
    )
    p.add_argument(
        "--synthetic-1b", action="store_true", help="the random-weight 1B llama instead of the peers"
    )
    p.add_argument(
        "--synthetic-dir", default=None, help="where to write the 1B checkpoint (default: the temp dir)"
    )
    p.add_argument(
        "--wait-idle", type=float, default=0, metavar="S", help="wait up to S s for idle CPUs first"
    )
    p.add_argument("--worker-timeout", type=float, default=600)
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--quantization", default="none", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 100, 16, 1
    if args.synthetic_1b and not args.worker:
        # a 1B model decodes a few tokens a second in float32: a short prompt and few tokens
        args.prompt_tokens = min(args.prompt_tokens, 32)
        args.new_tokens = min(args.new_tokens, 8 if args.quick else 16)
        args.repeats = min(args.repeats, 2)
        args.quality = False
    if (
        args.new_tokens < 2
        or args.prompt_tokens < 1
        or args.repeats < 1
        or args.rounds < 1
        or args.retries < 0
    ):
        p.error("need --new-tokens >= 2, positive --prompt-tokens, --repeats, --rounds and --retries >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        try:
            result = WORKERS[args.worker](args)
        except Exception as e:  # to the driver as JSON; the traceback on stderr
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    start = time.perf_counter()
    report = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}}
    if args.synthetic_1b:
        report["synthetic_1b"] = run_synthetic(args)
        section = report["synthetic_1b"]
        print(
            f"\nsynthetic llama, {section['parameters'] / 1e9:.2f}B parameters, {args.threads} threads, "
            f"{args.new_tokens} new tokens after a {args.prompt_tokens}-token prompt, best of {args.repeats}"
        )
        print(synthetic_table(section["results"]))
    else:
        report["peers"] = run_peers(args)
        section = report["peers"]
        print(
            f"\nbundled SmolLM2-135M-Instruct Q4_1 GGUF, {args.threads} threads, {args.prompt_tokens}-token prompt, "
            f"{args.new_tokens} new tokens, best of {args.repeats}"
        )
        print(results_table(section["results"], args.quality))
        print()
        print(ratio_table(section["results"]))
    for note in section["notes"]:
        print(f"note: {note}")
    report["wall_s"] = time.perf_counter() - start
    print(
        f"({report['wall_s']:.0f} s; load average at the start {report['machine']['loadavg_start'][0]:.2f})"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
