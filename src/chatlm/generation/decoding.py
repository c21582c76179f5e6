"""The one decode-step loop: ``generate``, speculative decoding and the server's batch all drive `Decoder`.

A `Decoder` holds the rows of a batch that decode together in one cache whose rows may advance unevenly (a
`RaggedCache`, or the server's `ModelSide` in front of one). Each row has a `RowSampler` (how it chooses), its
tokens and, when it needs text (stop strings, the server's replies), a text stream. A row's last token is
*pending*: chosen, not yet in the cache. Each `step` feeds every row its pending token, plus the guesses of a
proposer when speculating, in one forward pass; the row's sampler then settles one token after each fed token,
keeping guesses while they match (greedy) or while the rejection rule keeps them (sampling), and the cache forgets
the rejected ones. `finish_reason` is the one rule for how a row ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .sampling import RowSampler, TokenLogprob


@dataclass
class Settled:
    """A token a row settled: the text it made certain (rows with a text stream), the processed scores and the
    raw logits it was chosen from, its log-probability when asked, and the row's finish reason if it ended."""

    token: int
    text: str
    scores: torch.Tensor | None
    logits: torch.Tensor | None
    logprob: TokenLogprob | None
    finish_reason: str | None


class Row:
    """One sequence being decoded. ``tokens``: its real tokens so far (the prompt's, then the generated ones; the
    last one pending once it has one). ``text``: a `StreamingDetokenizer` that releases its text and watches for stop
    strings, or None."""

    def __init__(self, sampler: RowSampler, tokens: list[int], text=None):
        self.sampler, self.tokens, self.text = sampler, list(tokens), text
        self.finish_reason: str | None = None

    @property
    def produced(self) -> int:
        return self.sampler.produced

    @property
    def room(self) -> int:
        """Tokens the row may still generate."""
        return self.sampler.params.max_tokens - self.sampler.produced


def finish_reason(row: Row, token: int) -> str | None:
    """Why the row ends with ``token``, if it does: "stop" for an end-of-sequence token, a stop string or a
    complete constrained reply; "length" once it has its ``max_tokens``."""
    sampler = row.sampler
    if token in sampler.eos:
        return "stop"
    if (row.text is not None and row.text.stopped) or (
        sampler.constraint is not None and sampler.constraint.complete
    ):
        return "stop"
    if sampler.produced >= sampler.params.max_tokens:
        return "length"
    return None


