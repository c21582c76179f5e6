"""``chatlm bench``: how fast a model loads, reads a prompt and decodes here, what memory it takes, and how much of
this machine's memory bandwidth decoding uses (optionally its perplexity on a shipped English text too).

What ``run_bench`` measures, in this process:

- load: wall time of ``AutoModelForCausalLM.from_pretrained`` (weights read, dequantized or quantized, placed).
- prompt: a ``prompt_tokens`` long prompt (the shipped text's tokens, cycled; seeded random ids when the model has
  no tokenizer) goes through ``generate(min_new_tokens=max_new_tokens=new_tokens)``, greedy, with a streamer that
  notes when each token arrives. Time to first token is from the call to the first token (prefill, one lm_head
  row, sampling); prefill tokens/s is ``prompt_tokens`` / that time.
- decode: ``(new_tokens - 1)`` / (arrival of the last token - arrival of the first): the prefill is left out.
- each figure is the best of ``repeats`` runs (other processes only ever add time), after one warm-up run; the
  median and the spread ((slowest - fastest) / median) of decode are reported beside it.
- busy: the CPU time other processes (and the hypervisor's steal) took while the runs were timed, in cores
  (``/proc/stat`` less this process's own CPU time). Above ``BUSY_CORES`` the report warns that the figures are
  low by an unknown amount: benchmark on a quiet machine.
- memory: the resident set size before loading (the baseline: Python, torch, the tokenizer), after loading, and its
  high-water mark over the load and the runs. On Linux the mark is reset first (``/proc/self/clear_refs``), so an
  earlier peak of the process does not count; where that is not possible the note says so.
- bandwidth: the bytes of weights one decode step reads (every parameter and buffer once, at its in-memory element
  size, so a quantized module counts its packed storage; an embedding table counts one row unless it is also the
  ``lm_head``; routed experts count ``top_k / experts``) times decode tokens/s, as a fraction of the bandwidth one
  large copy gets here (``chatlm.info.memory_bandwidth``). The KV cache read per step is left out: for a short
  context it is small next to the weights.
"""

from __future__ import annotations

import dataclasses
import os
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .utils import format_bytes

