"""What the engine asks of the model and its caches, as a handful of calls with plain arguments.

Under tensor parallelism (`chatlm serve` started by torchrun) every rank must run the same forward passes on the
same inputs. Rank 0's engine decides what to run (which prompts to prefill, which rows decode) and sends each call
to the other ranks first (`BroadcastingSide`); they run it on their own share of the model (`follow`). Only rank 0
samples: the chosen tokens reach the others as the next decoding step's input.
"""

from __future__ import annotations

import torch

from ..generation.ragged_cache import RaggedCache


class ModelSide:
    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.batch: RaggedCache | None = None  # the running sequences' cache, a row each
        self.staged = None  # the cache the latest prompts were prefilled into

    @property
    def rows(self) -> int:
        return self.batch.rows if self.batch is not None else 0

    def prefill(self, tokens: list[int], start: int, total: int) -> torch.Tensor:
        """The chunk at ``start`` of a prompt of ``total`` tokens (the first starts a staged cache): last logits."""
        if start == 0:
            self.staged = self.model.new_cache(1, total)
        ids = torch.tensor([tokens], device=self.device)
        return self.model(ids, past_key_values=self.staged, logits_to_keep=1).logits[:, -1]

    def prefill_together(self, prompts: list[list[int]]) -> torch.Tensor:
        """Short prompts in one forward pass, left-padded: (len(prompts), vocab) last logits."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for j, prompt in enumerate(prompts):
            ids[j, width - len(prompt) :] = torch.tensor(prompt)
            mask[j, width - len(prompt) :] = 1
        self.staged = self.model.new_cache(len(prompts), width)
        return self.model(
            ids,
            attention_mask=mask if len(prompts) > 1 else None,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            past_key_values=self.staged,
            logits_to_keep=1,
        ).logits[:, -1]

    def place(self, j: int, length: int, rows: list[int]) -> None:
        """Staged prompt ``j`` (its last ``length`` slots) into batch rows ``rows`` (more rows made as needed)."""
        if self.batch is None:
            self.batch = RaggedCache(self.model, 0, length + 64)
        if max(rows) >= self.batch.rows:
            self.batch.add_rows(max(rows) + 1 - self.batch.rows)
        end = self.staged.offset
        keys = [k[j, :, end - length : end] for k in self.staged.keys]
        values = [v[j, :, end - length : end] for v in self.staged.values]
        for row in rows:
            self.batch.place(row, keys, values)

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

    def prefill(self, tokens, start, total):
        self._send("prefill", tokens, start, total)
        return super().prefill(tokens, start, total)

    def prefill_together(self, prompts):
        self._send("prefill_together", prompts)
        return super().prefill_together(prompts)

    def place(self, j, length, rows):
        self._send("place", j, length, rows)
        super().place(j, length, rows)

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
