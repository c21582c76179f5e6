"""The engine worker: one thread owns the model and the batch's KV cache, and runs continuous batching.

Requests wait in a bounded queue. Each loop turn the worker (1) prefills one chunk of the oldest waiting
request's prompt, in a cache of its own, when the batch has rows free for its choices, and (2) steps every
running sequence by one token in one forward pass, on the one decode loop (`generation.decoding.Decoder`: each
sequence chooses with its own `RowSampler` and ends by the one finish rule). A request whose prompt is done joins the batch at the next turn
(its keys and values move into free rows of a `RaggedCache`); a finished or cancelled sequence leaves it at once.
A long prompt is taken a chunk per turn, so the running sequences keep decoding meanwhile.

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
from ..generation.sampling import RowSampler, SamplingParams, TokenLogprob
from .metrics import Metrics
from .model_side import ModelSide

__all__ = ["Delta", "Engine", "EngineStopped", "QueueFull", "Request", "SamplingParams", "TokenLogprob"]


@dataclass
class Delta:
    """What one choice produced since its last delta: the token generated (an end-of-sequence token too) and the
    text that became certain. ``finish_reason`` ("stop", "length", "cancelled") marks the choice's last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


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
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Sequence:
    """One choice of a request while it decodes: its request, its index among the request's choices, and its row
    of the decoder (tokens, sampler, text stream)."""

    request: Request
    index: int
    row: Row


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
    ):
        """``start=False``: the caller runs the loop itself with `run` (``chatlm serve`` does, on the main thread:
        there OpenMP's workers spin between the many small parallel regions of a decoding step; a second thread
        with a team of its own makes libgomp throttle that spinning, and a step takes up to twice as long)."""
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.busy_prefill_chunk = prefill_chunk, busy_prefill_chunk
        self.eos = set(model.generation_config.eos_token_ids)
        self.vocab = model.config.vocab_size
        self.metrics = Metrics()
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Sequence] = {}  # by row
        self.prefill: tuple[Request, int] | None = None  # a long prompt being prefilled, and tokens done
        self.side = side or ModelSide(model)  # the model and its caches (`model_side`)
        self.decoder = Decoder(self.side)  # the running sequences, a row each
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
        if self.prefill is not None and self.prefill[0].cancelled:
            self._finish_all(self.prefill[0])
            self.prefill = None
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
        not held up long): the waiting prompts that fit it together, in one batch; or one chunk of a prompt longer
        than the budget."""
        budget = self.busy_prefill_chunk if self.running else self.prefill_chunk
        if self.prefill is None:
            group: list[Request] = []
            with self.lock:
                free, tokens = self.max_batch - len(self.running), 0
                while self.waiting and self.waiting[0].n <= free:
                    head = self.waiting[0]
                    if group and tokens + len(head.prompt) > budget:
                        break
                    group.append(self.waiting.popleft())
                    free, tokens = free - head.n, tokens + len(head.prompt)
                    if tokens > budget:  # a long prompt: alone, a chunk per turn
                        break
                self.metrics.waiting = len(self.waiting)
            if not group:
                return
            if len(group) > 1 or tokens <= budget:
                logits = self.side.prefill_together([r.prompt for r in group])
                for j, request in enumerate(group):
                    self.metrics.prompt_tokens += len(request.prompt)
                    self._start(request, j, logits[j])
                return
            self.prefill = (group[0], 0)
        request, done = self.prefill
        logits = self.side.prefill(request.prompt[done : done + budget], done, len(request.prompt))[0]
        done += len(request.prompt[done : done + budget])
        if done < len(request.prompt):
            self.prefill = (request, done)
            return
        self.prefill = None
        self.metrics.prompt_tokens += len(request.prompt)
        self._start(request, 0, logits)

    def _start(self, request: Request, staged: int, logits: torch.Tensor) -> None:
        """The prompt is prefilled (staged prompt ``staged``): its choices take free rows, each with its first
        token."""
        free = [row for row in range(self.side.rows) if row not in self.running]
        free += list(range(self.side.rows, self.side.rows + max(0, request.n - len(free))))
        rows = free[: request.n]
        self.side.place(staged, len(request.prompt), rows)
        self.metrics.first_token(time.monotonic() - request.arrived)
        finished = []
        for index, row in enumerate(rows):
            seq = self.running[row] = Sequence(request, index, self._row(request, index))
            if self._emit(seq, self.decoder.add(row, seq.row, logits)):
                finished.append(row)
        self.metrics.running = len(self.running)
        self._free_rows(finished)

    def _row(self, request: Request, index: int) -> Row:
        """Choice ``index``'s decoder row: its sampler (seeded per choice; no seed: a fresh one, as torch.seed()
        would reseed the process's global generator too) and its text stream."""
        params = request.params
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed + index if params.seed is not None else secrets.randbits(63))
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
        self._free_rows(finished)
        self.metrics.decode_step(stepped, time.perf_counter() - started)

    def _emit(self, seq: Sequence, settled: list[Settled]) -> bool:
        """Hand the tokens a choice settled to its request, a delta each; whether the choice is finished."""
        for token in settled:
            logprobs = [token.logprob] if token.logprob is not None else None
            seq.request.sink(Delta(seq.index, token.text, [token.token], logprobs, token.finish_reason))
            self.metrics.generated_tokens += 1
        return settled[-1].finish_reason is not None

    def _free_rows(self, rows: list[int]) -> None:
        if not rows:
            return
        for row in rows:
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
            self._finish_all(self.prefill[0])
            self.prefill = None
        for seq in self.running.values():
            seq.request.sink(Delta(seq.index, "", [], None, "cancelled"))
        for row in list(self.running):
            self.decoder.drop(row)
        self.running.clear()
