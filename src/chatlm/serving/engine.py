"""The engine worker: one thread owns the model and the batch's KV cache, and runs continuous batching.

Requests wait in a bounded queue. Each loop turn the worker (1) prefills the waiting prompts that fit a token
budget together (or one chunk of a longer one), in a staged cache, when the batch has rows free for their
choices, and (2) steps every running sequence by one token in one forward pass, on the one decode loop
(`generation.decoding.Decoder`: each sequence chooses with its own `RowSampler` and ends by the one finish rule).
A request whose prompt is done joins the batch at the next turn (its keys and values move into free rows of a
`RaggedCache`); a finished or cancelled sequence leaves it at once. A long prompt is taken a chunk per turn, so the
running sequences keep decoding meanwhile.

Prompts start from the longest prefix the prefix cache holds (`generation.prefix_cache`): it keeps every prompt
once prefilled and every finished reply, so an agent's next call or a chat's next turn computes only its new
tokens. Two waiting prompts that share more than the cache holds are not prefilled together: the second waits a
turn and then reuses the first's keys and values (clients with the same system prompt compute it once).

Handlers talk to the worker through `Request`: it carries the prompt and `SamplingParams` in, and hands each
`Delta` (text, token ids, log-probabilities, and at the end the finish reason) to the request's ``sink`` callback,
from the worker's thread.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..detokenize import StreamingDetokenizer
from ..generation.decoding import Decoder, Row, Settled
from ..generation.prefix_cache import PrefixCache
from ..generation.sampling import RowSampler, SamplingParams, TokenLogprob
from .metrics import Metrics
from .model_side import ModelSide

SHARED_MIN = 32  # tokens two waiting prompts must share beyond the prefix cache for one to wait for the other

__all__ = ["Delta", "Engine", "EngineStopped", "QueueFull", "Request", "SamplingParams", "TokenLogprob"]


@dataclass
class Delta:
    """What one choice produced since its last delta: the token generated (an end-of-sequence token too) and the
    text that became certain. ``finish_reason`` ("stop", "length", "cancelled", "error") marks the choice's last
    delta; with "error", ``error`` says what failed (that choice only: the batch goes on)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop: str | None = None  # the stop string the choice ended at (with finish_reason "stop")
    error: str | None = None  # what failed (with finish_reason "error")


