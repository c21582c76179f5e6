"""Token ids to streamed text, one id at a time, for the streamers and the server.

Joined, the pieces equal ``tokenizer.decode(all ids)``, cut before the first stop string when there are any.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class StreamingDetokenizer:
    """Turn token ids into text one id at a time, giving out each piece as soon as it is final.

    Each new id is decoded together with the ids of the previous piece and the text of that piece is cut off: so
    a SentencePiece word keeps its leading space (it is only dropped at the start of a decode), and the work per
    token stays small. A decode that ends in U+FFFD is an unfinished UTF-8 character (an emoji split over byte
    tokens): we wait for the next id. After a SentencePiece byte token (``<0xF0>``) we wait too: byte fallback
    decodes a run of byte tokens as a whole, and a run that ends invalid turns into U+FFFD from its start,
    characters already complete included.

    With ``stops`` (the server's stop strings), text that may begin a stop string is held back until it is known
    not to, and the stream ends before the first one (OpenAI leaves the stop sequence out of the reply):
    `stopped` then says so.
    """

    def __init__(
        self,
        tokenizer,
        stops: Iterable[str] = (),
        skip_special_tokens: bool = False,
        **decode_kwargs,
    ):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.skip_special_tokens = skip_special_tokens
        self.decode_kwargs = decode_kwargs
        self._window: list[int] = []  # the ids of the last piece, then the ids not decoded yet
        self._settled = 0  # how many ids of the window belong to the last piece
        self._settled_text = ""  # their decode
        self._pieces: list[str] = []  # the decoded text, in pieces (joined when `text` is read)
        self._unsent = ""  # the end of it not given out yet
        self.stopped = False
        self.matched_stop: str | None = None  # the stop string the text ended at

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, **self.decode_kwargs)

    def add(self, token_id: int) -> str:
        """Take one id; return the text it makes final (maybe "")."""
        self._window.append(int(token_id))
        if not _BYTE_TOKEN.fullmatch(self.tokenizer.convert_ids_to_tokens(int(token_id)) or ""):
            text = self._decode(self._window)
            if len(text) > len(self._settled_text) and not text.endswith("\ufffd"):
                self._settle(text)
        return self._release(final=False)

    def peek(self, token_id: int) -> str:
        """The text that `token_id` would add after the text decoded so far, without taking it (for constrained
        decoding, which tries candidates)."""
        return self._decode([*self._window, int(token_id)])[len(self._settled_text) :]

    def finish(self) -> str:
        """Everything not given out yet, unfinished characters included (as decode would show them): the
        sequence ended."""
        text = self._decode(self._window)
        if len(text) > len(self._settled_text):
            self._settle(text)
        return self._release(final=True)

    flush = finish  # the streamers' name for it

    def copy(self) -> StreamingDetokenizer:
        """An independent copy of the stream so far, sharing the tokenizer."""
        twin = copy.copy(self)
        twin._window, twin._pieces = list(self._window), list(self._pieces)
        return twin

    @property
    def text(self) -> str:
        """All the text decoded so far (with stop strings, some of it may not be given out yet)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _settle(self, text: str) -> None:
        piece = text[len(self._settled_text) :]
        # The ids just decoded become the context for the next ones.
        self._window = self._window[self._settled :]
        self._settled = len(self._window)
        self._settled_text = self._decode(self._window)
        self._pieces.append(piece)
        self._unsent += piece

    def _release(self, final: bool) -> str:
        """The decoded text that can be given out now."""
        if self.stopped:
            return ""
        end = len(self._unsent)
        if self.stops:
            hits = [(at, i) for i, at in enumerate(self._unsent.find(s) for s in self.stops) if at >= 0]
            if hits:
                # the one that begins first (the first given, of those that begin there)
                at, which = min(hits)
                self.stopped, self.matched_stop = True, self.stops[which]
                out, self._unsent = self._unsent[:at], ""
                return out
            if not final:
                end -= self._held()
        out, self._unsent = self._unsent[:end], self._unsent[end:]
        return out

    def _held(self) -> int:
        """Characters at the end that begin some stop string: they wait until they are known not to."""
        tail = self._unsent
        for length in range(min(len(tail), max(len(s) for s in self.stops) - 1), 0, -1):
            if any(s.startswith(tail[-length:]) for s in self.stops):
                return length
        return 0
