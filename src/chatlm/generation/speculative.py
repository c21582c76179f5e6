"""Speculative decoding: guess several tokens cheaply, check them all in one forward pass of the model.

Each round the model is fed the pending token and the guesses, k + 1 tokens at once. Its greedy choice after
each fed token is computed exactly as plain decoding computes it (logits processors included), guesses are kept
while they equal those choices, and the first choice that differs (or the one after the last guess) becomes the
next pending token. The greedy output is plain greedy decoding's, token for token (to float rounding: a forward
pass over k + 1 tokens sums in another order than k + 1 passes over one); the cache is trimmed back to what was
accepted.

Sampling (``do_sample=True``) keeps or replaces each guess by the rejection rule of speculative sampling
(`accept`), so the output is distributed exactly as plain sampling's: the same distribution, not the same draws.

Guesses come from a proposer:
- `PromptLookup` (``prompt_lookup_num_tokens``): the tokens that followed the latest earlier occurrence of the
  sequence's last n-gram. Free, and a big win when the reply quotes its input (editing, summaries, code).
- `DraftModel` (``assistant_model``): a smaller model with the same tokenizer decodes ``num_assistant_tokens``
  tokens in its own cache; with the "heuristic" schedule (as transformers), that number grows by 2 after a round
  that accepts every guess and shrinks by 1 otherwise.
- `EarlyExitDraft` (``assistant_early_exit=layers``): the model's first layers and LM head, on its own cache.

A `Governor` times rounds with and without guesses and stops guessing while guessing costs more per token than
plain steps (a reply that quotes nothing gives prompt lookup little to accept), trying again later.

Batches (left padding allowed) speculate with every proposer, greedy or sampling: each row guesses, and keeps,
its own number of tokens a round. Its cache rows advance unevenly (`RaggedCache`: rejected slots are masked, not
moved). The rounds are steps of the one decode loop (`decoding.Decoder`), which checks the guesses with each
row's `RowSampler`; this module holds the proposers and the governor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GenerationConfig
from .ragged_cache import RaggedCache
from .sampling import RowSampler


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

    distributions: dict[int, list[torch.Tensor]] = {}  # guesses are certain: no draft distribution

    def __init__(self, num_tokens: int, max_ngram: int = 2):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram

    def start(self, main: RaggedCache) -> None:
        pass

    def lookup(self, ids: torch.Tensor) -> list[int]:
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

    def propose(
        self, seqs: dict[int, torch.Tensor], limits: dict[int, int], samplers: dict[int, RowSampler]
    ) -> dict[int, list[int]]:
        return {row: self.lookup(seq)[: limits[row]] for row, seq in seqs.items()}

    def settled(self, lengths: dict[int, int], all_accepted: bool) -> None:
        pass


class DraftModel:
    """Guesses by decoding with a smaller model that shares the tokenizer, in a cache of its own (one row per row
    of the batch), choosing as each row's own sampler would (a fork of it, advanced through the guesses)."""

    def __init__(self, model, config: GenerationConfig, generator: torch.Generator | None = None):
        self.model = model
        self.k = config.num_assistant_tokens
        self.adaptive = config.num_assistant_tokens_schedule == "heuristic"
        self.generator = generator
        self.cache: RaggedCache | None = None
        self.distributions: dict[int, list[torch.Tensor]] = {}  # when sampling: each guess's distribution

    def start(self, main: RaggedCache) -> None:
        self.cache = RaggedCache(self.model, main.cache.batch_size, main.cache.capacity)

    def propose(
        self, seqs: dict[int, torch.Tensor], limits: dict[int, int], samplers: dict[int, RowSampler]
    ) -> dict[int, list[int]]:
        """seqs: each guessing row's real tokens so far (no padding), the last one pending (not in any cache)."""
        cache = self.cache
        batch = cache.cache.batch_size
        lacking = {
            row: seq[int(cache.lengths[row]) :] for row, seq in seqs.items()
        }  # up to the pending token
        width = max(t.shape[0] for t in lacking.values())
        fed = torch.zeros(batch, width, dtype=torch.long, device=cache.device)
        real = torch.zeros(batch, width, dtype=torch.bool, device=fed.device)
        for row, tokens in lacking.items():
            fed[row, : tokens.shape[0]], real[row, : tokens.shape[0]] = tokens, True
        last = {row: t.shape[0] - 1 for row, t in lacking.items()}
        guesses: dict[int, list[int]] = {row: [] for row in seqs}
        self.distributions = {row: [] for row in seqs}
        forks = {row: samplers[row].fork() for row in seqs}
        limits = dict(limits)  # shortened below for rows whose constraint ends
        for step in range(min(self.k, max(limits.values()))):
            logits = cache.forward(fed, real)
            fed = torch.zeros(batch, 1, dtype=torch.long, device=fed.device)
            real = torch.zeros(batch, 1, dtype=torch.bool, device=fed.device)
            for row, sampler in forks.items():
                if step >= limits[row]:
                    continue
                scores = sampler.scores(logits[row, last[row]])
                if bool(scores.isneginf().all()):  # its constraint allows nothing more: no further guesses
                    limits[row] = step
                    continue
                if sampler.params.greedy:
                    token = int(scores.argmax())
                else:
                    probs = scores.softmax(-1)[0]
                    token = int(torch.multinomial(probs, 1, generator=self.generator))
                    self.distributions[row].append(probs)
                sampler.take(token)
                guesses[row].append(token)
                fed[row, 0], real[row, 0] = token, True
            last = dict.fromkeys(seqs, 0)
        return guesses

    def settled(self, lengths: dict[int, int], all_accepted: bool) -> None:
        """Each row's sequence now has ``lengths[row]`` settled tokens, the last pending: forget guesses beyond."""
        keep = self.cache.lengths.clone()
        for row, length in lengths.items():
            keep[row] = min(int(keep[row]), length - 1)
        self.cache.truncate(keep)
        self._adapt(all_accepted)

    def _adapt(self, all_accepted: bool) -> None:
        if self.adaptive:  # transformers' heuristic schedule
            self.k = self.k + 2 if all_accepted else max(1, self.k - 1)


