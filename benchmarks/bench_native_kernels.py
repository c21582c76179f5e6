"""chatlm's native CPU kernels (``chatlm.kernels``) against the torch code they replace, at decoding shapes.

    python benchmarks/bench_native_kernels.py             # bundled-model shapes, 2 threads
    python benchmarks/bench_native_kernels.py --context 2000 --threads 1

- decode attention: one new token over ``--context`` cached keys, as one call that also applies rope and writes
  the cache (``kernels.decode_attention``), against ``apply_rope`` + the cache write + SDPA;
- int8 matrix-vector products (``kernels.int8_linear``, float32 activations) against ``torch._weight_int8pack_mm``
  (bfloat16 activations), over enough distinct weights that they stream from memory, not from cache;
- RMSNorm (``kernels.rms_norm``) against the seven torch ops of transformers' formula.

Each figure is the median of ``--repeats`` timings of ``--calls`` calls; the ratio is torch's time / chatlm's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from chatlm import kernels
from chatlm.kernels import native
from chatlm.models.layers import apply_rope, rope_cos_sin
from chatlm.quantization import quantize_int8


def timed(fn, calls: int, repeats: int) -> float:
    """Median seconds per call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def attention_case(dtype, context: int, heads: int, kv_heads: int, d: int, calls: int, repeats: int):
    g = torch.Generator().manual_seed(0)
    capacity = context + 16
    k_cache = torch.randn(1, kv_heads, capacity, d, generator=g).to(dtype)
    v_cache = torch.randn(1, kv_heads, capacity, d, generator=g).to(dtype)
    q = torch.randn(1, heads, 1, d, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, 1, d, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, 1, d, generator=g).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = rope_cos_sin(inv_freq, torch.tensor([[context - 1]]), dtype)
    offset = context - 1

    def ours():
        kernels.decode_attention(q, k, v, cos, sin, k_cache, v_cache, offset, None)

    def theirs():
        rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache[:, :, offset : offset + 1] = rk
        v_cache[:, :, offset : offset + 1] = v
        F.scaled_dot_product_attention(
            rq, k_cache[:, :, :context], v_cache[:, :, :context], enable_gqa=heads != kv_heads
        )

    return timed(ours, calls, repeats), timed(theirs, calls, repeats)


def int8_case(n: int, k: int, megabytes: int, calls: int, repeats: int):
    copies = max(1, megabytes * 2**20 // (n * k))
    g = torch.Generator().manual_seed(1)
    weights = [quantize_int8(torch.randn(n, k, generator=g)) for _ in range(copies)]
    x = torch.randn(1, k, generator=g)
    xb, ones = x.bfloat16(), torch.ones(n, dtype=torch.bfloat16)

    def ours():
        for q, s in weights:
            kernels.int8_linear(x, q, s)

    def theirs():
        for q, s in weights:
            torch._weight_int8pack_mm(xb, q, ones) * s

    return timed(ours, calls, repeats) / copies, timed(theirs, calls, repeats) / copies


def norm_case(dtype, dim: int, calls: int, repeats: int):
    x = torch.randn(1, 1, dim).to(dtype)
    w = torch.ones(dim, dtype=dtype)

    def theirs():
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return w * h.to(dtype)

    return timed(lambda: kernels.rms_norm(x, w, 1e-5), calls, repeats), timed(theirs, calls, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=500)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(native.status())
    if native.library() is None:
        raise SystemExit("the native kernels are not available here")
    rows = []
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).replace("torch.", "")
            ours, theirs = attention_case(dtype, args.context, 9, 3, 64, args.calls, args.repeats)
            rows.append((f"decode attention {name}, 9/3 heads x 64, {args.context} keys", ours, theirs))
        for n, k in ((1536, 576), (576, 1536), (49152, 576)):
            ours, theirs = int8_case(n, k, 256, max(1, args.calls // 20), args.repeats)
            rows.append((f"int8 matvec {n}x{k} (streamed)", ours, theirs))
        for dtype in (torch.float32, torch.bfloat16):
            ours, theirs = norm_case(dtype, 576, args.calls * 10, args.repeats)
            rows.append((f"rms_norm {str(dtype).replace('torch.', '')} 576", ours, theirs))
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}} | chatlm us | torch us | torch/chatlm")
    for label, ours, theirs in rows:
        print(f"{label:<{width}} | {ours * 1e6:9.1f} | {theirs * 1e6:8.1f} | {theirs / ours:11.2f}x")


if __name__ == "__main__":
    main()
