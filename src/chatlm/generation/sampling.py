"""Token choice: one vocabulary of sampling options (`SamplingParams`) and one per-row sampler (`RowSampler`) that
``generate``, every speculative check and the server's batch use.

A row's scores go through, in this order (transformers' order; OpenAI's penalties sit with the other penalty):
0. ``logit_bias`` (OpenAI): a bias added to the logits of the tokens it names, before anything else;
1. ``repetition_penalty`` (transformers / CTRL): the score of every token seen in the prompt or the output is
   divided by the penalty when positive, multiplied when negative;
2. ``frequency_penalty`` and ``presence_penalty`` (OpenAI): minus ``frequency * count + presence * (count > 0)``
   over the tokens of the output only;
3. end-of-sequence tokens are banned while fewer than ``min_tokens`` were generated;
4. a `Constraint` (a grammar: a JSON schema, JSON mode, a forced tool call; a reasoning budget) masks the tokens
   it does not allow (before the warpers, so that they pick among allowed tokens);
5. when sampling (``temperature`` at least ``MIN_TEMPERATURE``; below it, greedy): temperature, top-k, top-p,
   min-p.
Then the argmax (greedy) or a draw; a speculative guess is kept or replaced by the rejection rule (`accept`), so
a guess the constraint refuses is always replaced (its probability is 0).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (token ids so far, scores) -> scores


class Constraint(Protocol):
    """A per-row limit on what may come next: `mask` gives the tokens that may be next ((vocab,) bool; None: any
    this step), `advance` takes the chosen one, and `complete` says that the constrained text is whole (the
    reply ends there)."""

    complete: bool

    def mask(self) -> torch.Tensor | None: ...

    def advance(self, token: int) -> None: ...

    def copy(self) -> Constraint: ...


MIN_TEMPERATURE = 1e-5  # a lower temperature samples as greedy decoding


@dataclass
class SamplingParams:
    """How a row chooses its tokens and when it ends: the union of transformers' and OpenAI's options."""

    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    min_tokens: int = 0  # end-of-sequence tokens are banned until this many were generated
    stop: tuple[str, ...] = ()  # stop strings: the row ends once its text holds one
    stop_token_ids: tuple[int, ...] = ()  # more tokens that end the row, besides the model's end of sequence
    constraint: Callable[[], Constraint] | None = None  # makes each row's constraint (JSON mode)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias): added to the logits first (OpenAI)

    @property
    def greedy(self) -> bool:
        # below the floor, dividing by the temperature overflows to inf/nan: the limit is the argmax (vLLM's rule)
        return self.temperature < MIN_TEMPERATURE

    @classmethod
    def from_generation_config(cls, config, prompt_length: int, max_new_tokens: int) -> SamplingParams:
        """``generate``'s options: sampling warpers only when ``do_sample`` (as transformers), ``min_length``
        counted with the prompt."""
        sample = config.do_sample
        return cls(
            max_tokens=max_new_tokens,
            temperature=(config.temperature if config.temperature is not None else 1.0) if sample else 0.0,
            top_k=(config.top_k or 0) if sample else 0,
            top_p=(config.top_p if config.top_p is not None else 1.0) if sample else 1.0,
            min_p=(config.min_p or 0.0) if sample else 0.0,
            repetition_penalty=config.repetition_penalty if config.repetition_penalty is not None else 1.0,
            min_tokens=config.min_new_tokens or max(0, (config.min_length or 0) - prompt_length),
            stop=tuple(
                [config.stop_strings] if isinstance(config.stop_strings, str) else config.stop_strings or ()
            ),
            stop_token_ids=tuple(config.eos_token_ids),
        )


# --- the processors: pure functions over (batch, vocab) float32 scores --------------------------------------------


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


def warpers(params: SamplingParams) -> list[Processor]:
    """The sampling warpers in transformers' order (none when greedy)."""
    if params.greedy:
        return []
    processors: list[Processor] = []
    if params.temperature != 1.0:
        processors.append(temperature(params.temperature))
    if params.top_k:
        processors.append(top_k(params.top_k))
    if params.top_p < 1.0:
        processors.append(top_p(params.top_p))
    if params.min_p:
        processors.append(min_p(params.min_p))
    return processors


