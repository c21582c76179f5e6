"""What the engine asks of the model and its caches, as a handful of calls with plain arguments.

Under tensor parallelism (`chatlm serve` started by torchrun) every rank must run the same forward passes on the
same inputs. Rank 0's engine decides what to run (which prompts to prefill, which rows decode) and sends each call
to the other ranks first (`BroadcastingSide`); they run it on their own share of the model (`follow`). Only rank 0
samples: the chosen tokens reach the others as the next decoding step's input.
"""

from __future__ import annotations

import torch

from ..generation.prefix_cache import PrefixCache
from ..generation.ragged_cache import RaggedCache


class ModelSide:
    """The model, the running sequences' cache (a row each), the cache prompts are prefilled in (staged), and the
    prefix cache that prompts starting as earlier ones reuse (None: off)."""

    def __init__(self, model, prefix_cache: PrefixCache | None = None):
        self.model = model
        self.device = model.device
        self.prefix_cache = prefix_cache
        self.batch: RaggedCache | None = None  # the running sequences' cache, a row each
        self.staged: RaggedCache | None = None  # the prompts being prefilled, a row each

    @property
    def rows(self) -> int:
        return self.batch.rows if self.batch is not None else 0

    def cached(self, prompt: list[int]) -> int:
        """How many of the prompt's tokens `stage` would reuse now."""
        if self.prefix_cache is None:
            return 0
        return min(self.prefix_cache.match(prompt), len(prompt) - 1)

    def stage(self, prompts: list[list[int]], reuse: list[int] | None = None) -> list[int]:
        """Start prefilling ``prompts``, each in a row of a new staged cache, with the longest prefix the prefix
        cache holds (at most ``reuse[j]`` tokens if given; never the last token, whose logits are needed):
        how many tokens of each were reused."""
        self.staged = RaggedCache(self.model, len(prompts), max(len(p) for p in prompts))
        found = []
        for j, prompt in enumerate(prompts):
            limit = len(prompt) - 1 if reuse is None else reuse[j]
            length, keys, values = (0, None, None)
            if self.prefix_cache is not None and limit > 0:
                length, keys, values = self.prefix_cache.read(prompt, limit)
            if length:
                self.staged.place(j, keys, values, prompt[:length])
            found.append(length)
        return found

    def feed(self, tokens: list[list[int]]) -> torch.Tensor:
        """The next tokens of each staged prompt (an empty list for a row with none this time), right-aligned in
        one forward pass: the logits after each row's last token, (rows, vocab)."""
        width = max(len(t) for t in tokens)
        ids = torch.zeros(len(tokens), width, dtype=torch.long)
        real = torch.zeros(len(tokens), width, dtype=torch.bool)
        for j, chunk in enumerate(tokens):
            if chunk:
                ids[j, width - len(chunk) :] = torch.tensor(chunk)
                real[j, width - len(chunk) :] = True
        return self.staged.forward(ids.to(self.device), real.to(self.device), logits_to_keep=1)[:, -1]

    def place(self, placements: list[tuple[int, list[int]]]) -> None:
        """Each staged prompt ``j`` of ``placements`` into its batch rows (the batch grows once, as needed, to
        hold them all); the prefix cache keeps the prompts."""
        entries = {j: self.staged.entries(j) for j, _ in placements}
        if self.prefix_cache is not None:
            for keys, values, ids in entries.values():
                self.prefix_cache.insert(ids, keys, values)
        if self.batch is None:
            self.batch = RaggedCache(self.model, 0, max(len(ids) for _, _, ids in entries.values()) + 64)
        needed = max(max(rows) for _, rows in placements) + 1
        if needed > self.batch.rows:
            self.batch.add_rows(needed - self.batch.rows)
        for j, rows in placements:
            keys, values, ids = entries[j]
            for row in rows:
                self.batch.place(row, keys, values, ids)

    def remember(self, row: int) -> None:
        """The prefix cache keeps what batch row ``row`` holds (its prompt and reply so far): the next turn of
        a chat starts with them."""
        if self.prefix_cache is None or self.batch is None:
            return
        ids = self.batch.tokens(row)
        known = self.prefix_cache.match(ids)
        if known < len(ids):
            keys, values, _ = self.batch.entries(row, known)
            self.prefix_cache.insert(ids, keys, values, first=known)

    # What the decode loop (`generation.decoding.Decoder`) asks of its cache.
    @property
    def lengths(self) -> torch.Tensor:
        return self.batch.lengths

    def stale(self) -> bool:
        return self.batch.stale()

    def forward(self, tokens, real, logits_to_keep: int = 0) -> torch.Tensor:
        """``tokens`` (rows, width) fed to the batch where ``real``: (rows, width, vocab) logits."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        real = torch.as_tensor(real, dtype=torch.bool, device=self.device)
        return self.batch.forward(tokens, real, logits_to_keep)

    def truncate(self, lengths) -> None:
        self.batch.truncate(torch.as_tensor(lengths, dtype=torch.long, device=self.device))

    def free(self, rows: list[int]) -> None:
        keep = self.batch.lengths.clone()
        keep[rows] = 0
        self.truncate(keep)

    def close(self) -> None:
        pass


class BroadcastingSide(ModelSide):
    """Rank 0's side: each call goes to the other ranks before it runs here."""

    def _send(self, name: str, *args) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([(name, args)], src=0)

    def stage(self, prompts, reuse=None):
        found = super().stage(prompts, reuse)
        self._send("stage", prompts, found)  # the followers reuse what rank 0 found, not their own lookup
        return found

    def feed(self, tokens):
        self._send("feed", tokens)
        return super().feed(tokens)

    def place(self, placements):
        self._send("place", placements)
        super().place(placements)

    def remember(self, row):
        self._send("remember", row)
        super().remember(row)

    def forward(self, tokens, real, logits_to_keep=0):
        self._send(
            "forward", torch.as_tensor(tokens).tolist(), torch.as_tensor(real).tolist(), logits_to_keep
        )
        return super().forward(tokens, real, logits_to_keep)

    def truncate(self, lengths):
        self._send("truncate", torch.as_tensor(lengths).tolist())
        super().truncate(lengths)

    def close(self) -> None:
        self._send("close")


def follow(side: ModelSide) -> None:
    """A rank other than 0: run rank 0's calls, in order, until it closes."""
    import torch.distributed as dist

    with torch.inference_mode():
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            name, args = box[0]
            if name == "close":
                return
            getattr(side, name)(*args)