QUANTIZATIONS = ("auto", "none", "int8", "int4", "gguf")
BUSY_CORES = 0.25  # foreign CPU use during the runs above which the report warns
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class GenerateTiming:
    """One timed ``generate`` call: time to the first token and the decode time of the tokens after it."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_s: float  # from the first token's arrival to the last's

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s

    @property
    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class BenchResult:
    """What ``chatlm bench`` reports; ``to_dict()`` is its JSON. Rates are the best of ``repeats`` runs."""

    model: str
    path: str
    dtype: str
    quantization: str
    device: str
    threads: int
    parameters: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    prompt_source: str
    load_s: float
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_ms_per_token: float
    rss_baseline_mib: float
    rss_after_load_mib: float
    peak_rss_mib: float
    peak_rss_increase_mib: float  # peak - baseline: what loading and running the model cost
    weights_bytes_per_token: int
    decode_bytes_per_s: float
    bandwidth_bytes_per_s: float
    bandwidth_fraction: float
    ttft_samples_s: list[float] = field(default_factory=list)
    decode_samples_tokens_per_s: list[float] = field(default_factory=list)
    decode_median_tokens_per_s: float = float("nan")
    decode_spread: float = float("nan")  # (slowest - fastest) / median of the runs' decode rates
    foreign_load_cores: float | None = None  # other processes' CPU use while timed, in cores (None: unknown)
    quality: dict[str, Any] | None = None  # perplexity on the shipped text (PerplexityResult.to_dict + text)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- memory ------------------------------------------------------------------------------------------------
def _status_mib(key: str) -> float | None:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in MiB, or None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mib() -> float:
    rss = _status_mib("VmRSS")
    return rss if rss is not None else peak_rss_mib()


def peak_rss_mib() -> float:
    """The process's resident-set high-water mark (since the last ``reset_peak_rss``, where that worked)."""
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 2**20 if sys.platform == "darwin" else kib / 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- what one decode step reads ------------------------------------------------------------------------------
def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (tied ones once), at its in-memory
    element size; an embedding table (a module with ``num_embeddings``: ``nn.Embedding``, a quantized table) one
    row, unless the same tensor is also used elsewhere (a tied ``lm_head`` reads all of it); the routed experts
    of a mixture-of-experts block ``top_k / experts`` of theirs."""
    fractions: dict[str, float] = {}
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        top_k = getattr(module, "top_k", None)
        if isinstance(experts, nn.Module) and isinstance(top_k, int):
            first = next(experts.parameters(), None)
            if first is not None and first.dim() >= 3 and first.shape[0] > 0:
                fractions[f"{name}.experts" if name else "experts"] = min(1.0, top_k / first.shape[0])

    def fraction(module_name: str) -> float:
        for prefix, value in fractions.items():
            if module_name == prefix or module_name.startswith(prefix + "."):
                return value
        return 1.0

    embeddings: list[tuple[int, torch.Tensor]] = []  # (rows of the table, tensor)
    seen: set[int] = set()
    total = 0.0
    for name, module in model.named_modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        rows = getattr(module, "num_embeddings", None)  # nn.Embedding and look-alikes (a quantized table)
        if isinstance(rows, int) and rows > 0:
            embeddings.extend((rows, t) for t in tensors if t is not None)
            continue
        share = fraction(name)
        for t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size() * share
    for rows, t in embeddings:
        if id(t) in seen:
            continue  # tied: already counted in full where it is used as a matrix
        seen.add(id(t))
        per_row = t.dim() >= 1 and t.shape[0] == rows  # the table and per-row scales: one row's worth
        total += t.numel() * t.element_size() / (rows if per_row else 1)
    return round(total)


# --- timing --------------------------------------------------------------------------------------------------
class TokenArrivals:
    """A ``generate`` streamer that notes when each ``put`` comes: first the prompt, then one per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_generate(model, prompt_ids: list[int], new_tokens: int, **generate_kwargs) -> GenerateTiming:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens after ``prompt_ids`` (any model with a transformers-style
    ``generate`` and streamer), timed by token arrival."""
    if new_tokens < 2:
        raise ValueError(f"decode timing needs at least 2 new tokens, got {new_tokens}")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    streamer = TokenArrivals()
    start = time.perf_counter()
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=streamer,
        **generate_kwargs,
    )
    if tuple(out.shape) != (1, len(prompt_ids) + new_tokens):
        raise RuntimeError(
            f"generate returned {tuple(out.shape)}, expected {(1, len(prompt_ids) + new_tokens)}"
        )
    if len(streamer.times) != new_tokens + 1:
        raise RuntimeError(f"the streamer got {len(streamer.times)} puts, expected {new_tokens + 1}")
    return GenerateTiming(
        prompt_tokens=len(prompt_ids),
        new_tokens=new_tokens,
        ttft_s=streamer.times[1] - start,
        decode_s=streamer.times[-1] - streamer.times[1],
    )


def prompt_from_text(tokenizer, length: int, text: str | None = None) -> list[int]:
    """``length`` token ids: the text (default: the shipped perplexity text) tokenized and cycled."""
    from .quality import default_text

    ids = tokenizer(text or default_text(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt text has no tokens")
    return [ids[i % len(ids)] for i in range(length)]


def random_prompt(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(length)]


def resolve_quantization(quantization: str, model=None, device: str | None = None) -> str:
    """``auto`` made concrete: ``gguf`` (the file's blocks as stored, as llama.cpp and Ollama run a file) for a
    GGUF on the CPU, ``none`` otherwise; any other choice as it is."""
    from .loading.loader import resolve_device
    from .loading.resolve import resolve_model

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization != "auto":
        return quantization
    on_cpu = resolve_device(device or "auto").type == "cpu"
    return "gguf" if on_cpu and resolve_model(model).kind == "gguf" else "none"


def quantization_config(quantization: str, model=None, device: str | None = None):
    """``auto`` / ``none`` / ``int8`` / ``int4`` / ``gguf`` as the ``quantization_config`` for ``from_pretrained``
    (``gguf``: a GGUF file's blocks kept as stored; ``auto``: see `resolve_quantization`)."""
    from .quantization import QuantizationConfig

    quantization = resolve_quantization(quantization, model, device)
    if quantization == "none":
        return None
    if quantization == "gguf":
        return QuantizationConfig(keep_gguf_blocks=True)
    return QuantizationConfig(load_in_8bit=quantization == "int8", load_in_4bit=quantization == "int4")


# --- foreign load ------------------------------------------------------------------------------------------
def machine_cpu_seconds() -> float | None:
    """CPU seconds all processes of this machine have used since boot (the hypervisor's steal included: time
    this machine wanted a core and did not get one), or None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...: all but idle and iowait
    busy = sum(int(x) for i, x in enumerate(fields[1:9]) if i not in (3, 4))
    return busy / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """Measures the CPU time other processes take between ``start()`` and ``stop()``, in cores."""

    def start(self) -> None:
        self.machine, self.own, self.wall = machine_cpu_seconds(), time.process_time(), time.perf_counter()

    def stop(self) -> float | None:
        machine = machine_cpu_seconds()
        if machine is None or self.machine is None:
            return None
        own = time.process_time() - self.own
        return max(0.0, (machine - self.machine - own) / (time.perf_counter() - self.wall))


# --- the benchmark -------------------------------------------------------------------------------------------
def run_bench(
    model: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    quantization: str = "auto",
    prompt_tokens: int = 500,
    new_tokens: int = 128,
    repeats: int = 3,
    quality: bool = False,
    window: int | None = None,
    stride: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    progress=None,
) -> BenchResult:
    """Load ``model`` (a directory, a .gguf file, a Hub id, or None for the bundled model) in ``dtype`` with
    ``quantization``, and measure it (see the module's docstring). ``quality=True`` adds the perplexity on the
    shipped text (``window`` / ``stride``: see ``chatlm.quality.perplexity``). ``progress`` is called with a line
    of text at each stage."""
    from .auto import AutoModelForCausalLM
    from .info import memory_bandwidth
    from .loading.loader import resolve_device
    from .loading.resolve import resolve_model
    from .tokenizer import AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value, least in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 2)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    say = progress or (lambda line: None)
    quantization = resolve_quantization(quantization, model, device)
    qconfig = quantization_config(quantization)
    if threads is not None:
        torch.set_num_threads(threads)
    where = resolve_device(device or "auto")
    notes: list[str] = []

    if where.type == "cpu":
        from .kernels import native

        notes.append(
            native.status()
        )  # built before the baseline: its one-off compile is not the model's load
    say("measuring memory bandwidth")
    bandwidth = memory_bandwidth(str(where))  # before the baseline: its buffers are gone by then
    resolved = resolve_model(model)
    try:  # before the baseline: the tokenizer's memory is not the model's
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        if quality:
            raise ValueError(f"the perplexity (quality) needs the model's tokenizer: {e}") from e
        tokenizer = None
    peak_was_reset = reset_peak_rss()
    if not peak_was_reset:
        notes.append(
            "the RSS high-water mark could not be reset: the peak may include earlier use of the process"
        )
    baseline = current_rss_mib()

    say(f"loading {resolved.name} ({dtype}, quantization {quantization})")
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(
        model, torch_dtype=dtype, device_map=str(where), quantization_config=qconfig
    )
    load_s = time.perf_counter() - start
    after_load = current_rss_mib()

    if tokenizer is not None:
        prompt = prompt_from_text(tokenizer, prompt_tokens)
        prompt_source = f"chatlm/data/rivers.txt, {prompt_tokens} tokens (cycled)"
    else:
        prompt = random_prompt(prompt_tokens, loaded.config.vocab_size)
        prompt_source = f"random ids in [0, {loaded.config.vocab_size}), seed 0 (no tokenizer)"
        notes.append("the model has no tokenizer: the prompt is seeded random token ids")
    context = loaded.config.max_position_embeddings
    if prompt_tokens + new_tokens > context:
        raise ValueError(
            f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} is more than the model's context "
            f"({context} tokens)"
        )

    say("warming up")
    time_generate(loaded, prompt, 2)
    runs = []
    foreign = ForeignLoad()
    foreign.start()
    for i in range(repeats):
        say(f"run {i + 1} of {repeats}: {prompt_tokens}-token prompt, {new_tokens} new tokens")
        runs.append(time_generate(loaded, prompt, new_tokens))
    foreign_load = foreign.stop()
    peak = peak_rss_mib()
    if foreign_load is not None and foreign_load > BUSY_CORES:
        notes.append(
            f"the machine was busy: other processes used {foreign_load:.2f} of {os.cpu_count()} cores while the "
            "runs were timed, so these figures are low by an unknown amount; measure on a quiet machine"
        )

    weights = decode_weight_bytes(loaded)
    ttft = min(r.ttft_s for r in runs)
    decode_tps = max(r.decode_tps for r in runs)
    result = BenchResult(
        model=resolved.name,
        path=str(resolved.path),
        dtype=dtype,
        quantization=quantization,
        device=str(where),
        threads=torch.get_num_threads(),
        parameters=loaded.num_parameters(),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        prompt_source=prompt_source,
        load_s=load_s,
        ttft_s=ttft,
        prefill_tokens_per_s=prompt_tokens / ttft,
        decode_tokens_per_s=decode_tps,
        decode_ms_per_token=1000 / decode_tps,
        rss_baseline_mib=baseline,
        rss_after_load_mib=after_load,
        peak_rss_mib=peak,
        peak_rss_increase_mib=peak - baseline,
        weights_bytes_per_token=weights,
        decode_bytes_per_s=weights * decode_tps,
        bandwidth_bytes_per_s=bandwidth,
        bandwidth_fraction=weights * decode_tps / bandwidth,
        ttft_samples_s=[r.ttft_s for r in runs],
        decode_samples_tokens_per_s=[r.decode_tps for r in runs],
        decode_median_tokens_per_s=statistics.median(r.decode_tps for r in runs),
        decode_spread=(max(r.decode_tps for r in runs) - min(r.decode_tps for r in runs))
        / statistics.median(r.decode_tps for r in runs),
        foreign_load_cores=foreign_load,
        notes=notes,
    )
    if quality:
        from .quality import DEFAULT_TEXT, perplexity

        say("perplexity on the shipped text")
        ppl = perplexity(loaded, tokenizer, window=window, stride=stride)
        result.quality = {"text": f"chatlm/data/{DEFAULT_TEXT}", **ppl.to_dict()}
    return result


# --- output --------------------------------------------------------------------------------------------------
def _rate(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def format_bench(result: BenchResult) -> str:
    """The report ``chatlm bench`` prints."""
    r = result
    quant = "no quantization" if r.quantization == "none" else r.quantization
    lines = [f"{r.model} ({r.dtype}, {quant}, {r.device}, {r.threads} threads; {r.parameters:,} parameters)"]

    def row(key: str, value: str) -> None:
        lines.append(f"  {key:<19}{value}")

    row("load", f"{r.load_s:.2f} s")
    row(
        "prompt",
        f"{r.prompt_tokens} tokens: time to first token {r.ttft_s:.3f} s, prefill {_rate(r.prefill_tokens_per_s)} tok/s",
    )
    row(
        "decode",
        f"{r.new_tokens} tokens: {_rate(r.decode_tokens_per_s)} tok/s ({r.decode_ms_per_token:.1f} ms/token)",
    )
    row(
        "memory",
        f"peak RSS {r.peak_rss_mib:,.0f} MiB (+{r.peak_rss_increase_mib:,.0f} MiB over the "
        f"{r.rss_baseline_mib:,.0f} MiB baseline); {r.rss_after_load_mib:,.0f} MiB after loading",
    )
    row("weights per token", format_bytes(r.weights_bytes_per_token))
    row(
        "bandwidth",
        f"decode reads {format_bytes(r.decode_bytes_per_s)}/s, {r.bandwidth_fraction:.0%} of the "
        f"{format_bytes(r.bandwidth_bytes_per_s)}/s measured on {r.device}",
    )
    if r.quality:
        q = r.quality
        row(
            "perplexity",
            f"{q['perplexity']:.3f} on {q['text']} ({q['tokens']:,} tokens, window {q['window']}, "
            f"stride {q['stride']}; {q['seconds']:.1f} s)",
        )
    samples = ", ".join(_rate(x) for x in r.decode_samples_tokens_per_s)
    if r.repeats > 1:
        lines.append(
            f"  best of {r.repeats} runs; decode median {_rate(r.decode_median_tokens_per_s)} tok/s, spread "
            f"{r.decode_spread:.0%} (tok/s: {samples})"
        )
    else:
        lines.append(f"  one run (decode tok/s: {samples})")
    if r.foreign_load_cores is not None:
        lines.append(f"  other processes used {r.foreign_load_cores:.2f} cores while the runs were timed")
    lines.extend(f"  note: {note}" for note in r.notes)
    return "\n".join(lines)
