"""Speculative decoding, greedy: guess several tokens cheaply, check them all in one forward pass of the model.

Each round the model is fed the pending token and the guesses, k + 1 tokens at once. Its greedy choice after
each fed token is computed exactly as plain decoding computes it (logits processors included), guesses are kept
while they equal those choices, and the first choice that differs (or the one after the last guess) becomes the
next pending token. The output is plain greedy decoding's, token for token (to float rounding: a forward pass over
k + 1 tokens sums in another order than k + 1 passes over one); the cache is trimmed back to what was accepted.

Guesses come from a `Proposer`:
- `PromptLookup` (``prompt_lookup_num_tokens``): the tokens that followed the latest earlier occurrence of the
  sequence's last n-gram. Free, and a big win when the reply quotes its input (editing, summaries, code).
- `DraftModel` (``assistant_model``): a smaller model with the same tokenizer decodes ``num_assistant_tokens``
  tokens greedily in its own cache; with the "heuristic" schedule (as transformers), that number grows by 2 after
  a round that accepts every guess and shrinks by 1 otherwise.

A `Governor` times rounds with and without guesses and stops guessing while guessing costs more per token than
plain steps (a reply that quotes nothing gives prompt lookup little to accept), trying again later.

This increment decodes one sequence greedily; sampling and batches are refused with a ValueError that says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .config import GenerationConfig
from .sampling import make_processors


@dataclass
class SpeculationStats:
    """What speculation did in one generate call: guesses proposed and accepted, and forward passes of the model."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class Governor:
    """Turns guessing off while it measurably loses. It keeps running costs per settled token of rounds with
    guesses and of plain steps (one token, no guess); when the guesses' cost passes plain's, it stops proposing for
    a while (4 rounds, doubling while the losses go on, up to 64), then tries again: the text may have come to
    something worth quoting. The first round is plain, to know what plain costs."""

    def __init__(self, backoff: int = 4, longest: int = 64, weight: float = 0.3):
        self.first_backoff, self.longest, self.weight = backoff, longest, weight
        self.backoff = backoff
        self.cost: dict[str, float | None] = {"plain": None, "guess": None}  # seconds per settled token
        self.rounds_off = 1  # start with one plain step

    def should_guess(self) -> bool:
        if self.rounds_off > 0:
            self.rounds_off -= 1
            return False
        return True

    def record(self, guessed: bool, seconds: float, settled: int) -> None:
        kind = "guess" if guessed else "plain"
        per_token = seconds / max(1, settled)
        old = self.cost[kind]
        self.cost[kind] = per_token if old is None else (1 - self.weight) * old + self.weight * per_token
        plain, guess = self.cost["plain"], self.cost["guess"]
        if not guessed or plain is None:
            return
        if guess > plain:
            self.rounds_off, self.backoff = self.backoff, min(self.longest, 2 * self.backoff)
        else:
            self.backoff = self.first_backoff


class PromptLookup:
    """Guesses ``num_tokens`` tokens: those that followed the latest earlier occurrence of the last n-gram of the
    sequence, trying n = ``max_ngram`` down to 1."""

    def __init__(self, num_tokens: int, max_ngram: int = 2):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram

    def propose(self, ids: torch.Tensor) -> list[int]:
        """ids: (length,) the sequence so far, its last token the pending one."""
        length = ids.shape[0]
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            windows = ids.unfold(0, n, 1)[:-1]  # every earlier n-gram (not the last one itself)
            hits = (windows == ids[length - n :]).all(dim=1).nonzero()
            for start in reversed(hits.flatten().tolist()):
                follow = ids[start + n : start + n + self.num_tokens]
                if follow.numel():
                    return follow.tolist()
        return []

    def accepted(self, length: int, all_accepted: bool) -> None:
        pass


