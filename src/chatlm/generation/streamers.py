"""Streamers: print or hand over generated text while `generate` runs, with transformers' interface.

`generate` calls ``streamer.put(prompt_ids)`` once, then ``put`` with each new token (a tensor of shape (1,) or
(1, 1)), then ``end()``. Unlike transformers, which holds text back until a space or a CJK character, these give
out text as soon as it is final UTF-8 (see `StreamingDetokenizer`); the text in the end is the same.
"""

from __future__ import annotations

from queue import Queue

from chatlm.detokenize import StreamingDetokenizer


def _ids(value) -> list[int]:
    """The ids of one sequence from a (T,) or (1, T) tensor (or a list or an int)."""
    shape = tuple(getattr(value, "shape", ()))
    if len(shape) > 1:
        if shape[0] > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        value = value[0]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, int):
        return [value]
    if value and isinstance(value[0], list):
        if len(value) > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        value = value[0]
    return [int(v) for v in value]


class TextStreamer:
    """Print the text of a generation to stdout as it is made.

    ``skip_prompt`` leaves out the prompt (the first ``put``); ``decode_kwargs`` go to ``tokenizer.decode``
    (e.g. ``skip_special_tokens=True``).
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.next_tokens_are_prompt = True
        self._detokenizer = StreamingDetokenizer(tokenizer, **decode_kwargs)

    def put(self, value) -> None:
        """Take the prompt, then each new token."""
        ids = _ids(value)
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        text = "".join(self._detokenizer.add(i) for i in ids)
        if text:
            self.on_finalized_text(text)

    def end(self) -> None:
        """Give out what is left and close the stream; the streamer can then serve another generation."""
        text = self._detokenizer.flush()
        self._detokenizer = StreamingDetokenizer(self.tokenizer, **self.decode_kwargs)
        self.next_tokens_are_prompt = True
        self.on_finalized_text(text, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Print new text; override to send it elsewhere."""
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Hand the text over through a queue: run `generate` in a thread and iterate over the streamer.

    ``timeout`` (seconds) bounds each wait for text; when it passes, iteration raises `queue.Empty`.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value
