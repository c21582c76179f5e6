"""Tensor parallelism on this machine: per-rank memory and decode speed at 1 and 2 ranks (torchrun, gloo on CPU).

    python benchmarks/bench_tp.py                  # a random ~150M-parameter llama, float32 (~1 min)
    python benchmarks/bench_tp.py --layers 16 --hidden 2048

The script writes a random-weight llama checkpoint (safetensors) to a temporary directory, then starts torchrun
with N = 1 and N = 2 ranks. Each rank loads it with ``tp_plan="auto"`` (N = 1 loads it plainly), then reports its
parameter bytes, its peak resident memory, and the decode speed of a greedy generation (1 / the median time
between streamed tokens, after a 128-token prompt). The machine's cores are shared out: each rank gets
``--threads`` / N torch threads. On a 2-core CPU no speed-up is expected; the point is correctness and memory.
Anonymous RSS is the memory the rank owns at the end; peak RSS also counts the checkpoint's pages that the memory
map brought in while loading (file-backed and shared: a rank reading every other column of a weight touches all
of its pages).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

RANK = textwrap.dedent(
    """
    import json, os, resource, statistics, sys, time
    import torch
    from chatlm import AutoModelForCausalLM
    from chatlm.bench import TokenArrivals

    path, out, threads, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto" if world > 1 else None)
    load = time.perf_counter() - started
    prompt = torch.randint(3, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4)  # warm-up
    steps = []
    for _ in range(3):
        arrivals = TokenArrivals()
        out_ids = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, streamer=arrivals)
        steps += [b - a for a, b in zip(arrivals.times[1:], arrivals.times[2:])]
    with torch.no_grad():
        logits = model(prompt[:, :16]).logits[0, -1]
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    result = dict(
        rss_anon=int(status.get("RssAnon", "0 kB").split()[0]) * 1024,
        parameters=sum(p.numel() * p.element_size() for p in model.parameters()),
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        load_s=load,
        decode_tps=1 / statistics.median(steps),
        tokens=out_ids[0, prompt.shape[1]:].tolist(),
        logits=logits.tolist(),
    )
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(result, f)
    """
)


def write_model(directory: Path, args) -> None:
    import torch
    from safetensors.torch import save_file

    h, layers, inter, heads, kv, vocab = (
        args.hidden,
        args.layers,
        args.intermediate,
        args.heads,
        args.kv_heads,
        8192,
    )
    d = h // heads
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g) * 0.02}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (heads * d, h),
            "self_attn.k_proj": (kv * d, h),
            "self_attn.v_proj": (kv * d, h),
            "self_attn.o_proj": (h, heads * d),
            "mlp.gate_proj": (inter, h),
            "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter),
        }
        for name, shape in shapes.items():
            tensors[f"{p}{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
        tensors[f"{p}input_layernorm.weight"] = torch.ones(h)
        tensors[f"{p}post_attention_layernorm.weight"] = torch.ones(h)
    tensors["model.norm.weight"] = torch.ones(h)
    tensors["lm_head.weight"] = torch.randn(vocab, h, generator=g) * 0.02
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))


def run(directory: Path, ranks: int, threads: int, tokens: int) -> list[dict]:
    out = directory / f"out{ranks}"
    out.mkdir()
    script = directory / "rank.py"
    script.write_text(RANK)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command += [str(script), str(directory), str(out), str(max(1, threads // ranks)), str(tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // ranks))}
    subprocess.run(command, check=True, env=env)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads shared out among the ranks")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per timed generation")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_model(directory, args)
        results = {n: run(directory, n, args.threads, args.tokens) for n in (1, 2)}
    import torch

    single = results[1][0]
    print(
        f"\nrandom llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} KV), MLP "
        f"{args.intermediate}, float32; {args.threads} threads in all; torch {torch.__version__}\n"
    )
    header = (
        "ranks | rank | parameters | of N=1 | anonymous RSS | peak RSS | load s | decode tok/s | greedy = N=1 | "
        "max |logit diff|"
    )
    print(header + "\n" + "-" * len(header))
    for n, ranks in results.items():
        for r, res in enumerate(ranks):
            diff = max(abs(a - b) for a, b in zip(res["logits"], single["logits"]))
            print(
                f"{n:5d} | {r:4d} | {res['parameters'] / 2**20:7.1f} MiB | {res['parameters'] / single['parameters']:6.2f} | "
                f"{res['rss_anon'] / 2**20:9.0f} MiB | {res['peak_rss'] / 2**20:5.0f} MiB | {res['load_s']:6.2f} | {res['decode_tps']:12.1f} | "
                f"{str(res['tokens'] == single['tokens']):12s} | {diff:.2e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