class DraftModel:
    """Guesses by greedy decoding with a smaller model that shares the tokenizer, in a cache of its own."""

    def __init__(self, model, config: GenerationConfig, capacity: int):
        self.model = model
        self.k = config.num_assistant_tokens
        self.adaptive = config.num_assistant_tokens_schedule == "heuristic"
        self.cache = model.new_cache(1, capacity)

    def propose(self, ids: torch.Tensor) -> list[int]:
        guesses: list[int] = []
        fed = ids[self.cache.offset :][None]  # what the draft's cache lacks, up to the pending token
        for _ in range(self.k):
            logits = self.model(fed, past_key_values=self.cache, logits_to_keep=1).logits[0, -1]
            token = int(logits.argmax())
            guesses.append(token)
            fed = torch.tensor([[token]], device=ids.device)
        return guesses

    def accepted(self, length: int, all_accepted: bool) -> None:
        """``length`` tokens of the sequence are settled: forget any cached beyond them."""
        self.cache.trim(max(0, self.cache.offset - length))
        if self.adaptive:
            self.k = self.k + 2 if all_accepted else max(1, self.k - 1)


def check_speculation(config: GenerationConfig, batch: int, assistant_model) -> None:
    if config.do_sample:
        raise ValueError(
            "speculative decoding (assistant_model / prompt_lookup_num_tokens) is greedy only in this version: "
            "pass do_sample=False"
        )
    if batch != 1:
        raise ValueError(
            f"speculative decoding takes one sequence at a time in this version, got a batch of {batch}"
        )
    if assistant_model is not None and config.prompt_lookup_num_tokens is not None:
        raise ValueError("choose one of assistant_model and prompt_lookup_num_tokens, not both")


def speculative_steps(
    model,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    max_new_tokens: int,
    proposer,
    stats: SpeculationStats,
    stop_check: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    governor: Governor | None = None,
) -> Iterator:
    """Steps (as ``generate_steps`` yields them) of greedy decoding of one unpadded sequence, with guesses from
    ``proposer`` checked in one forward pass per round."""
    from .generate import Step

    device = input_ids.device
    prompt_length = input_ids.shape[1]
    eos = set(config.eos_token_ids)
    min_new = config.min_new_tokens or max(0, (config.min_length or 0) - prompt_length)
    processors = make_processors(config)
    ids = torch.empty(prompt_length + max_new_tokens + 1, dtype=torch.long, device=device)
    ids[:prompt_length] = input_ids[0]
    length = prompt_length
    cache = model.new_cache(1, prompt_length + max_new_tokens + 1)
    not_done = torch.zeros(1, dtype=torch.bool, device=device)
    governor = governor or Governor()

    def choose(logits: torch.Tensor, length: int) -> tuple[int, torch.Tensor]:
        """The greedy token after ids[:length] from its raw logits, as plain decoding chooses it."""
        scores = logits.float()[None]
        for process in processors:
            scores = process(ids[None, :length], scores)
        if length - prompt_length < min_new and eos:
            scores[:, list(eos)] = -float("inf")
        return int(scores.argmax(-1)), scores

    # Prefill all but the last prompt token: every round starts by feeding the pending token.
    if prompt_length > 1:
        model(input_ids[:, :-1], past_key_values=cache, logits_to_keep=1)
    while True:
        started = time.perf_counter()
        budget = max(0, max_new_tokens - (length - prompt_length) - 1)
        guesses = proposer.propose(ids[:length])[:budget] if budget and governor.should_guess() else []
        fed = torch.cat([ids[length - 1 : length], torch.tensor(guesses, dtype=torch.long, device=device)])
        logits = model(fed[None], past_key_values=cache).logits[0]  # (1 + guesses, vocab)
        stats.rounds += 1
        stats.proposed += len(guesses)
        taken = 0
        for i in range(len(guesses) + 1):
            token, scores = choose(logits[i], length)
            ids[length] = token
            length += 1
            yield Step(torch.tensor([token], device=device), not_done.clone(), scores)
            finished = token in eos or length - prompt_length >= max_new_tokens
            if stop_check is not None and not finished:
                finished = bool(stop_check(torch.tensor([token], device=device), not_done)[0])
            if finished:
                return
            if i == len(guesses) or token != guesses[i]:
                break
            taken += 1
            stats.accepted += 1
        cache.trim(len(guesses) - taken)  # the rejected guesses: the cache ends before the pending token
        proposer.accepted(length - 1, bool(guesses) and taken == len(guesses))
        governor.record(bool(guesses), time.perf_counter() - started, taken + 1)
