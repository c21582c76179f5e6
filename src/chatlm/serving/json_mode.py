"""``response_format: {"type": "json_object"}``: the reply is kept a prefix of one JSON object, token by token.

`JsonPrefix` reads text a character at a time and says whether it can still begin a JSON object (RFC 8259) and
whether one is complete. `JsonConstraint` is its sampler constraint (`generation.sampling.Constraint`): the
sampler tries the model's candidates in order of preference (or draws, and draws again without a candidate that
breaks the JSON), and the reply ends once the object is closed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from ..detokenize import StreamingDetokenizer

_WHITESPACE = " \t\n\r"
_ESCAPES = '"\\/bfnrtu'
_HEX = "0123456789abcdefABCDEF"
_DIGITS = "0123456789"


class JsonPrefix:
    """``arrays=True``: the top-level value may be an array too (of tool calls, as Mistral writes them)."""

    def __init__(self, arrays: bool = False):
        self.arrays = arrays
        self.stack: list[str] = []  # open containers: "{" or "["
        self.state = "start"  # what may come next (see `_step`)
        self.literal = ""  # the rest of true / false / null being read
        self.hex_left = 0
        self.in_key = False

    @property
    def complete(self) -> bool:
        return self.state == "done"

    @property
    def in_string(self) -> bool:
        return self.state in ("string", "escape", "hex")

    def copy(self) -> JsonPrefix:
        return copy.deepcopy(self)

    def feed(self, text: str) -> bool:
        """Read ``text``; False (and a state not to use again) if it cannot continue a JSON object."""
        return all(self._step(c) for c in text)

    # The states: start (only '{' after whitespace), value (any value), key_or_close ('"' or '}'), key ('"'),
    # colon, value_or_close (a value or ']'), after_value (',' or the closing bracket), string, escape, hex,
    # literal, number_* (a number being read), done (only whitespace).
    def _step(self, c: str) -> bool:
        state = self.state
        if state == "string":
            if c == '"':
                self._end_string()
            elif c == "\\":
                self.state = "escape"
            elif ord(c) < 0x20:
                return False
            return True
        if state == "escape":
            if c not in _ESCAPES:
                return False
            self.state, self.hex_left = ("hex", 4) if c == "u" else ("string", 0)
            return True
        if state == "hex":
            if c not in _HEX:
                return False
            self.hex_left -= 1
            if not self.hex_left:
                self.state = "string"
            return True
        if state == "literal":
            if c != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._end_value()
            return True
        if state.startswith("number"):
            if self._number(c):
                return True
            if state not in ("number_zero", "number_int", "number_frac", "number_exp"):
                return False  # a number cannot end after '-', '.', 'e' or the exponent's sign
            self._end_value()
            return self._step(c)
        if c in _WHITESPACE:
            return True
        if state == "start":
            return self._open(c) if c == "{" or (c == "[" and self.arrays) else False
        if state == "done":
            return False
        if state in ("value", "value_or_close"):
            if c == "]" and state == "value_or_close":
                return self._close(c)
            return self._value(c)
        if state in ("key_or_close", "key"):
            if c == "}" and state == "key_or_close":
                return self._close(c)
            if c == '"':
                self.state, self.in_key = "string", True
                return True
            return False
        if state == "colon":
            if c == ":":
                self.state = "value"
                return True
            return False
        if state == "after_value":
            if c == ",":
                self.state = "key" if self.stack[-1] == "{" else "value"
                return True
            if c in "}]":
                return self._close(c)
        return False

    def _value(self, c: str) -> bool:
        if c in "{[":
            return self._open(c)
        if c == '"':
            self.state, self.in_key = "string", False
            return True
        for word in ("true", "false", "null"):
            if c == word[0]:
                self.state, self.literal = "literal", word[1:]
                return True
        if c == "-":
            self.state = "number_minus"
            return True
        if c in _DIGITS:
            self.state = "number_zero" if c == "0" else "number_int"
            return True
        return False

    def _number(self, c: str) -> bool:
        state = self.state
        moves = {
            "number_minus": {**dict.fromkeys("0", "number_zero"), **dict.fromkeys("123456789", "number_int")},
            "number_zero": {".": "number_dot", "e": "number_e", "E": "number_e"},
            "number_int": {
                **dict.fromkeys(_DIGITS, "number_int"),
                ".": "number_dot",
                "e": "number_e",
                "E": "number_e",
            },
            "number_dot": dict.fromkeys(_DIGITS, "number_frac"),
            "number_frac": {**dict.fromkeys(_DIGITS, "number_frac"), "e": "number_e", "E": "number_e"},
            "number_e": {**dict.fromkeys(_DIGITS, "number_exp"), "+": "number_sign", "-": "number_sign"},
            "number_sign": dict.fromkeys(_DIGITS, "number_exp"),
            "number_exp": dict.fromkeys(_DIGITS, "number_exp"),
        }[state]
        if c in moves:
            self.state = moves[c]
            return True
        return False

    def _open(self, c: str) -> bool:
        self.stack.append(c)
        self.state = "key_or_close" if c == "{" else "value_or_close"
        return True

    def _close(self, c: str) -> bool:
        if not self.stack or self.stack[-1] != ("{" if c == "}" else "["):
            return False
        self.stack.pop()
        self._end_value()
        return True

    def _end_string(self) -> None:
        if self.in_key:
            self.state, self.in_key = "colon", False
        else:
            self._end_value()

    def _end_value(self) -> None:
        self.state = "after_value" if self.stack else "done"


class JsonConstraint:
    """A row's reply is kept a JSON object's prefix, token by token. ``prefix``: JSON the prompt already began (a
    forced tool call's opening), which the reply goes on with; ``starts``: the reply begins with one of these (a
    forced call's name and its closing quote). End of sequence only once the object is complete."""

    def __init__(
        self,
        tokenizer,
        eos: Iterable[int],
        prefix: str = "",
        starts: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ):
        self.eos, self.starts = frozenset(eos), starts
        self.state = JsonPrefix(arrays=prefix.startswith("["))
        self.state.feed(prefix)
        self.text = StreamingDetokenizer(tokenizer, (), skip_special_tokens)
        self.read = 0  # characters of the decoded text the JSON state has read

    @property
    def complete(self) -> bool:
        return self.state.complete

    def allows(self, token: int) -> bool:
        if token in self.eos:
            return self.complete
        text = self.text.peek(token)
        so_far = self.text.text + text
        if self.starts and not any(s.startswith(so_far) or so_far.startswith(s) for s in self.starts):
            return False
        state = self.state.copy()
        if text.endswith("\ufffd"):  # a character split across tokens: only inside a string
            return state.feed(text.rstrip("\ufffd")) and state.in_string
        return bool(text) and state.feed(text)

    def advance(self, token: int) -> None:
        if token in self.eos:
            return
        self.text.add(token)
        self.state.feed(self.text.text[self.read :])
        self.read = len(self.text.text)

    def copy(self) -> JsonConstraint:
        twin = copy.copy(self)
        twin.state = self.state.copy()
        twin.text = self.text.copy()
        return twin
