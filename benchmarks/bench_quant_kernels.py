"""Weight-only quantized matmul kernels on this CPU: how many GB/s of weights each one streams.

    python benchmarks/bench_quant_kernels.py            # decode (T=1) and prefill (T=256), 7 shapes, best of 5
    python benchmarks/bench_quant_kernels.py --quick    # 4 shapes, best of 2 (~4 min)
    python benchmarks/bench_quant_kernels.py --tokens 1 16 512 --threads 1 --json out.json

For each weight shape (out x in) and token count T, every kernel computes y = x @ W^T for x (T, in):

- ``f32``, ``bf16``: ``F.linear`` on a float32 / bfloat16 weight (the unquantized baselines);
- ``int8/f32``, ``int8/bf16``: ``torch._weight_int8pack_mm`` (int8 weight, one scale per output channel) with
  float32 / bfloat16 activations;
- ``int4g32/f32``, ``int4g128/bf16`` ...: ``torch._weight_int4pack_mm_for_cpu`` (4-bit weight packed by
  ``torch._convert_weight_to_int4pack_for_cpu``, a scale and a zero point per group of 32 or 128 inputs);
- ``int8 tiles/f32``, ``int4g32 tiles/bf16`` ...: dequantize-then-matmul as chatlm does it: tiles of 2^19 weights
  dequantized to float32 / bfloat16 one after the other (in cache), each multiplied by ``F.linear`` (oneDNN);
- ``chatlm int8``, ``chatlm int4``: chatlm's ``QuantizedLinear`` as a float32 model calls it (activations
  converted to bfloat16 and back), with its own choice of path for T (kernel for few rows, tiles for many);
- ``compiled int8/f32`` (``--compile``, T=1 only): a ``torch.compile``'d ``(x * W.float()).sum(-1) * scale``,
  which inductor fuses into one loop over the int8 weight with float32 activations.

GB/s counts the bytes of the weight as stored (int8 / int4 values plus their scales and zero points) per second,
1 GB = 10^9 bytes: for a decode matvec that is the figure of merit, since one token streams every weight once.
Every kernel cycles through enough copies of its weight to fill 4x the L3 cache, so the weights come from DRAM
as in a real model rather than from cache. The figure is the best of ``--repeats`` runs (other processes only add
time). "err" is the largest deviation from the float32 matmul on the dequantized weight, relative to the largest
output: the kernel's own rounding, not the quantization error.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from chatlm.quantization import QuantizedLinear, quantize_int8

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576), (2048, 2048), (8192, 2048), (2048, 8192)]
QUICK_SHAPES = [(1536, 576), (576, 1536), (2048, 2048), (8192, 2048)]
STREAM_BYTES = 4 * 32 * 2**20  # cycle through this much weight data per kernel: 4x the L3 cache


def make_kernels(weight: torch.Tensor, compile_: bool) -> dict[str, tuple[int, object, object]]:
    """name -> (bytes of the stored weight, make_state(), fn(x, state)); x comes as float32 or bfloat16."""
    kernels: dict[str, tuple[int, object, object]] = {}
    n, k = weight.shape
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        w = weight.to(dtype)
        kernels[tag] = (w.numel() * w.element_size(), lambda w=w: w.clone(), lambda x, s: F.linear(x, s))

    def layer_kernels(bits: int, group: int, name: str) -> None:
        """The raw kernel, and chatlm's dequantized-tiles path, in float32 and bfloat16."""
        for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            layer = QuantizedLinear(torch.nn.Linear(k, n, bias=False), bits, group, dtype)
            layer.load_weight(weight)
            size = layer.qweight.numel() + layer.scales.numel() * layer.scales.element_size()
            make = lambda layer=layer: copy.deepcopy(layer)  # noqa: E731
            kernels[f"{name}/{tag}"] = (size, make, lambda x, m: m._kernel(x))
            kernels[f"{name} tiles/{tag}"] = (size, make, lambda x, m: m._tiled(x))

    layer_kernels(8, 32, "int8")
    for group in (32, 128):
        if k % group == 0:
            layer_kernels(4, group, f"int4g{group}")
    for bits in (8, 4):  # chatlm's layer as the model calls it: float32 in and out, its own choice of path
        layer = QuantizedLinear(torch.nn.Linear(k, n, bias=False), bits, 32, torch.bfloat16)
        layer.load_weight(weight)
        size = layer.qweight.numel() + layer.scales.numel() * layer.scales.element_size()
        kernels[f"chatlm int{bits}"] = (
            size,
            lambda layer=layer: copy.deepcopy(layer),
            lambda x, m: m(x.float()),
        )
    q8, s8 = quantize_int8(weight)
    if compile_:
        # a fused dequantize-multiply-sum that inductor turns into one loop: a matvec only (T=1)
        fn = torch.compile(lambda x, w, s: (x[:, None, :] * w.to(x.dtype)[None]).sum(-1) * s, dynamic=False)
        kernels["compiled int8/f32"] = (
            q8.numel() + 4 * n,
            lambda: (q8.clone(), s8.clone()),
            lambda x, s: fn(x, s[0], s[1]),
        )
    return kernels


