"""Tensors from a Hugging Face directory: one model.safetensors or shards listed in model.safetensors.index.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise ValueError(
                f"{index} is not a valid safetensors index: its weight_map must map names to files"
            )
        files = []
        for name in dict.fromkeys(weight_map.values()):
            # a shard is a file in this folder, named relative to it: never a path that leads out of it (the
            # Hub cache's shards are links into its blobs, so the check is on the name, not the link's target)
            if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
                raise ValueError(f"{index} names a shard outside the model's folder: {name!r}")
            files.append(directory / name)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} lacks weight shards named in {INDEX}: {', '.join(missing)}")
        return files
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise ValueError(
            f"{directory} holds only pickled PyTorch weights (.bin/.pt), which chatlm never loads (unpickling can run "
            "code); convert them to safetensors"
        )
    raise FileNotFoundError(f"{directory} has no {SINGLE} nor {INDEX}")


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors' names and shapes, from the files' headers (no data read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {path}: the file is corrupt or truncated ({e})") from e
    return shapes


def read_safetensors(directory: Path, select=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, read one at a time through a memory map.
    ``select(name)`` may give a slice to read instead of the whole tensor (an object with ``dim``, ``start`` and
    ``stop``; None or a None ``dim``: all of it): a tensor-parallel rank reads only its share."""
    for path in safetensors_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    part = select(name) if select is not None else None
                    if part is None or part.dim is None:
                        yield name, f.get_tensor(name)
                        continue
                    view = f.get_slice(name)
                    index = [slice(None)] * len(view.get_shape())
                    index[part.dim] = slice(part.start, part.stop)
                    yield name, view[tuple(index)]
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {path}: the file is corrupt or truncated ({e})") from e