# --- one row's choice ----------------------------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model (its raw logits) and the ``k`` most likely tokens'."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class RowSampler:
    """One sequence's token choice and the state it needs: the tokens seen (repetition penalty), the counts of
    the tokens generated (OpenAI's penalties), how many were generated (``min_tokens``), its random generator and
    its constraint. ``context``: the prompt's real tokens."""

    def __init__(
        self,
        params: SamplingParams,
        context: Sequence[int] | torch.Tensor,
        eos: Sequence[int],
        vocab_size: int,
        generator: torch.Generator | None = None,
        constraint: Constraint | None = None,
    ):
        self.params, self.eos, self.generator, self.constraint = params, list(eos), generator, constraint
        self.processors = warpers(params)
        self.produced = 0
        self.history: torch.Tensor | None = None  # seen token ids, for the repetition penalty
        if params.repetition_penalty != 1.0:
            context = torch.as_tensor(context, dtype=torch.long).flatten().cpu()
            self.history = torch.empty(1, context.numel() + params.max_tokens, dtype=torch.long)
            self.history[0, : context.numel()] = context
            self.seen = context.numel()
        self.counts = torch.zeros(vocab_size) if params.presence_penalty or params.frequency_penalty else None
        self.bias = None  # (token ids, biases)
        if params.logit_bias:
            ids, biases = zip(*params.logit_bias)
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise ValueError(
                    f"logit_bias names a token id outside the vocabulary (0 to {vocab_size - 1})"
                )
            self.bias = (torch.tensor(ids, dtype=torch.long), torch.tensor(biases, dtype=torch.float32))

    @property
    def plain_greedy(self) -> bool:
        """The choice is the argmax of the raw logits (a batch takes all such rows' tokens at once)."""
        return (
            self.params.greedy
            and self.history is None
            and self.counts is None
            and self.bias is None
            and self.constraint is None
            and (self.produced >= self.params.min_tokens or not self.eos)
        )

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The processed scores (1, vocab) of the raw logits (vocab,) of the row's next token."""
        scores = logits.float()[None]
        p = self.params
        if self.bias is not None:
            scores = scores.index_add(1, self.bias[0], self.bias[1][None])
        if self.history is not None:
            scores = repetition_penalty(p.repetition_penalty)(self.history[:, : self.seen], scores)
        if self.counts is not None:
            scores = (
                scores - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
            )
        # Token bans come before the warpers (as transformers orders its processors): top-k/top-p/min-p then
        # pick among the allowed tokens, instead of keeping only banned ones and leaving nothing to choose.
        if self.produced < p.min_tokens and self.eos:
            # not in place: the raw logits stay as they are (logprobs)
            scores = scores.index_fill(1, torch.tensor(self.eos), -float("inf"))
        if self.constraint is not None:
            allowed = self.constraint.mask()
            if allowed is not None:
                scores = scores.masked_fill(~allowed[None], -float("inf"))
        for process in self.processors:
            scores = process(None, scores)
        return scores

    def choose(
        self, logits: torch.Tensor, guess: int | None = None, draft: torch.Tensor | None = None
    ) -> tuple[int, torch.Tensor]:
        """The next token and the processed scores (vocab,) it was chosen from. With a speculative ``guess`` (and
        the ``draft`` distribution it was drawn from, if any), sampling keeps or replaces it by `accept`."""
        scores = self.scores(logits)[0]
        top = float(scores.max())  # one pass: NaN anywhere makes it NaN
        if top == -math.inf:  # the constraint allows nothing more: end here
            return next(iter(self.eos), int(logits.argmax())), scores
        if not math.isfinite(top):
            raise ValueError(
                "the model's scores for the next token are not finite numbers (NaN or inf): the weights or the "
                "computation went wrong"
            )
        if self.params.greedy:
            return int(scores.argmax()), scores
        return accept(scores.softmax(-1), guess, draft, self.generator), scores

    def take(self, token: int) -> None:
        """The row's next token is ``token``."""
        self.produced += 1
        if self.history is not None:
            self.history[0, self.seen] = token
            self.seen += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.constraint is not None:
            self.constraint.advance(token)

    def fork(self) -> RowSampler:
        """A copy that a draft can advance through its guesses without touching this row."""
        twin = copy.copy(self)
        twin.history = None if self.history is None else self.history.clone()
        twin.counts = None if self.counts is None else self.counts.clone()
        twin.constraint = None if self.constraint is None else self.constraint.copy()
        return twin

    def logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob | None:
        """``params.logprobs``: the chosen token's log-probability and the k most likely, from the raw logits."""
        k = self.params.logprobs
        if k is None:
            return None
        logprobs = logits.float().log_softmax(-1)
        top = torch.topk(logprobs, k) if k else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return TokenLogprob(token, float(logprobs[token]), pairs)


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