def run_kernel(name, size, make_state, fn, tokens: int, k: int, repeats: int, reference):
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    if name.startswith("compiled") and tokens > 1:
        return float("nan"), float("nan")
    copies = max(1, min(256, -(-STREAM_BYTES // size)))
    states = [make_state() for _ in range(copies)]
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        out = fn(x, states[0]).float()
        err = ((out - reference(x.float())).abs().max() / reference(x.float()).abs().max()).item()
        start = time.perf_counter()
        fn(x, states[0])
        once = time.perf_counter() - start
        # every copy once (from DRAM), but no more than ~0.5 s a repeat for the slow scalar kernels
        calls = max(2, min(max(copies, 8), int(0.5 / max(once, 1e-9))))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(calls):
                fn(x, states[i % copies])
            best = min(best, (time.perf_counter() - start) / calls)
    return best, err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="four shapes, best of 2")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 256], help="rows of x (1: decode)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd int8 matvec")
    p.add_argument("--kernels", nargs="+", help="only these kernels (names as in the table)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}; "
        f"GB/s of stored weight bytes, best of {repeats}; err: max |y - y_ref| / max |y_ref|"
    )
    rows = []
    for n, k in shapes:
        weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        kernels = make_kernels(weight, args.compile)
        if args.kernels:
            kernels = {name: v for name, v in kernels.items() if name in args.kernels}
        for tokens in args.tokens:
            line = []
            for name, (size, make_state, fn) in kernels.items():
                stored = make_state()
                # The reference: float32 matmul on the weight this kernel's storage represents.
                w_ref = _dequantized(name, stored, weight)
                seconds, err = run_kernel(
                    name, size, make_state, fn, tokens, k, repeats, lambda x, w=w_ref: x @ w.T
                )
                row = {
                    "shape": f"{n}x{k}",
                    "tokens": tokens,
                    "kernel": name,
                    "us": seconds * 1e6,
                    "GB/s": size / seconds / 1e9,
                    "err": err,
                }
                rows.append(row)
                line.append(row)
            print(f"\n{n}x{k} (out x in), T={tokens}")
            print(f"  {'kernel':18s} {'MB':>7s} {'us':>9s} {'GB/s':>7s} {'err':>8s}")
            base = next(r["us"] for r in line if r["kernel"] == "f32")
            for r, (size, _, _) in zip(line, kernels.values()):
                print(
                    f"  {r['kernel']:18s} {size / 1e6:7.2f} {r['us']:9.1f} {r['GB/s']:7.1f} {r['err']:8.1e}"
                    f"   {base / r['us']:5.2f}x f32"
                )
            sys.stdout.flush()
    print("\nsummary: GB/s of stored weight bytes (higher is better; the measure for decode, T=1)")
    print(summary(rows, "GB/s"))
    print("\nsummary: speed relative to the float32 F.linear of the same shape and T (higher is better)")
    print(summary(rows, "x f32"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1)
    return 0


def summary(rows: list[dict], key: str) -> str:
    """Kernels down, (shape, T) across, ``key`` (GB/s, or x f32: speed relative to f32) in the cells."""
    columns = list(dict.fromkeys((r["shape"], r["tokens"]) for r in rows))
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    base = {(r["shape"], r["tokens"]): r["us"] for r in rows if r["kernel"] == "f32"}
    cell = {
        (r["kernel"], r["shape"], r["tokens"]): r["GB/s"]
        if key == "GB/s"
        else base[r["shape"], r["tokens"]] / r["us"]
        for r in rows
    }
    heads = [f"{shape} T={t}" for shape, t in columns]
    lines = [f"{'kernel':18s} | " + " | ".join(f"{h:>15s}" for h in heads)]
    lines.append("-" * len(lines[0]))
    for kernel in kernels:
        values = [cell.get((kernel, shape, t), float("nan")) for shape, t in columns]
        lines.append(
            f"{kernel:18s} | " + " | ".join("-".rjust(15) if v != v else f"{v:15.2f}" for v in values)
        )
    return "\n".join(lines)


def _dequantized(name: str, state, weight: torch.Tensor) -> torch.Tensor:
    """The weight a kernel's storage represents (the reference is a float32 matmul on it)."""
    if name in ("f32", "bf16"):
        return state.float()
    if name.startswith("compiled"):
        return state[0].float() * state[1][:, None]
    return state.dequantize()


if __name__ == "__main__":
    sys.exit(main())
