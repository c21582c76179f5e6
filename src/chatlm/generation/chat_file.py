"""A chat saved to disk with the keys and values of its tokens, so that it resumes without being prefilled again.

One safetensors file (never a pickle): the messages as JSON in its metadata, and the tokens of the chat so far
(``ids``) with their keys and values (``keys``, ``values``: layers x kv_heads x tokens x head_dim). Keys and values
are only valid for the exact model that computed them, so the file records a fingerprint of the model (its
configuration, dtype and a sample of every weight, quantized ones as stored) and the chatlm version; on loading,
a cache from anything else is refused and the chat alone is restored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .prefix_cache import PrefixCache

FORMAT = "chatlm-chat/1"
SAMPLE_BYTES = 4096  # of each weight, from its start and its end
VERSION = version("chatlm")


@dataclass
class LoadedChat:
    """What a chat file gave: the messages, how many tokens of cache were restored, and why none was (if so)."""

    messages: list[dict[str, Any]]
    restored_tokens: int
    refused: str | None = None
    ids: list[int] = field(default_factory=list)  # the restored tokens


def model_fingerprint(model) -> str:
    """A digest that changes with the model's configuration, dtype or any weight (a sample of each is read)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(str(model.dtype).encode())
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().reshape(-1)
        if not flat.numel():
            continue
        count = max(1, SAMPLE_BYTES // flat.element_size())
        for part in (flat[:count], flat[-count:]):
            digest.update(part.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_chat(
    path: str | os.PathLike, messages: list[dict[str, Any]], model, cache: PrefixCache | None, ids: list[int]
) -> int:
    """Write ``messages`` and what ``cache`` holds of the chat's tokens ``ids`` to ``path`` (replaced whole, so a
    failed write leaves the old file). Returns how many tokens of keys and values were saved."""
    length, keys, values = cache.read(ids, count=False) if cache is not None and ids else (0, None, None)
    if length:
        tensors = {
            "ids": torch.tensor(ids[:length], dtype=torch.long),
            "keys": torch.stack(keys).contiguous().cpu(),
            "values": torch.stack(values).contiguous().cpu(),
        }
    else:
        tensors = {"ids": torch.zeros(0, dtype=torch.long)}
    metadata = {
        "format": FORMAT,
        "chatlm_version": VERSION,
        "model": model_fingerprint(model),
        "messages": json.dumps(messages, ensure_ascii=False),
    }
    partial = f"{os.fspath(path)}.partial"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)
    return length


def load_chat(path: str | os.PathLike, model, cache: PrefixCache | None) -> LoadedChat:
    """Read a chat saved by `save_chat`; its keys and values go into ``cache`` when ``model`` is the one that
    computed them and the chatlm version is this one. A file that is not a saved chat is a ValueError."""
    try:
        with safe_open(os.fspath(path), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a saved chat: {error}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saved chat (no {FORMAT!r} format mark)")
    try:
        messages = json.loads(metadata["messages"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} holds no readable messages: {error}") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"{path} holds no list of messages")
    ids = tensors["ids"].tolist()
    if not ids:
        return LoadedChat(messages, 0)
    if metadata.get("chatlm_version") != VERSION:
        return LoadedChat(
            messages, 0, f"its cache was saved by chatlm {metadata.get('chatlm_version')}, this is {VERSION}"
        )
    if metadata.get("model") != model_fingerprint(model):
        return LoadedChat(
            messages, 0, "its cache was computed by another model (or another dtype or quantization)"
        )
    if cache is None:
        return LoadedChat(messages, 0, "there is no prefix cache here to restore it to")
    if cache.max_bytes == 0:
        return LoadedChat(messages, 0, "the prefix cache is off (--cache-ram 0)")
    keys = [
        k.to(model.device) for k in tensors["keys"]
    ]  # the dtype they were computed in: the model's cache's
    values = [v.to(model.device) for v in tensors["values"]]
    cache.insert(ids, keys, values)
    restored = cache.match(ids)  # all, unless the budget is smaller than the chat
    return LoadedChat(messages, restored, ids=ids[:restored])
