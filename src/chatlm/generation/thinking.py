"""A reasoning model's reply: a thinking section between two tags, then the answer. `ThinkingConstraint` (a
sampler `Constraint`) follows the reply through them, token by token:

- a **budget**: once the section has taken ``budget`` tokens without closing, the next tokens are the closing
  text (a newline, the closing tag, a blank line: how the templates render a finished section), and the
  answer follows. The budget counts the section's tokens after its opening tag;
- an **answer constraint** (a JSON schema's grammar): it holds the answer only, so that the model thinks
  freely first (a reply that starts with the answer goes straight to it).

The section may open in the prompt (templates that pre-fill the opening tag), or in the reply; a prompt that
closes it already (thinking turned off by the template) leaves only the answer.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch

from .sampling import Constraint

BEFORE, THINKING, CLOSING, ANSWER = "before", "thinking", "closing", "answer"


class ThinkingConstraint:
    """One row's place in its reply. ``tags``: the section's opening and closing tags; ``prompt``: the text the
    reply continues (where the section may have opened or closed); ``budget``: tokens the section may take (None:
    no limit); ``answer``: makes the answer's constraint (None: a free answer)."""

    def __init__(
        self,
        tokenizer,
        tags: tuple[str, str],
        prompt: str,
        vocab_size: int,
        budget: int | None = None,
        answer: Callable[[], Constraint] | None = None,
    ):
        self.tokenizer, self.tags, self.budget, self.vocab_size = tokenizer, tags, budget, vocab_size
        self.answer = answer() if answer is not None else None
        opened, closed = prompt.rfind(tags[0]), prompt.rfind(tags[1])
        tail = prompt.rstrip()
        if tail.endswith(tags[1]):
            self.state = ANSWER
        elif opened > closed and not prompt[opened + len(tags[0]) :].strip():
            self.state = THINKING
        else:
            self.state = BEFORE
        self.text = ""  # the reply's text since the state last changed
        self.spent = 0  # tokens of the section so far
        self.forced: list[int] = []  # the closing text's tokens still to come
        self._open_ids = tokenizer(tags[0], add_special_tokens=False)["input_ids"]

    @property
    def complete(self) -> bool:
        return self.state == ANSWER and self.answer is not None and self.answer.complete

    def mask(self) -> torch.Tensor | None:
        if self.state == CLOSING:
            return self._only(self.forced[0])
        if self.state == ANSWER:
            return self.answer.mask() if self.answer is not None else None
        if self.state == BEFORE and self.answer is not None:
            # the answer's first token, or the section's opening tag
            allowed = self.answer.mask()
            if allowed is None:
                return None
            allowed = allowed.clone()
            allowed[self._open_ids[0]] = True
            return allowed
        if self.state == THINKING and self.budget is not None and self.spent >= self.budget:
            return self._only(self._closing()[0])
        return None

    def advance(self, token: int) -> None:
        if self.state == ANSWER:
            if self.answer is not None:
                self.answer.advance(token)
            return
        if self.state == CLOSING:
            self.forced.pop(0)
            if not self.forced:
                self._enter(ANSWER)
            return
        piece = self.tokenizer.decode([token], skip_special_tokens=False)
        if self.state == BEFORE:
            self.text += piece
            opening = self.text.lstrip()
            if opening.startswith(self.tags[0]):
                self._enter(THINKING)
            elif not self.tags[0].startswith(opening):
                # the reply went straight to the answer: its first token belongs to it
                self.state = ANSWER
                if self.answer is not None:
                    self.answer.advance(token)
            return
        # thinking
        if self.budget is not None and self.spent >= self.budget:
            self.forced = self._closing()[1:]  # this token was the closing text's first
            self.state = CLOSING if self.forced else ANSWER
            if not self.forced:
                self._enter(ANSWER)
            return
        self.spent += 1
        self.text += piece
        if self.tags[1] in self.text:
            self._enter(ANSWER)

    def copy(self) -> ThinkingConstraint:
        twin = copy.copy(self)
        twin.forced = list(self.forced)
        twin.answer = self.answer.copy() if self.answer is not None else None
        return twin

    def _enter(self, state: str) -> None:
        self.state, self.text = state, ""

    def _closing(self) -> list[int]:
        """The tokens that close the section from here: its text goes on with a newline unless it ends with
        one, the closing tag, and a blank line before the answer."""
        newline = "" if self.text.endswith("\n") else "\n"
        return self.tokenizer(f"{newline}{self.tags[1]}\n\n", add_special_tokens=False)["input_ids"]

    def _only(self, token: int) -> torch.Tensor:
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        allowed[token] = True
        return allowed


def reply_constraint(
    turn,
    tokenizer,
    vocab_size: int,
    budget: int | None = None,
    answer: Callable[[], Constraint] | None = None,
) -> Callable[[], Constraint] | None:
    """The per-row constraint factory of a chat turn's reply (a `chatlm.chat_turn.ChatTurn`): ``answer`` (a
    grammar) alone, or, for a reasoning model, the thinking section first with its ``budget`` (None: neither)."""
    tags = turn.reply_format.reasoning
    if tags is None or turn.forced or (budget is None and answer is None):
        return answer
    return functools.partial(ThinkingConstraint, tokenizer, tags, turn.prompt, vocab_size, budget, answer)