class Decoder:
    """The rows of a batch and the step that advances them. ``cache``: ``forward(tokens, real)`` → logits and
    ``truncate(lengths)`` over its rows (`RaggedCache`). ``proposer`` (with ``governor`` and ``stats``): guesses
    to check each step (speculative decoding). ``keep_scores``: settled tokens carry their scores and logits.
    ``isolate_rows`` (the server): an exception while one row chooses its token (a constraint's bug, scores that
    are not numbers) ends that row with finish reason "error" and the exception in `failed`, and the other rows
    go on; otherwise (``generate``) it propagates."""

    def __init__(
        self,
        cache,
        proposer=None,
        governor=None,
        stats=None,
        keep_scores: bool = False,
        isolate_rows: bool = False,
    ):
        self.cache, self.proposer, self.governor, self.stats = cache, proposer, governor, stats
        self.keep_scores, self.isolate_rows = keep_scores, isolate_rows
        self.rows: dict[int, Row] = {}
        self.failed: dict[int, Exception] = {}  # rows that ended with an error, until the owner takes them
        if proposer is not None:
            proposer.start(cache)

    def add(self, index: int, row: Row, logits: torch.Tensor | None = None) -> list[Settled]:
        """Row ``index`` of the cache joins, its prompt cached. With ``logits`` (the raw logits after the
        prompt's last token), its first token is settled now; without, the prompt's last token is pending (not
        cached) and the next step feeds it."""
        self.rows[index] = row
        if logits is None:
            return []
        try:
            return [self._settle(row, logits)]
        except Exception as error:
            self._fail(index, row, error)
            return []

    def _fail(self, index: int, row: Row, error: Exception) -> None:
        if not self.isolate_rows:
            raise error
        row.finish_reason = "error"
        self.failed[index] = error

    def drop(self, index: int) -> None:
        self.rows.pop(index, None)

    def step(self) -> dict[int, list[Settled]]:
        """One forward pass for every unfinished row: the tokens each settled."""
        active = {i: row for i, row in self.rows.items() if row.finish_reason is None}
        if not active:
            return {}
        started = time.perf_counter()
        if self.cache.stale():
            guesses, logits = {}, self._recompute(active)
        else:
            guesses = self._guesses(active)
            width = 1 + max((len(g) for g in guesses.values()), default=0)
            fed = torch.zeros(self.cache.rows, width, dtype=torch.long)
            real = torch.zeros(self.cache.rows, width, dtype=torch.bool)
            for i, row in active.items():
                g = guesses.get(i, ())
                fed[i, : 1 + len(g)] = torch.tensor([row.tokens[-1], *g], dtype=torch.long)
                real[i, : 1 + len(g)] = True
            device = self.cache.device
            logits = self.cache.forward(fed.to(device), real.to(device))  # (rows, width, vocab)
        plain = self._plain_greedy(active, guesses, logits)
        settled: dict[int, list[Settled]] = {}
        keep = self.cache.lengths.clone() if guesses else None
        all_accepted, count = bool(guesses), 0
        for i, row in active.items():
            g = guesses.get(i, [])
            try:
                drafts = self.proposer.distributions.get(i) if g else None
                out = self._settle_row(row, logits[i], g, plain.get(i), drafts)
            except Exception as error:
                self._fail(i, row, error)
                if g:  # none of its guesses stays cached
                    keep[i] -= len(g)
                continue
            settled[i] = out
            count += len(out)
            if g:
                taken = _accepted(out, g)
                self.stats.proposed += len(g)
                self.stats.accepted += taken
                all_accepted = all_accepted and taken == len(g)
                keep[i] -= len(g) - taken  # the pending token and the accepted guesses stay cached
        if self.stats is not None:
            self.stats.rounds += 1
        if keep is not None:
            self.cache.truncate(keep)
        if self.proposer is not None:
            lengths = {i: len(row.tokens) for i, row in active.items() if row.finish_reason is None}
            self.proposer.settled(lengths, all_accepted)
            self.governor.record(bool(guesses), time.perf_counter() - started, count / len(active))
        return settled

    def _settle_row(
        self, row: Row, logits: torch.Tensor, guesses: list[int], plain: int | None, drafts
    ) -> list[Settled]:
        """The tokens one row settles from its ``logits`` (width, vocab): the argmax ``plain`` already taken, or
        a choice after each fed token while its guesses hold (``drafts``: the draft's distributions, if any)."""
        if plain is not None:
            return [self._settle(row, logits[0], chosen=plain)]
        out: list[Settled] = []
        for k in range(len(guesses) + 1):
            guess = guesses[k] if k < len(guesses) else None
            draft = drafts[k] if drafts and guess is not None else None
            out.append(self._settle(row, logits[k], guess, draft))
            if out[-1].finish_reason is not None or guess is None or out[-1].token != guess:
                break
        return out

    def _recompute(self, active: dict[int, Row]) -> torch.Tensor:
        """The cached keys went stale (Phi-3's switch to its long rope factors): the rows' whole sequences again,
        in one call, from an empty cache; the logits after each row's pending token."""
        width = max(len(row.tokens) for row in active.values())
        fed = torch.zeros(self.cache.rows, width, dtype=torch.long)
        real = torch.zeros(self.cache.rows, width, dtype=torch.bool)
        for i, row in active.items():  # right-aligned: every row's pending token in the last column
            fed[i, width - len(row.tokens) :] = torch.tensor(row.tokens, dtype=torch.long)
            real[i, width - len(row.tokens) :] = True
        self.cache.truncate(torch.zeros_like(self.cache.lengths))
        device = self.cache.device
        return self.cache.forward(fed.to(device), real.to(device), logits_to_keep=1)

    def _guesses(self, active: dict[int, Row]) -> dict[int, list[int]]:
        if self.proposer is None:
            return {}
        # a row may guess up to the tokens it has room for after the pending one's successor
        limits = {i: row.room - 1 for i, row in active.items() if row.room > 1}
        if not limits or not self.governor.should_guess():
            return {}
        seqs = {i: torch.tensor(active[i].tokens, dtype=torch.long) for i in limits}
        guesses = self.proposer.propose(seqs, limits, {i: active[i].sampler for i in limits})
        return {i: g for i, g in guesses.items() if g}

    def _plain_greedy(self, active, guesses, logits) -> dict[int, int]:
        """The tokens of the rows that take the argmax of their raw logits and have no guesses, in one call."""
        rows = [i for i, row in active.items() if row.sampler.plain_greedy and i not in guesses]
        if not rows:
            return {}
        index = torch.tensor(rows)
        # max propagates NaN, argmax would pick it: a row whose logits hold NaN goes the long way, where the
        # sampler refuses it
        top, chosen = logits[index, 0].max(-1)
        finite = (~top.isnan()).tolist()
        return {i: t for i, t, ok in zip(rows, chosen.tolist(), finite) if ok}

    def _settle(
        self,
        row: Row,
        logits: torch.Tensor,
        guess: int | None = None,
        draft: torch.Tensor | None = None,
        chosen: int | None = None,
    ) -> Settled:
        sampler = row.sampler
        if chosen is None:
            token, scores = sampler.choose(logits, guess, draft)
        else:
            token, scores = chosen, (logits.float() if self.keep_scores else None)
        logprob = sampler.logprob(logits, token)
        sampler.take(token)
        row.tokens.append(token)
        text = ""
        if row.text is not None:
            text = row.text.finish() if token in sampler.eos else row.text.add(token)
        reason = finish_reason(row, token)
        if reason is not None:
            row.finish_reason = reason
            if row.text is not None and token not in sampler.eos:
                text += row.text.finish()
        return Settled(
            token,
            text,
            scores if self.keep_scores else None,
            logits if self.keep_scores else None,
            logprob,
            reason,
        )


def _accepted(out: list[Settled], guesses: list[int]) -> int:
    """How many guesses the settled tokens kept: those equal to the guess in their place, up to the first miss."""
    taken = 0
    for settled, guess in zip(out, guesses):
        if settled.token != guess:
            break
        taken += 1
    return taken
