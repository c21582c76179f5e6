"""Perplexity of a causal LM on a text, with a sliding window over the model's context.

The text is scored the way the Hugging Face guide "Perplexity of fixed-length models" does it: windows of
``window`` tokens start every ``stride`` tokens, and each window scores only the tokens that the previous one did
not, so every token but the first is scored exactly once, with at least ``window - stride`` tokens of context
(except near the start); with ``stride == window`` the windows are disjoint and the first token of each has no
context, so it is not scored. Perplexity is ``exp`` of the mean negative log-likelihood over the scored tokens.

A window runs through the model in chunks of ``chunk`` tokens with a KV cache, and only the positions that predict
scored tokens get logits, so memory stays at ``chunk x vocabulary`` floats whatever the window. The function takes
chatlm models and, by duck typing, transformers ones (``past_key_values`` / ``use_cache`` / ``logits_to_keep``).

``default_text()`` is the text shipped with chatlm (``chatlm/data/rivers.txt``: an essay about rivers, about 2,300
words, written for chatlm and dedicated to the public domain, CC0), used by ``chatlm bench --quality``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import torch

DEFAULT_TEXT = "rivers.txt"
DEFAULT_WINDOW = 1024  # capped at the model's context
DEFAULT_CHUNK = 512


@dataclass
class PerplexityResult:
    """``perplexity`` = exp(``mean_nll``); ``scored`` tokens of ``tokens`` (all but the first) in ``windows``."""

    perplexity: float
    mean_nll: float  # nats per scored token
    tokens: int
    scored: int
    window: int
    stride: int
    windows: int
    seconds: float

    def __float__(self) -> float:
        return self.perplexity

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_text() -> str:
    """The English text shipped with chatlm for perplexity (``chatlm/data/rivers.txt``)."""
    return resources.files("chatlm").joinpath("data", DEFAULT_TEXT).read_text(encoding="utf-8")


def perplexity(
    model,
    tokenizer=None,
    text: str | Sequence[int] | torch.Tensor | None = None,
    *,
    window: int | None = None,
    stride: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    add_special_tokens: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (default: ``default_text()``).

    ``text`` is a string, tokenized with ``tokenizer(text, add_special_tokens=...)``, or token ids (a list or a 1-D
    / (1, n) tensor; then ``tokenizer`` may be None). ``window`` defaults to the model's context capped at 1024
    tokens, ``stride`` to half the window (``stride == window`` scores disjoint chunks, each from scratch).
    """
    ids = _token_ids(tokenizer, default_text() if text is None else text, add_special_tokens)
    n = ids.numel()
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, the text has {n}")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or DEFAULT_WINDOW
    window = window if window is not None else min(context, DEFAULT_WINDOW)
    if window < 2 or window > context:
        raise ValueError(f"window must be between 2 and the model's context ({context} tokens), got {window}")
    stride = stride if stride is not None else max(1, window // 2)
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and the window ({window}), got {stride}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")

    device = next(model.parameters()).device
    ids = ids.to(device)
    start = time.perf_counter()
    total_nll, scored, windows, previous_end = 0.0, 0, 0, 0
    with torch.inference_mode():
        for begin in range(0, n, stride):
            end = min(begin + window, n)
            first_target = max(previous_end, begin + 1)  # global position of the first token scored here
            total_nll += _window_nll(model, ids[begin:end], first_target - begin, chunk)
            scored += end - first_target
            windows += 1
            previous_end = end
            if end == n:
                break
    mean = total_nll / scored
    return PerplexityResult(
        perplexity=math.exp(mean),
        mean_nll=mean,
        tokens=n,
        scored=scored,
        window=window,
        stride=stride,
        windows=windows,
        seconds=time.perf_counter() - start,
    )


def _token_ids(tokenizer, text, add_special_tokens: bool) -> torch.Tensor:
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("perplexity of a text needs the tokenizer (or pass token ids)")
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    else:
        ids = text
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"token ids must be one sequence, got shape {tuple(ids.shape)}")
    return ids


def _window_nll(model, ids: torch.Tensor, first: int, chunk: int) -> float:
    """Summed negative log-likelihood of ``ids[first:]``, each predicted from the tokens before it in ``ids``."""
    length = ids.numel()
    cache = model.new_cache(1, length) if hasattr(model, "new_cache") else None  # chatlm: preallocated
    key = _cache_keyword(model)
    total = 0.0
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        # Logits at position p predict token p + 1: this chunk's useful ones are p in [first - 1, length - 1).
        lo, hi = max(start, first - 1), min(stop, length - 1)
        keep = stop - lo if hi > lo else 1
        out = model(ids[None, start:stop], use_cache=True, logits_to_keep=keep, **{key: cache})
        cache = getattr(out, key)
        if hi <= lo:
            continue
        logits = out.logits[0, : hi - lo].float()  # positions lo .. hi - 1 (logits cover lo .. stop - 1)
        targets = ids[lo + 1 : hi + 1]
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    return total


def _cache_keyword(model) -> str:
    """The forward call's name for the KV cache: ``past_key_values`` (chatlm, transformers 4) or ``cache``
    (transformers 5.2x, which deprecates the old name); the output carries it under the same name."""
    if hasattr(model, "new_cache"):
        return "past_key_values"
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters and "past_key_values" not in parameters else "past_key_values"
