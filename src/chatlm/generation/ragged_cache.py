"""A batch's cache whose rows advance by different numbers of tokens (speculative decoding keeps each row's own
accepted guesses).

Every forward call writes all rows' new tokens at the same slots; a slot that a row does not keep (padding, a
rejected guess) is masked out rather than moved, and positions count each row's real tokens only, so a row reads
exactly the keys of its own sequence. Slots that no row keeps at the end are trimmed away; holes inside are
squeezed out (`compact`) once they would cost more attention reads than moving the cache once does.
"""

from __future__ import annotations

import torch

COMPACT_MIN_SLOTS = 32  # do not bother compacting away fewer slots than this


class RaggedCache:
    """``cache``: a filled `KVCache` to go on from (its first ``cache.offset`` slots, ``real`` (B, offset) marking
    the ones that hold a row's tokens; all of them by default), or None for an empty one."""

    def __init__(self, model, batch_size: int, capacity: int, cache=None, real: torch.Tensor | None = None):
        self.model = model
        if cache is None:
            cache = model.new_cache(batch_size, capacity)
        cache.reserve(capacity)
        self.cache = cache
        device = cache.keys[0].device
        self.slots = torch.zeros(batch_size, max(cache.capacity, 1), dtype=torch.bool, device=device)
        self.slots[:, : cache.offset] = True if real is None else real.to(device=device, dtype=torch.bool)
        self.lengths = self.slots.sum(-1)  # real tokens cached per row

    @property
    def offset(self) -> int:
        return self.cache.offset

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def stale(self) -> bool:
        """Whether the model wants the cached keys computed again before one more token (Phi-3's long rope)."""
        return self.model.recompute_cache(self.cache.offset, self.cache.offset + 1)

    def forward(self, tokens: torch.Tensor, real: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, W, vocab) of ``tokens`` (B, W) appended to each row; ``real`` (B, W) marks the tokens that
        belong to the row's sequence (in order), the others are filler whose logits mean nothing.
        ``logits_to_keep=n``: only the last n columns' logits."""
        offset, width = self.cache.offset, tokens.shape[1]
        self._reserve(offset + width)
        self.slots[:, offset : offset + width] = real
        positions = (self.lengths[:, None] + real.long().cumsum(-1) - 1).clamp(min=0)
        mask = self.slots[:, : offset + width]
        logits = self.model(
            tokens,
            attention_mask=None if bool(mask.all()) else mask.long(),
            position_ids=positions,
            past_key_values=self.cache,
            logits_to_keep=logits_to_keep,
        ).logits
        self.lengths += real.sum(-1)
        return logits

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep only the first ``lengths[r]`` tokens of each row."""
        end = self.cache.offset
        slots = self.slots[:, :end]
        slots &= slots.cumsum(-1) <= lengths[:, None]
        self.lengths = torch.minimum(self.lengths, lengths)
        used = slots.any(0).nonzero()
        self.cache.trim(end - (int(used[-1]) + 1 if used.numel() else 0))
        if self.cache.offset - int(self.lengths.max()) >= max(COMPACT_MIN_SLOTS, self.cache.offset // 4):
            self.compact()

    def save(self) -> tuple[int, torch.Tensor]:
        return self.cache.offset, self.lengths.clone()

    def restore(self, saved: tuple[int, torch.Tensor]) -> None:
        """Forget what was fed since ``save`` (a draft on this cache); the slots past the offset are rewritten."""
        offset, self.lengths = saved
        self.cache.trim(self.cache.offset - offset)

    def compact(self) -> None:
        """Squeeze out the holes: each row's kept slots move, in order, to the end of a cache as long as the
        longest row (shorter rows get masked slots in front, as left padding)."""
        end, width = self.cache.offset, int(self.lengths.max())
        kept = self.slots[:, :end]
        order = torch.sort(kept.to(torch.uint8), dim=1, stable=True).indices  # unkept slots first, then kept
        index = order[:, end - width :]
        self.slots[:, :width] = kept.gather(1, index)
        for store in (self.cache.keys, self.cache.values):
            for layer in store:
                b, heads, _, dim = layer.shape
                moved = layer[:, :, :end].gather(2, index[:, None, :, None].expand(b, heads, width, dim))
                layer[:, :, :width] = moved
        self.cache.ids[:, :width] = self.cache.ids[:, :end].gather(1, index)
        self.cache.trim(end - width)

    @property
    def rows(self) -> int:
        return self.cache.batch_size

    def add_rows(self, count: int) -> None:
        """``count`` more rows, empty (a server's batch grows as requests come)."""
        cache = self.cache

        def grown(old: torch.Tensor) -> torch.Tensor:
            # zeros (calloc'd: the new rows' pages are touched only when used), then the old rows copied in;
            # torch.cat would write every new byte up front
            new = old.new_zeros(old.shape[0] + count, *old.shape[1:])
            new[: old.shape[0]] = old
            return new

        for store in (cache.keys, cache.values):
            for i, layer in enumerate(store):
                store[i] = grown(layer)
        cache.ids, self.slots, self.lengths = grown(cache.ids), grown(self.slots), grown(self.lengths)

    def place(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor], ids: list[int]) -> None:
        """Put a sequence prefilled elsewhere (per layer, keys and values (kv_heads, L, head_dim) at positions
        0..L-1, and its L token ids) into an empty row, in the L slots before the offset (the offset moves up if
        L is longer)."""
        length, offset = len(ids), self.cache.offset
        if length > offset:  # the other rows get masked slots up to the new offset
            self.cache.reserve(length)
            self._reserve(length)
            self.slots[:, offset:length] = False
            self.cache.offset = offset = length
        for store, new in ((self.cache.keys, keys), (self.cache.values, values)):
            for layer, entries in zip(store, new):
                layer[row, :, offset - length : offset] = entries
        self.cache.ids[row, offset - length : offset] = torch.tensor(ids, dtype=torch.long)
        self.slots[row, :offset] = False
        self.slots[row, offset - length : offset] = True
        self.lengths[row] = length

    def tokens(self, row: int) -> list[int]:
        """Row ``row``'s cached token ids, in order."""
        return self.cache.ids[row, : self.cache.offset][self.slots[row, : self.cache.offset]].tolist()

    def entries(self, row: int, start: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        """Row ``row``'s cached tokens from its ``start``-th on: per layer keys and values (kv_heads, n,
        head_dim), and the n token ids (what a prefix cache stores, or another cache's `place` takes)."""
        index = self.slots[row, : self.cache.offset].nonzero()[:, 0][start:]
        if bool((index[1:] - index[:-1] == 1).all()) and index.numel():  # one run of slots: views, no gather
            first, last = int(index[0]), int(index[-1]) + 1
            keys = [k[row, :, first:last] for k in self.cache.keys]
            values = [v[row, :, first:last] for v in self.cache.values]
        else:
            keys = [k[row].index_select(1, index) for k in self.cache.keys]
            values = [v[row].index_select(1, index) for v in self.cache.values]
        return keys, values, self.cache.ids[row, index].tolist()

    def _reserve(self, length: int) -> None:
        if length > self.slots.shape[1]:
            grown = self.slots.new_zeros(self.slots.shape[0], max(length, 2 * self.slots.shape[1]))
            grown[:, : self.slots.shape[1]] = self.slots
            self.slots = grown
