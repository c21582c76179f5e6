"""chatlm's GGUF dequantizers against the gguf package's numpy reference: throughput per type, side by side.

    python benchmarks/bench_dequant.py            # every type chatlm dequantizes itself, 16M values each
    python benchmarks/bench_dequant.py --quick    # 1M values each, 2 repeats (a few seconds)
    python benchmarks/bench_dequant.py --types Q4_K IQ4_XS --values 4194304 --json out.json

For each type, both dequantize the same bytes (random blocks with finite f16 scales) into float32, laid out as
rows of 4096 values (as a weight matrix is). Each figure is the best of ``--repeats`` runs. MB/s counts the
*stored* bytes read per second (1 MB = 10^6 bytes); "values/s" the float32 values produced. The outputs are also
compared bit for bit, so a fast but wrong dequantizer shows up here too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib.metadata import version

import gguf
import numpy as np
import torch

from chatlm.loading.gguf_dequant import FAST_TYPES, dequantize

Q = gguf.GGMLQuantizationType
ROW_VALUES = 4096
# Byte offsets of the f16 scales in each block type: set to finite values so the work is the usual work.
F16_SCALES = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
    Q.IQ4_NL: [0],
    Q.IQ4_XS: [0],
}


def sample(qtype: Q, n_values: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, row bytes) uint8 of ``qtype`` holding ``n_values`` values."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_values // block_size
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal(n_values, dtype=np.float32)
        raw = {Q.F32: values, Q.F16: values.astype(np.float16)}.get(qtype)
        raw = (
            raw.view(np.uint8)
            if raw is not None
            else (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        )
    else:
        raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
        for offset in F16_SCALES[qtype]:
            scales = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
            raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return np.ascontiguousarray(raw).reshape(n_values // ROW_VALUES, -1)


def reference(rows: np.ndarray, qtype: Q) -> np.ndarray:
    typed = {Q.F32: np.float32, Q.F16: np.float16}.get(qtype)
    return np.asarray(gguf.quants.dequantize(rows.view(typed) if typed else rows, qtype), dtype=np.float32)


def best_of(repeats: int, fn, *args) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M values per type, 2 repeats")
    parser.add_argument("--values", type=int, default=None, help="values per type (a multiple of 4096)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--types", nargs="*", default=None, help="type names (default: every type we dequantize)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    n_values = args.values or (1 << 20 if args.quick else 1 << 24)
    repeats = args.repeats or (2 if args.quick else 3)
    if n_values % ROW_VALUES:
        parser.error(f"--values must be a multiple of {ROW_VALUES}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        types = [Q[name] for name in args.types] if args.types else sorted(FAST_TYPES, key=int)
    except KeyError as e:
        parser.error(f"unknown type {e.args[0]}")

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), gguf {version('gguf')}, numpy {np.__version__}; "
        f"{n_values:,} values per type, best of {repeats}",
        file=sys.stderr,
    )
    rng = np.random.default_rng(0)
    results = []
    header = f"{'type':7} | {'chatlm MB/s':>11} | {'gguf MB/s':>9} | {'ratio':>7} | {'chatlm Mvalues/s':>16} | exact"
    print(header)
    print("-" * len(header))
    for qtype in types:
        rows = sample(qtype, n_values, rng)
        shape = (rows.shape[0], ROW_VALUES)
        ours_s, ours = best_of(repeats, dequantize, rows, qtype, shape)
        ref_s, ref = best_of(repeats, reference, rows, qtype)
        got, expected = ours.numpy().reshape(-1), ref.reshape(-1)
        exact = bool(np.array_equal(got.view(np.uint32), expected.view(np.uint32)))
        mb = rows.nbytes / 1e6
        # gguf hands F32 back as a view of its input: nothing to time, so no ratio.
        ref_mb_s = None if np.shares_memory(ref, rows) else mb / ref_s
        row = {
            "type": qtype.name,
            "stored_bytes": rows.nbytes,
            "values": n_values,
            "chatlm_mb_s": mb / ours_s,
            "gguf_mb_s": ref_mb_s,
            "ratio": None if ref_mb_s is None else ref_s / ours_s,
            "chatlm_mvalues_s": n_values / 1e6 / ours_s,
            "exact": exact,
        }
        results.append(row)
        ref_col = "view" if ref_mb_s is None else f"{ref_mb_s:.0f}"
        ratio_col = "-" if ref_mb_s is None else f"{row['ratio']:.1f}x"
        print(
            f"{qtype.name:7} | {row['chatlm_mb_s']:11.0f} | {ref_col:>9} | {ratio_col:>7} | "
            f"{row['chatlm_mvalues_s']:16.0f} | {'yes' if exact else 'NO'}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"values": n_values, "repeats": repeats, "threads": torch.get_num_threads(), "rows": results},
                f,
                indent=1,
            )
    return 0 if all(r["exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
