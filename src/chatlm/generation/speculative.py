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
moved), and a row that got ahead holds its tokens back until every unfinished row has one for that column, so
the steps still come out column by column as plain batched decoding's.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .config import GenerationConfig
from .ragged_cache import RaggedCache
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
        self, seqs: dict[int, torch.Tensor], limits: dict[int, int], eos_banned: dict[int, int]
    ) -> dict[int, list[int]]:
        return {row: self.lookup(seq)[: limits[row]] for row, seq in seqs.items()}

    def settled(self, lengths: dict[int, int], all_accepted: bool) -> None:
        pass


class DraftModel:
    """Guesses by decoding with a smaller model that shares the tokenizer, in a cache of its own (one row per row
    of the batch), through the chat model's own logits processors: the guesses it would make."""

    def __init__(self, model, config: GenerationConfig, generator: torch.Generator | None = None):
        self.model = model
        self.k = config.num_assistant_tokens
        self.adaptive = config.num_assistant_tokens_schedule == "heuristic"
        self.sampling, self.generator = config.do_sample, generator
        self.processors = make_processors(config)
        self.eos = list(config.eos_token_ids)
        self.cache: RaggedCache | None = None
        self.distributions: dict[int, list[torch.Tensor]] = {}  # when sampling: each guess's distribution

    def start(self, main: RaggedCache) -> None:
        self.cache = RaggedCache(self.model, main.cache.batch_size, main.cache.capacity)

    def propose(
        self, seqs: dict[int, torch.Tensor], limits: dict[int, int], eos_banned: dict[int, int]
    ) -> dict[int, list[int]]:
        """seqs: each guessing row's real tokens so far (no padding), the last one pending (not in any cache)."""
        cache = self.cache
        batch = cache.cache.batch_size
        lacking = {
            row: seq[int(cache.lengths[row]) :] for row, seq in seqs.items()
        }  # up to the pending token
        width = max(t.shape[0] for t in lacking.values())
        fed = torch.zeros(batch, width, dtype=torch.long, device=cache.lengths.device)
        real = torch.zeros(batch, width, dtype=torch.bool, device=fed.device)
        for row, tokens in lacking.items():
            fed[row, : tokens.shape[0]], real[row, : tokens.shape[0]] = tokens, True
        last = {row: t.shape[0] - 1 for row, t in lacking.items()}
        guesses: dict[int, list[int]] = {row: [] for row in seqs}
        self.distributions = {row: [] for row in seqs}
        seen = dict(seqs)
        for step in range(min(self.k, max(limits.values()))):
            logits = cache.forward(fed, real)
            fed = torch.zeros(batch, 1, dtype=torch.long, device=fed.device)
            real = torch.zeros(batch, 1, dtype=torch.bool, device=fed.device)
            for row in seqs:
                if step >= limits[row]:
                    continue
                scores = logits[row, last[row]].float()[None]
                for process in self.processors:
                    scores = process(seen[row][None], scores)
                if step < eos_banned[row] and self.eos:
                    scores[:, self.eos] = -float("inf")
                if self.sampling:
                    probs = scores.softmax(-1)[0]
                    token = int(torch.multinomial(probs, 1, generator=self.generator))
                    self.distributions[row].append(probs)
                else:
                    token = int(scores.argmax())
                guesses[row].append(token)
                fed[row, 0], real[row, 0] = token, True
                seen[row] = torch.cat([seen[row], fed[row]])
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
        self, seqs: dict[int, torch.Tensor], limits: dict[int, int], eos_banned: dict[int, int]
    ) -> dict[int, list[int]]:
        saved = self.cache.save()
        with self.model.early_exit(self.layers):
            guesses = super().propose(seqs, limits, eos_banned)
        self.cache.restore(saved)
        return guesses

    def settled(self, lengths: dict[int, int], all_accepted: bool) -> None:
        self._adapt(all_accepted)  # the cache is the model's: nothing to trim here


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


