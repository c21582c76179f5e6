"""The key/value cache: preallocated per layer, written in place, so a decode step allocates nothing."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, (B, kv_heads, capacity, head_dim) each; ``offset`` slots are filled."""

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
        self.offset = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

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

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences leave the batch)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
