"""Token ids to streamed text: deltas that never split a character, hold back what may start a stop string, and
end before a stop string (OpenAI leaves the stop sequence out of the reply)."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.prefix = (
            0  # tokens[prefix:read] were decoded last time: the context that spaces a new token right
        )
        self.read = 0
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of it handed out
        self.stopped = False

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, force: bool) -> None:
        before = self._decode(self.tokens[self.prefix : self.read])
        after = self._decode(self.tokens[self.prefix :])
        if after.endswith("\ufffd") and not force:  # a character split across tokens: wait for the rest
            return
        self.text += after[len(before) :]
        self.prefix, self.read = self.read, len(self.tokens)

    def add(self, token: int) -> str:
        """The text that can be handed out now that ``token`` came."""
        self.tokens.append(token)
        self._advance(force=False)
        return self._release()

    def peek(self, token: int) -> str:
        """The text that ``token`` would add after the text decoded so far (without taking it)."""
        before = self._decode(self.tokens[self.prefix : self.read])
        return self._decode(self.tokens[self.prefix :] + [token])[len(before) :]

    def finish(self) -> str:
        """Everything not handed out yet (the sequence ended)."""
        self._advance(force=True)
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        if self.stops:
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                out, self.sent = self.text[self.sent : min(hits)], len(self.text)
                return out
            if not final:
                end -= self._held()
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def _held(self) -> int:
        """Characters at the end that begin some stop string: they wait until they are known not to."""
        tail = self.text[self.sent :]
        for length in range(min(len(tail), max(len(s) for s in self.stops) - 1), 0, -1):
            if any(s.startswith(tail[-length:]) for s in self.stops):
                return length
        return 0