class EarlyExitDraft(DraftModel):
    """Self-speculation (``assistant_early_exit=layers``): the model's own first layers, final norm and LM head are
    the draft, on the model's own cache. What the draft writes there for those layers is what the check writes
    again (same inputs), and the cache is rewound after each draft, so nothing is duplicated."""

    def __init__(
        self, model, layers: int, config: GenerationConfig, generator: torch.Generator | None = None
    ):
        super().__init__(model, config, generator)
        self.layers = layers

    def start(self, main: RaggedCache) -> None:
        self.cache = main

    def propose(
        self, seqs: dict[int, torch.Tensor], limits: dict[int, int], samplers: dict[int, RowSampler]
    ) -> dict[int, list[int]]:
        saved = self.cache.save()
        with self.model.early_exit(self.layers):
            guesses = super().propose(seqs, limits, samplers)
        self.cache.restore(saved)
        return guesses

    def settled(self, lengths: dict[int, int], all_accepted: bool) -> None:
        self._adapt(all_accepted)  # the cache is the model's: nothing to trim here


def check_speculation(config: GenerationConfig, assistant_model, right_padded: bool = False) -> None:
    if right_padded:
        raise ValueError(
            "speculative decoding needs left padding (a row's last column must be a real token): set "
            "padding_side='left' on the tokenizer"
        )
    drafters = [assistant_model is not None, config.prompt_lookup_num_tokens is not None]
    drafters.append(config.assistant_early_exit is not None)
    if sum(drafters) > 1:
        raise ValueError(
            "choose one of assistant_model, prompt_lookup_num_tokens and assistant_early_exit, not several"
        )
