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

Batches (and left-padded input) decode with greedy prompt lookup (`batched_lookup_steps`); draft models,
self-speculation and sampling take one sequence at a time in this version, and refuse a batch with a ValueError.
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
    """Guesses by decoding with a smaller model that shares the tokenizer, in a cache of its own."""

    def __init__(
        self, model, config: GenerationConfig, capacity: int, generator: torch.Generator | None = None
    ):
        self.model = model
        self.k = config.num_assistant_tokens
        self.adaptive = config.num_assistant_tokens_schedule == "heuristic"
        self.cache = model.new_cache(1, capacity) if capacity else None
        self.sampling, self.generator = config.do_sample, generator
        self.processors = make_processors(config)
        self.distributions: list[
            torch.Tensor
        ] = []  # when sampling: the distribution each guess was drawn from

    def propose(self, ids: torch.Tensor) -> list[int]:
        guesses: list[int] = []
        self.distributions = []
        fed = ids[self.cache.offset :][None]  # what the draft's cache lacks, up to the pending token
        seen = ids
        for _ in range(self.k):
            scores = self.model(fed, past_key_values=self.cache, logits_to_keep=1).logits[:, -1].float()
            for process in self.processors:  # the chat model's own processing: guesses it would make
                scores = process(seen[None], scores)
            if self.sampling:
                probs = scores.softmax(-1)[0]
                token = int(torch.multinomial(probs, 1, generator=self.generator))
                self.distributions.append(probs)
            else:
                token = int(scores.argmax())
            guesses.append(token)
            fed = torch.tensor([[token]], device=ids.device)
            seen = torch.cat([seen, fed[0]])
        return guesses

    def accepted(self, length: int, all_accepted: bool) -> None:
        """``length`` tokens of the sequence are settled: forget any cached beyond them."""
        self.cache.trim(max(0, self.cache.offset - length))
        if self.adaptive:
            self.k = self.k + 2 if all_accepted else max(1, self.k - 1)


class EarlyExitDraft(DraftModel):
    """Self-speculation (``assistant_early_exit=layers``): the model's own first layers, final norm and LM head are
    the draft, on the model's own cache. What the draft writes there for those layers is what the check writes
    again (same inputs), and the cache is rewound after each draft, so nothing is duplicated."""

    def __init__(
        self, model, layers: int, config: GenerationConfig, generator: torch.Generator | None = None
    ):
        super().__init__(model, config, 0, generator)
        self.layers = layers

    def bind(self, cache) -> None:
        self.cache = cache

    def propose(self, ids: torch.Tensor) -> list[int]:
        start = self.cache.offset  # the pending token is not in the cache yet
        with self.model.early_exit(self.layers):
            guesses = super().propose(ids)
        self.cache.trim(self.cache.offset - start)
        return guesses

    def accepted(self, length: int, all_accepted: bool) -> None:
        if self.adaptive:  # the cache is the model's: nothing to trim here
            self.k = self.k + 2 if all_accepted else max(1, self.k - 1)


def accept(
    target: torch.Tensor, guess: int | None, draft: torch.Tensor | None, generator: torch.Generator | None
) -> int:
    """Speculative sampling's rule (Leviathan et al. 2023, Chen et al. 2023): keep a guess drawn from ``draft``
    with probability min(1, target / draft) at the guess, else draw from the normalised max(0, target - draft).
    The token that comes out is distributed as ``target`` exactly. A guess with no draft distribution (prompt
    lookup) was certain: draft is 1 at the guess. No guess: a plain draw from ``target``."""
    if guess is None:
        return int(torch.multinomial(target, 1, generator=generator))
    q = float(draft[guess]) if draft is not None else 1.0
    u = float(torch.rand((), generator=generator))
    if u * q < float(target[guess]):  # u < target / draft, without dividing by a tiny q
        return guess
    if draft is not None:
        residual = (target - draft).clamp(min=0)
    else:
        residual = target.clone()
        residual[guess] = 0
    if float(residual.sum()) <= 0:  # target == draft: the rule cannot reject; only rounding gets here
        return guess
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


def check_speculation(config: GenerationConfig, batch: int, padded: bool, assistant_model) -> None:
    lookup_only = assistant_model is None and config.assistant_early_exit is None
    if (batch != 1 or padded) and not (lookup_only and not config.do_sample):
        raise ValueError(
            "speculative decoding of a batch (or of padded input) works with greedy prompt lookup only in this "
            f"version; got a batch of {batch}" + (" with padding" if padded else "")
        )
    drafters = [assistant_model is not None, config.prompt_lookup_num_tokens is not None]
    drafters.append(config.assistant_early_exit is not None)
    if sum(drafters) > 1:
        raise ValueError(
            "choose one of assistant_model, prompt_lookup_num_tokens and assistant_early_exit, not several"
        )


