"""The key/value cache: preallocated per layer, written in place, so a decode step allocates nothing.

It also records the token id of every slot, so that a cache handed back to ``generate`` (transformers' prompt-reuse
pattern) is reused only as far as it really holds the new prompt's tokens.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, (B, kv_heads, capacity, head_dim) each, and the token id of each slot
    (B, capacity); ``offset`` slots are filled."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, num_kv_heads, max(capacity, 1), head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.ids = torch.zeros(batch_size, max(capacity, 1), dtype=torch.long, device=device)
        self.offset = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def get_seq_length(self) -> int:
        """Slots filled (transformers' name)."""
        return self.offset

    def tokens(self, row: int = 0) -> list[int]:
        """The token ids cached in ``row``'s slots (for a padded batch, filler slots included)."""
        return self.ids[row, : self.offset].tolist()

    def reserve(self, length: int) -> None:
        """Make room for ``length`` slots in all, growing geometrically so appends stay amortised O(1)."""
        if length <= self.capacity:
            return
        new_capacity = max(length, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros(*old.shape[:2], new_capacity, old.shape[3])
                grown[:, :, : self.offset] = old[:, :, : self.offset]
                store[i] = grown
        ids = self.ids.new_zeros(self.ids.shape[0], new_capacity)
        ids[:, : self.offset] = self.ids[:, : self.offset]
        self.ids = ids

    def record(self, input_ids: torch.Tensor) -> None:
        """Note the token ids of the slots a forward call is about to fill (at ``offset``)."""
        self.ids[:, self.offset : self.offset + input_ids.shape[1]] = input_ids

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, kv_heads, T, head_dim) entries at ``offset`` and return all keys and values so far."""
        end = self.offset + keys.shape[2]
        self.keys[layer][:, :, self.offset : end] = keys
        self.values[layer][:, :, self.offset : end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, length: int) -> None:
        self.offset += length

    def trim(self, length: int) -> None:
        """Forget the last ``length`` entries (speculative decoding rolls back rejected tokens this way)."""
        self.offset = max(0, self.offset - length)

    def crop(self, max_length: int) -> None:
        """Keep only the first ``max_length`` slots (transformers' name)."""
        self.offset = min(self.offset, max(0, max_length))

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences leave the batch)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.ids = self.ids[rows]


class DynamicCache(KVCache):
    """An empty cache to hand to a forward call or ``generate`` (``DynamicCache()``, as in transformers): it takes
    its shape from the model the first time it is filled, then grows as a `KVCache` does."""

    def __init__(self):
        self.keys, self.values, self.offset = [], [], 0
        self.ids = torch.zeros(0, 0, dtype=torch.long)

    @property
    def allocated(self) -> bool:
        return bool(self.keys)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def allocate(self, model, batch_size: int, capacity: int) -> None:
        fresh = model.new_cache(batch_size, capacity)
        self.keys, self.values, self.ids = fresh.keys, fresh.values, fresh.ids