class QueueFull(Exception):
    """The waiting queue is at its limit: the caller should come back later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Delta], None]
    n: int = 1
    skip_special_tokens: bool = True  # False: the text keeps markers such as <tool_call> for the reply parser
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens the prefix cache held (set before the first delta)
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Sequence:
    """One choice of a request while it decodes: its request, its index among the request's choices, and its row
    of the decoder (tokens, sampler, text stream)."""

    request: Request
    index: int
    row: Row | None  # None: its row could not be made (the choice failed at once)


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = 512,
        busy_prefill_chunk: int = 256,
        start: bool = True,
        side: ModelSide | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        """``start=False``: the caller runs the loop itself with `run` (``chatlm serve`` does, on the main thread:
        there OpenMP's workers spin between the many small parallel regions of a decoding step; a second thread
        with a team of its own makes libgomp throttle that spinning, and a step takes up to twice as long).
        ``prefix_cache``: keys and values of earlier prompts and replies, reused by prompts that start the same
        way (None: every prompt is computed whole); ``side`` brings its own."""
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.busy_prefill_chunk = prefill_chunk, busy_prefill_chunk
        self.eos = set(model.generation_config.eos_token_ids)
        self.vocab = model.config.vocab_size
        self.metrics = Metrics()
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Sequence] = {}  # by row
        # the prompts being prefilled together, and the tokens of each that are in the staged cache
        self.prefill: tuple[list[Request], list[int]] | None = None
        self.side = side or ModelSide(model, prefix_cache)  # the model and its caches (`model_side`)
        self.metrics.prefix_cache = self.side.prefix_cache
        # the running sequences, a row each; one that fails while choosing ends alone
        self.decoder = Decoder(self.side, isolate_rows=True)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.error: BaseException | None = None
        self.alive = False
        self.thread: threading.Thread | None = None
        if start:
            self.thread = threading.Thread(target=self.run, name="chatlm-engine", daemon=True)
            self.thread.start()

    # -- called from the handlers' threads -------------------------------------------------------------

    def submit(self, request: Request) -> None:
        if not request.prompt or request.n < 1 or request.n > self.max_batch:
            raise ValueError(f"a request needs a prompt and 1 to {self.max_batch} choices")
        with self.lock:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(request)
            self.metrics.waiting = len(self.waiting)
        self.metrics.requests += 1
        self.wake.set()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self.wake.set()

    def cancel_all(self) -> None:
        """Cancel every request in the queue and in the batch: each choice gets its "cancelled" finish, so each
        stream ends properly (the drain before shutdown ran out)."""
        with self.lock:
            requests = list(self.waiting) + [seq.request for seq in self.running.values()]
            if self.prefill is not None:
                requests += self.prefill[0]
        for request in requests:
            request.cancelled = True
        self.wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Take no more requests, cancel those in flight (their sinks get a "cancelled" finish), stop."""
        with self.lock:
            self.stopping = True
        self.wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # -- the worker --------------------------------------------------------------------------------------

    def run(self) -> None:
        """The worker's loop, until `shutdown`."""
        self.alive = True
        try:
            with torch.inference_mode():
                while not self.stopping:
                    if not (self.waiting or self.running or self.prefill):
                        self.wake.wait(0.5)
                        self.wake.clear()
                        continue
                    self._drop_cancelled()
                    self._prefill_step()
                    self._decode_step()
        except BaseException as error:  # a bug or out of memory: fail every request rather than hang them
            self.error = error
            raise
        finally:
            self.alive = False
            self._cancel_everything()
            self.side.close()  # under tensor parallelism: the other ranks stop following

    def _drop_cancelled(self) -> None:
        with self.lock:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self._finish_all(request)
            self.metrics.waiting = len(self.waiting)
        if self.prefill is not None and all(r.cancelled for r in self.prefill[0]):
            for request in self.prefill[0]:
                self._finish_all(request)
            self.prefill = None  # (one cancelled among others finishes when the group's prefill does)
        gone = [row for row, seq in self.running.items() if seq.request.cancelled]
        for row in gone:
            seq = self.running.pop(row)
            seq.request.sink(Delta(seq.index, "", [], None, "cancelled"))
        self._free_rows(gone)

    def _finish_all(self, request: Request) -> None:
        for index in range(request.n):
            request.sink(Delta(index, "", [], None, "cancelled"))

    def _prefill_step(self) -> None:
        """Prefill for one loop turn, within a token budget (smaller while others decode, so that their steps are
        not held up long): the waiting prompts whose uncached tokens fit it together, in one batch; or one chunk
        of a prompt longer than the budget."""
        budget = self.busy_prefill_chunk if self.running else self.prefill_chunk
        if self.prefill is None:
            group = self._take_group(budget)
            if not group:
                return
            self.prefill = (group, self.side.stage([r.prompt for r in group]))
            for request, reused in zip(group, self.prefill[1]):
                request.cached_tokens = reused
                self.metrics.cached_tokens += reused
        group, done = self.prefill
        chunks = [r.prompt[d : d + budget] for r, d in zip(group, done)]
        logits = self.side.feed(chunks)
        for j, chunk in enumerate(chunks):
            done[j] += len(chunk)
            self.metrics.computed_tokens += len(chunk)
        if any(d < len(r.prompt) for r, d in zip(group, done)):
            return  # a long prompt: its next chunk in the next turn
        self.prefill = None
        starting, placements = [], []
        free = [row for row in range(self.side.rows) if row not in self.running]
        new_row = self.side.rows  # then rows past the batch's last
        for j, request in enumerate(group):
            self.metrics.prompt_tokens += len(request.prompt)
            if request.cancelled:
                self._finish_all(request)
                continue
            while len(free) < request.n:
                free.append(new_row)
                new_row += 1
            rows, free = free[: request.n], free[request.n :]
            starting.append((request, rows, logits[j]))
            placements.append((j, rows))
        if placements:
            self.side.place(placements)  # all at once: the batch grows once
        for request, rows, first in starting:
            self._start(request, rows, first)

    def _take_group(self, budget: int) -> list[Request]:
        """The waiting requests to prefill together, oldest first: as many as fit the free rows and, by their
        uncached tokens, the budget; a prompt longer than the budget goes alone. A prompt that shares more with
        one in the group than the prefix cache holds waits, to reuse that one's keys and values next turn."""
        group: list[Request] = []
        with self.lock:
            free, tokens = self.max_batch - len(self.running), 0
            while self.waiting and self.waiting[0].n <= free:
                head = self.waiting[0]
                cached = self.side.cached(head.prompt)
                new = len(head.prompt) - cached
                if group and (
                    tokens + new > budget
                    or any(_common(head.prompt, r.prompt) >= cached + SHARED_MIN for r in group)
                ):
                    break
                group.append(self.waiting.popleft())
                free, tokens = free - head.n, tokens + new
                if tokens > budget:
                    break
            self.metrics.waiting = len(self.waiting)
        return group

    def _start(self, request: Request, rows: list[int], logits: torch.Tensor) -> None:
        """The prompt is prefilled and placed in ``rows`` of the batch: its choices start there, each with its
        first token."""
        self.metrics.first_token(time.monotonic() - request.arrived)
        finished = []
        for index, row in enumerate(rows):
            try:
                sequence_row = self._row(request, index)
            except Exception as error:  # its sampler or constraint cannot be made: that choice fails
                self.running[row] = Sequence(request, index, None)
                self._fail(row, error)
                finished.append(row)
                continue
            seq = self.running[row] = Sequence(request, index, sequence_row)
            settled = self.decoder.add(row, seq.row, logits)
            if settled and self._emit(seq, settled):
                finished.append(row)
        finished += self._take_failures()
        self.metrics.running = len(self.running)
        self._free_rows(finished)

    def _row(self, request: Request, index: int) -> Row:
        """Choice ``index``'s decoder row: its sampler (seeded per choice; no seed: a fresh one, as torch.seed()
        would reseed the process's global generator too) and its text stream."""
        params = request.params
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            # a seed of any size works: torch takes 64 bits
            generator.manual_seed(
                (params.seed + index) % 2**64 if params.seed is not None else secrets.randbits(63)
            )
        eos = sorted(self.eos | set(params.stop_token_ids))
        constraint = params.constraint() if params.constraint is not None else None
        sampler = RowSampler(params, request.prompt, eos, self.vocab, generator, constraint)
        text = StreamingDetokenizer(self.tokenizer, params.stop, request.skip_special_tokens)
        return Row(sampler, request.prompt, text)

    def _decode_step(self) -> None:
        if not self.running:
            return
        started = time.perf_counter()
        stepped = len(self.running)
        settled = self.decoder.step()
        finished = [row for row, tokens in settled.items() if self._emit(self.running[row], tokens)]
        self._free_rows(finished + self._take_failures())
        self.metrics.decode_step(stepped, time.perf_counter() - started)

    def _emit(self, seq: Sequence, settled: list[Settled]) -> bool:
        """Hand the tokens a choice settled to its request, a delta each; whether the choice is finished."""
        for token in settled:
            logprobs = [token.logprob] if token.logprob is not None else None
            stop = seq.row.text.matched_stop if token.finish_reason and seq.row.text is not None else None
            seq.request.sink(Delta(seq.index, token.text, [token.token], logprobs, token.finish_reason, stop))
            self.metrics.generated_tokens += 1
        return settled[-1].finish_reason is not None

    def _take_failures(self) -> list[int]:
        """The rows whose choice failed in the decoder: each request hears why; their rows are to be freed."""
        failed, self.decoder.failed = self.decoder.failed, {}
        for row, error in failed.items():
            self._fail(row, error)
        return list(failed)

    def _fail(self, row: int, error: Exception) -> None:
        """Choice at ``row`` failed: its request gets an "error" finish and its other choices are cancelled
        (the request as a whole has failed)."""
        seq = self.running[row]
        seq.request.cancelled = True
        self.metrics.failed_sequences += 1
        message = f"{type(error).__name__}: {error}"
        seq.request.sink(Delta(seq.index, "", [], None, "error", error=message))

    def _free_rows(self, rows: list[int]) -> None:
        """Rows whose sequences ended: a finished one's prompt and reply go to the prefix cache first."""
        if not rows:
            return
        for row in rows:
            seq = self.running.get(row)
            if seq is not None and seq.row is not None and not seq.request.cancelled:
                self.side.remember(row)
            self.running.pop(row, None)
            self.decoder.drop(row)
        self.side.free(rows)
        self.metrics.running = len(self.running)

    def _cancel_everything(self) -> None:
        with self.lock:
            self.stopping = True
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            self._finish_all(request)
        if self.prefill is not None:
            for request in self.prefill[0]:
                self._finish_all(request)
            self.prefill = None
        for seq in self.running.values():
            seq.request.sink(Delta(seq.index, "", [], None, "cancelled"))
        for row in list(self.running):
            self.decoder.drop(row)
        self.running.clear()


def _common(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
