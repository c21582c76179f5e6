"""Logits processing and token choice as small pure functions over (batch, vocab) float32 scores."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import GenerationConfig

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (token ids so far, scores) -> scores


def repetition_penalty(penalty: float) -> Processor:
    # CTRL's rule, as transformers applies it: seen tokens' scores shrink towards -inf (over prompt and output).
    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = scores.gather(1, ids)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        return scores.scatter(1, ids, seen)

    return apply


def temperature(t: float) -> Processor:
    return lambda ids, scores: scores / t


def top_k(k: int) -> Processor:
    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(scores, min(k, scores.shape[-1])).values[..., -1:]
        return scores.masked_fill(scores < kth, -float("inf"))

    return apply


def top_p(p: float) -> Processor:
    # Keep the smallest set of most likely tokens whose probability reaches p (always at least one).
    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - p
        remove[..., -1] = False
        return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))

    return apply


def min_p(p: float) -> Processor:
    # Drop tokens less likely than p times the most likely one.
    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        threshold = p * probs.max(dim=-1, keepdim=True).values
        remove = probs < threshold
        remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
        return scores.masked_fill(remove, -float("inf"))

    return apply


def make_processors(config: GenerationConfig) -> list[Processor]:
    """The processors in transformers' order: penalties first, then (when sampling) temperature, top-k, top-p, min-p."""
    processors: list[Processor] = []
    if config.repetition_penalty not in (None, 1.0):
        processors.append(repetition_penalty(config.repetition_penalty))
    if config.do_sample:
        if config.temperature not in (None, 1.0):
            processors.append(temperature(config.temperature))
        if config.top_k:
            processors.append(top_k(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(top_p(config.top_p))
        if config.min_p is not None:
            processors.append(min_p(config.min_p))
    return processors


def choose_tokens(
    scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row: the argmax, or a draw from softmax(scores)."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