def speculative_steps(
    model,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    max_new_tokens: int,
    proposer,
    stats: SpeculationStats,
    stop_check: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    governor: Governor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator:
    """Steps (as ``generate_steps`` yields them) of decoding one unpadded sequence, with guesses from ``proposer``
    checked in one forward pass per round: greedy, or sampling with the rejection rule (see `accept`)."""
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
    if hasattr(proposer, "bind"):
        proposer.bind(cache)

    def choose(logits: torch.Tensor, length: int, guess: int | None, i: int) -> tuple[int, torch.Tensor]:
        """The token after ids[:length] from its raw logits: plain decoding's choice when greedy; when sampling,
        the guess if the rejection rule keeps it, else a draw that makes the result exactly the model's."""
        scores = logits.float()[None]
        for process in processors:
            scores = process(ids[None, :length], scores)
        if length - prompt_length < min_new and eos:
            scores[:, list(eos)] = -float("inf")
        if not config.do_sample:
            return int(scores.argmax(-1)), scores
        target = scores.softmax(-1)[0]
        drafts = getattr(proposer, "distributions", None)
        return accept(target, guess, drafts[i] if drafts else None, generator), scores

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
            token, scores = choose(logits[i], length, guesses[i] if i < len(guesses) else None, i)
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


def batched_lookup_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    max_new_tokens: int,
    lookup: PromptLookup,
    stats: SpeculationStats,
    stop_check: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    governor: Governor | None = None,
) -> Iterator:
    """Greedy speculative decoding of a batch (left padding allowed) with prompt-lookup guesses per row.

    Each round feeds every row its pending token and its guesses (padded to the longest), and settles the same
    number of tokens in every unfinished row: the fewest that any of them had right, plus one. Rows stay aligned,
    share one cache offset and come out column by column as plain batched decoding's do, each token the model's
    greedy choice after its row's exact prefix; a row that was right further than the others is checked again from
    there next round."""
    from .generate import Step

    batch, prompt_length = input_ids.shape
    device = input_ids.device
    eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device)
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]
    min_new = config.min_new_tokens or max(0, (config.min_length or 0) - prompt_length)
    processors = make_processors(config)
    total = prompt_length + max_new_tokens + lookup.num_tokens + 1
    ids = torch.full((batch, total), pad, dtype=torch.long, device=device)
    ids[:, :prompt_length] = input_ids
    mask = torch.ones(batch, total, dtype=torch.long, device=device)
    mask[:, :prompt_length] = attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # of every slot, future ones included
    padded = not bool(attention_mask.all())
    cache = model.new_cache(batch, total)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    governor = governor or Governor()

    def choose(row: int, logits: torch.Tensor, context: torch.Tensor) -> tuple[int, torch.Tensor]:
        scores = logits.float()[None]
        for process in processors:
            scores = process(context[None], scores)
        if context.shape[0] - prompt_length < min_new and eos.numel():
            scores[:, eos] = -float("inf")
        return int(scores.argmax(-1)), scores[0]

    def forward(start: int, stop: int):
        return model(
            ids[:, start:stop],
            attention_mask=mask[:, :stop] if padded else None,
            position_ids=positions[:, start:stop],
            past_key_values=cache,
        ).logits

    if prompt_length > 1:
        forward(0, prompt_length - 1)
    length = prompt_length
    while True:
        started = time.perf_counter()
        budget = max(0, max_new_tokens - (length - prompt_length) - 1)
        guessing = budget > 0 and governor.should_guess()
        guesses = [
            lookup.propose(ids[r, :length])[:budget] if guessing and not done[r] else [] for r in range(batch)
        ]
        width = max(len(g) for g in guesses)
        ids[:, length : length + width] = pad
        for r, g in enumerate(guesses):
            ids[r, length : length + len(g)] = torch.tensor(g, dtype=torch.long, device=device)
        logits = forward(length - 1, length + width)  # (batch, 1 + width, vocab)
        stats.rounds += 1
        stats.proposed += sum(len(g) for g in guesses)
        choices: list[list[tuple[int, torch.Tensor]]] = []
        for r, g in enumerate(guesses):
            row = []
            for i in range(len(g) + 1):
                row.append(choose(r, logits[r, i], ids[r, : length + i]))
                if i == len(g) or row[-1][0] != g[i] or done[r]:
                    break
            choices.append(row)
        settle = min(len(row) for row, finished in zip(choices, done.tolist()) if not finished)
        for j in range(settle):
            picked = [
                row[j] if j < len(row) else choose(r, logits[r, j], ids[r, : length + j])
                for r, row in enumerate(choices)
            ]
            tokens = torch.tensor([p[0] for p in picked], dtype=torch.long, device=device)
            tokens = torch.where(done, torch.full_like(tokens, pad), tokens)
            ids[:, length] = tokens
            length += 1
            yield Step(tokens, done.clone(), torch.stack([p[1] for p in picked]))
            if eos.numel():
                done |= torch.isin(tokens, eos)
            if stop_check is not None:
                done |= stop_check(tokens, done)
            if bool(done.all()) or length - prompt_length >= max_new_tokens:
                return
        stats.accepted += (settle - 1) * int((~done).sum())
        cache.trim(1 + width - settle)  # keep the old pending token and the settled tokens before the new one
        governor.record(width > 0, time.perf_counter() - started, settle)
