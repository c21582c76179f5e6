"""The engine worker: one thread owns the model and the batch's KV cache, and runs continuous batching.

Requests wait in a bounded queue. Each loop turn the worker (1) prefills one chunk of the oldest waiting
request's prompt, in a cache of its own, when the batch has rows free for its choices, and (2) decodes one token
for every running sequence in one forward pass. A request whose prompt is done joins the batch at the next turn
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
from ..generation.config import GenerationConfig
from ..generation.sampling import make_processors
from .json_mode import JsonPrefix
from .metrics import Metrics
from .model_side import ModelSide


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    json_object: bool = False  # the reply is one JSON object (response_format json_object)
    json_prefix: str = ""  # JSON the prompt already began (a forced tool call's opening): the reply goes on
    json_starts: tuple[
        str, ...
    ] = ()  # the reply begins with one of these (a forced call's name and its quote)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


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


class Sequence:
    """One choice of a request while it decodes: its row, tokens, sampling state and text stream."""

    def __init__(self, request: Request, index: int, tokenizer, eos: set[int], vocab: int):
        self.request, self.index, self.eos = request, index, eos
        params = request.params
        self.params = params
        self.tokens: list[int] = []
        self.text = StreamingDetokenizer(tokenizer, params.stop, request.skip_special_tokens)
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            # no seed: a fresh one (torch.seed() would reseed the process's global generator too)
            self.generator.manual_seed(
                params.seed + index if params.seed is not None else secrets.randbits(63)
            )
        config = GenerationConfig(
            do_sample=params.temperature > 0, temperature=params.temperature, top_p=params.top_p, top_k=0
        )
        self.processors = make_processors(config)
        penalised = params.presence_penalty or params.frequency_penalty
        self.counts = torch.zeros(vocab) if penalised else None
        self.json = None
        if params.json_object:
            self.json = JsonPrefix(arrays=params.json_prefix.startswith("["))
            self.json.feed(params.json_prefix)
        self.json_read = 0  # characters of the decoded text the JSON state has read
        self.plain_greedy = (
            self.generator is None and not penalised and params.logprobs is None and self.json is None
        )

    def choose(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """The next token from the raw logits (vocab,): OpenAI's presence and frequency penalties over the tokens
        generated so far, then temperature and top-p, then a draw (or the argmax at temperature 0)."""
        scores = logits.float()[None]
        if self.counts is not None:
            p = self.params
            scores = (
                scores - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
            )
        for process in self.processors:
            scores = process(None, scores)
        if self.json is not None:
            token = self._json_token(scores[0])
        elif self.generator is None:
            token = int(scores.argmax())
        else:
            token = int(torch.multinomial(scores.softmax(-1)[0], 1, generator=self.generator))
        logprob = None
        if self.params.logprobs is not None:
            logprobs = logits.float().log_softmax(-1)
            k = self.params.logprobs
            top = torch.topk(logprobs, k) if k else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            logprob = TokenLogprob(token, float(logprobs[token]), pairs)
        return token, logprob

    def _json_token(self, scores: torch.Tensor) -> int:
        """The model's choice among the tokens that keep the reply a JSON object's prefix: the most likely such
        token, or a draw from the distribution with the others left out (drawn again without a token that breaks
        the JSON). End of sequence only once the object is complete."""
        if self.generator is None:
            order = torch.argsort(scores, descending=True).tolist()
        else:
            probs = scores.softmax(-1)
            order = []
            for _ in range(32):
                if float(probs.sum()) <= 0:
                    break
                token = int(torch.multinomial(probs, 1, generator=self.generator))
                if self._keeps_json(token):
                    return token
                probs[token] = 0
            order = torch.argsort(probs if float(probs.sum()) > 0 else scores, descending=True).tolist()
        for token in order:
            if self._keeps_json(token):
                return token
        return next(iter(self.eos), order[0])  # nothing continues the JSON: end here

    def _keeps_json(self, token: int) -> bool:
        if token in self.eos:
            return self.json.complete
        text = self.text.peek(token)
        starts, so_far = self.params.json_starts, self.text.text + text
        if starts and not any(start.startswith(so_far) or so_far.startswith(start) for start in starts):
            return False
        state = self.json.copy()
        if text.endswith("\ufffd"):  # a character split across tokens: only inside a string
            return state.feed(text.rstrip("\ufffd")) and state.in_string
        return bool(text) and state.feed(text)

    def add(self, token: int, logprob: TokenLogprob | None) -> Delta:
        """Take the chosen token; the delta says whether the choice is finished."""
        self.tokens.append(token)
        if self.counts is not None:
            self.counts[token] += 1
        reason = None
        if token in self.eos:
            reason, text = "stop", self.text.finish()
        else:
            text = self.text.add(token)
            if self.json is not None:
                self.json.feed(self.text.text[self.json_read :])
                self.json_read = len(self.text.text)
            if self.text.stopped or (self.json is not None and self.json.complete):
                reason = "stop"
                text += self.text.finish()
            elif len(self.tokens) >= self.params.max_tokens:
                reason, text = "length", text + self.text.finish()
        return Delta(self.index, text, [token], [logprob] if logprob else None, reason)


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
            seq = Sequence(request, index, self.tokenizer, self.eos, self.vocab)
            self.running[row] = seq
            if self._emit(seq, *seq.choose(logits)):
                finished.append(row)
        self.metrics.running = len(self.running)
        self._free_rows(finished)

    def _decode_step(self) -> None:
        if not self.running:
            return
        started = time.perf_counter()
        tokens, real = [0] * self.side.rows, [False] * self.side.rows
        for row, seq in self.running.items():
            tokens[row], real[row] = seq.tokens[-1], True
        logits = self.side.decode(tokens, real)
        best = logits.argmax(-1).tolist()  # the plain greedy rows' tokens, all at once
        stepped = len(self.running)
        finished = [
            row
            for row, seq in self.running.items()
            if self._emit(seq, *((best[row], None) if seq.plain_greedy else seq.choose(logits[row])))
        ]
        self._free_rows(finished)
        self.metrics.decode_step(stepped, time.perf_counter() - started)

    def _emit(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> bool:
        delta = seq.add(token, logprob)
        self.metrics.generated_tokens += 1
        seq.request.sink(delta)
        return delta.finish_reason is not None

    def _free_rows(self, rows: list[int]) -> None:
        if not rows:
            return
        for row in rows:
            self.running.pop(row, None)
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
        self.running.clear()
