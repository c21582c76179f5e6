"""chatlm against llama.cpp on GGUF files of the sizes people run (1-8B, Q4_K_M and Q8_0), side by side.

For each file, on the same threads: llama.cpp's ``llama-bench`` (prefill of 512 tokens, ``pp512``; decode of 128
tokens after a 512-token prompt, ``-n 128 -d 512``) and ``chatlm bench`` in a fresh process with the file kept as
stored (the CLI's default for a GGUF): prefill of a 512-token prompt, greedy decode of 128 tokens after it, load
time (warm: the file in the page cache, as on a second start), and peak RSS over the file's size. Then, for the
largest file, how long ``from_pretrained`` takes to refuse a float32 load that does not fit.

Files: `real_shape_gguf.py` writes random-weight GGUFs in the exact shapes of Llama-3.2-1B, Qwen3-1.7B,
Gemma-3-1B and Llama-3-8B (random weights decode at the speed real ones do). llama.cpp's tools:
``../shared/tools/build-llama-bench.sh``.

    .venv/bin/python benchmarks/bench_gguf_sizes.py [--dir ~/.cache/chatlm-bench-gguf] [--llama-bin DIR]
        [--files llama-3.2-1b-Q4_K_M,...] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = Path.home() / ".cache" / "chatlm-bench-gguf"
DEFAULT_BIN = Path(os.environ.get("LLAMACPP_BUILD", Path.home() / ".cache" / "llamacpp-build")) / "bin"


def llama_bench(binary: Path, path: Path, threads: int, repeats: int) -> dict[str, float]:
    """llama.cpp's pp512 and tg128 at depth 512 (tokens/s, the mean of its repeats)."""
    result = {}
    for key, args in (
        ("prefill", ["-p", "512", "-n", "0"]),
        ("decode", ["-p", "0", "-n", "128", "-d", "512"]),
    ):
        out = subprocess.run(
            [
                str(binary / "llama-bench"),
                "-m",
                str(path),
                "-t",
                str(threads),
                "-r",
                str(repeats),
                "-o",
                "json",
            ]
            + args,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result[key] = json.loads(out)[0]["avg_ts"]
    return result


def chatlm_bench(path: Path, threads: int, repeats: int) -> dict[str, float]:
    """``chatlm bench`` in a fresh process: the file as stored, 512 prompt tokens, 128 new ones."""
    command = [sys.executable, "-m", "chatlm", "bench", str(path), "--quantization", "gguf"]
    command += ["--prompt-tokens", "512", "--new-tokens", "128", "--repeats", str(repeats)]
    command += ["--threads", str(threads), "--json"]
    data = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return {
        "prefill": data["prefill_tokens_per_s"],
        "decode": data["decode_tokens_per_s"],
        "load_s": data["load_s"],
        "peak_rss_mib": data["peak_rss_mib"],
    }


def refusal_seconds(path: Path) -> tuple[float, str]:
    """How long from_pretrained takes to refuse a float32 load that does not fit, and its message."""
    code = (
        "import time, sys\n"
        "from chatlm import AutoModelForCausalLM\n"
        "t = time.perf_counter()\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        "except MemoryError as e:\n"
        "    print(time.perf_counter() - t); print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seconds, _, message = out.partition("\n")
    return float(seconds), message.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--llama-bin", type=Path, default=DEFAULT_BIN)
    parser.add_argument(
        "--files", default="", help="comma-separated names without .gguf (default: all there)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = args.files.split(",") if args.files else sorted(p.stem for p in args.dir.glob("*.gguf"))
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    header = f"{'file':<26}{'decode tok/s (chatlm / llama.cpp)':>36}{'prefill 512 tok/s':>30}"
    print(header + f"{'load s':>9}{'peak RSS / file':>18}", flush=True)
    for name in names:
        path = args.dir / f"{name}.gguf"
        theirs = llama_bench(args.llama_bin, path, args.threads, args.repeats)
        ours = chatlm_bench(path, args.threads, args.repeats)
        size_mib = path.stat().st_size / 2**20
        decode = f"{ours['decode']:.1f} / {theirs['decode']:.1f} = {ours['decode'] / theirs['decode']:.2f}x"
        prefill = (
            f"{ours['prefill']:.0f} / {theirs['prefill']:.0f} = {ours['prefill'] / theirs['prefill']:.2f}x"
        )
        rss = f"{ours['peak_rss_mib']:.0f} / {size_mib:.0f} MiB"
        print(f"{name:<26}{decode:>36}{prefill:>30}{ours['load_s']:>9.2f}{rss:>18}", flush=True)
    largest = max((args.dir / f"{n}.gguf" for n in names), key=lambda p: p.stat().st_size)
    start = time.perf_counter()
    seconds, message = refusal_seconds(largest)
    print(
        f"float32 refusal of {largest.name}: {seconds:.2f} s in from_pretrained "
        f"({time.perf_counter() - start:.1f} s with the interpreter's start)\n  {message}"
    )


if __name__ == "__main__":
    main()
