"""Parameters that arrive in pieces: stacked expert weights built from one checkpoint tensor per expert (or from
a GGUF file's separate gate and up stacks).

A model says where a checkpoint tensor goes with ``checkpoint_slot(name) -> (parameter name, index)``; an empty
index is the whole parameter. Pieces are copied straight into a parameter-sized buffer in the target dtype and
device as they come, so a layer's experts never exist twice in memory, and each piece is checked: its shape, and
that it covers no part of the parameter another piece already did. A parameter is finished when every piece is in.
"""

from __future__ import annotations

import torch

Index = tuple[int | slice, ...]


class PartAssembler:
    def __init__(
        self, params: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, source: str
    ):
        self.params, self.dtype, self.device, self.source = params, dtype, device, source
        self.buffers: dict[str, torch.Tensor] = {}
        # Which (dim 0, dim 1) cells pieces have covered: pieces split a parameter along its first two dims only,
        # so this costs a bit per row, not per weight.
        self.covered: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.buffers

    def add(self, name: str, index: Index, piece: torch.Tensor, origin: str) -> torch.Tensor | None:
        """Copy ``piece`` into ``name[index]``; the whole parameter once its last piece is in, else None."""
        if not 0 < len(index) <= 2:
            raise ValueError(f"{origin}: a piece must index one or two leading dims of {name!r}, not {index}")
        param = self.params[name]
        expected = tuple(param[index].shape)
        if tuple(piece.shape) != expected:
            raise ValueError(
                f"{self.source}: tensor {origin!r} has shape {tuple(piece.shape)}, the config implies {expected}"
            )
        if name not in self.buffers:
            self.buffers[name] = torch.empty(param.shape, dtype=self.dtype, device=self.device)
            self.covered[name] = torch.zeros(param.shape[:2], dtype=torch.bool)
        covered = self.covered[name]
        if covered[index].any():
            raise ValueError(
                f"{self.source}: tensor {origin!r} fills part of {name!r} that another tensor filled"
            )
        covered[index] = True
        self.buffers[name][index].copy_(piece)
        if not bool(covered.all()):
            return None
        del self.covered[name]
        return self.buffers.pop(name)

    def incomplete(self) -> list[str]:
        return sorted(self.covered)