def speculative_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    max_new_tokens: int,
    proposer,
    stats: SpeculationStats,
    stop_check: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    governor: Governor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator:
    """Steps (as ``generate_steps`` yields them: one column of the batch each) of decoding a batch, left padding
    allowed, with guesses from ``proposer`` checked in one forward pass per round: greedy, or sampling with the
    rejection rule (see `accept`). Each row keeps all of its own accepted guesses; a row that got ahead of the
    others holds its tokens back until every unfinished row has one for that column."""
    from .generate import PREFILL_CHUNK, Step

    batch, prompt_length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = list(config.eos_token_ids)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos or [0])[0]
    min_new = config.min_new_tokens or max(0, (config.min_length or 0) - prompt_length)
    processors = make_processors(config)
    governor = governor or Governor()
    ids = torch.full((batch, prompt_length + max_new_tokens), pad, dtype=torch.long, device=device)
    ids[:, :prompt_length] = input_ids  # the padded prompt, then each row's own tokens
    padding = (attention_mask == 0).sum(-1).tolist()
    produced = [0] * batch  # tokens generated per row, emitted or held back
    finished = [False] * batch  # a row generates no more: it ended, reached max_new_tokens or hit a stop
    held: list[deque] = [deque() for _ in range(batch)]  # (token, scores) generated, not yet emitted
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    emitted = 0

    main = RaggedCache(model, batch, prompt_length + max_new_tokens + 16)
    real_prompt = attention_mask.bool()
    for start in range(0, prompt_length - 1, PREFILL_CHUNK):  # all but the pending last token
        stop = min(prompt_length - 1, start + PREFILL_CHUNK)
        main.forward(input_ids[:, start:stop], real_prompt[:, start:stop], logits_to_keep=1)
    proposer.start(main)

    def choose(row: int, logits: torch.Tensor, guess: int | None, i: int) -> tuple[int, torch.Tensor]:
        """The token after the row's sequence so far from its raw logits: plain decoding's choice when greedy;
        when sampling, the guess if the rejection rule keeps it, else a draw that makes the result exactly the
        model's."""
        length = prompt_length + produced[row]
        scores = logits.float()[None]
        for process in processors:
            scores = process(ids[row : row + 1, :length], scores)
        if produced[row] < min_new and eos:
            scores[:, eos] = -float("inf")
        if not config.do_sample:
            return int(scores.argmax(-1)), scores[0]
        draft = proposer.distributions[row][i] if guess is not None and proposer.distributions else None
        return accept(scores.softmax(-1)[0], guess, draft, generator), scores[0]

    def round_of_guesses() -> None:
        started = time.perf_counter()
        active = [row for row in range(batch) if not finished[row]]
        limits = {row: max_new_tokens - produced[row] - 1 for row in active}
        guessing = [row for row in active if limits[row] > 0]
        guesses: dict[int, list[int]] = {}
        if guessing and governor.should_guess():
            seqs = {row: ids[row, padding[row] : prompt_length + produced[row]] for row in guessing}
            banned = {row: min_new - produced[row] for row in guessing}  # guess i is token produced + i
            guesses = proposer.propose(seqs, {row: limits[row] for row in guessing}, banned)
        width = 1 + max((len(g) for g in guesses.values()), default=0)
        fed = torch.full((batch, width), pad, dtype=torch.long, device=device)
        real = torch.zeros(batch, width, dtype=torch.bool, device=device)
        for row in active:
            g = guesses.get(row, [])
            fed[row, 0] = ids[row, prompt_length + produced[row] - 1]
            fed[row, 1 : 1 + len(g)] = torch.tensor(g, dtype=torch.long, device=device)
            real[row, : 1 + len(g)] = True
        logits = main.forward(fed, real)  # (batch, width, vocab)
        stats.rounds += 1
        keep = main.lengths.clone()
        guessed = any(guesses.values())
        all_accepted, settled = guessed, 0
        for row in active:
            g = guesses.get(row, [])
            stats.proposed += len(g)
            taken = 0
            for i in range(len(g) + 1):
                token, scores = choose(row, logits[row, i], g[i] if i < len(g) else None, i)
                ids[row, prompt_length + produced[row]] = token
                produced[row] += 1
                held[row].append((token, scores))
                settled += 1
                if token in eos or produced[row] >= max_new_tokens:
                    finished[row] = True
                    break
                if i == len(g) or token != g[i]:
                    break
                taken += 1
            stats.accepted += taken
            all_accepted = all_accepted and taken == len(g)
            keep[row] -= len(g) - taken  # the pending token and the accepted guesses stay cached
        main.truncate(keep)
        lengths = {row: prompt_length + produced[row] - padding[row] for row in active if not finished[row]}
        proposer.settled(lengths, all_accepted)
        governor.record(guessed, time.perf_counter() - started, settled / len(active))

    while True:
        if not all(held[row] for row in range(batch) if not done[row]):
            round_of_guesses()
        while all(held[row] for row in range(batch) if not done[row]):
            picked = [held[row].popleft() if not done[row] else None for row in range(batch)]
            tokens = torch.tensor([p[0] if p else pad for p in picked], dtype=torch.long, device=device)
            scores = torch.stack([p[1] if p else _chose(pad, picked) for p in picked])
            yield Step(tokens, done.clone(), scores)
            emitted += 1
            if eos:
                done |= torch.isin(tokens, eos_tensor)
            if stop_check is not None:
                done |= stop_check(tokens, done)
            if bool(done.all()) or emitted >= max_new_tokens:
                return
            for row in done.nonzero().flatten().tolist():
                finished[row] = True
                held[row].clear()


def _chose(token: int, picked: list) -> torch.Tensor:
    """The scores of a row that is done: certain of the pad token it gets."""
    like = next(p[1] for p in picked if p)
    scores = torch.full_like(like, -float("inf"))
    scores[token] = 0
    return scores
