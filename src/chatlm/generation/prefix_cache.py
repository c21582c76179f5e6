"""Keys and values of token sequences seen before, found again by the longest common prefix of token ids.

A chat's next turn, an agent's next call and a second client with the same system prompt all start with tokens
whose keys and values were computed already. `PrefixCache` keeps them in a radix tree over token ids: each edge
holds a run of tokens and their keys and values for every layer, so a lookup walks the tree as far as the new
prompt agrees with anything stored, to the token (a reply re-rendered differently by the next turn's template
still counts up to where it differs). Within a memory budget, the least recently used leaves go first.

Keys and values depend only on the tokens before them (positions count from the sequence's start), so a prefix
computed for one prompt is exactly what any prompt with that prefix would compute there.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.cache import KVCache

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB


@dataclass
class PrefixCacheStats:
    """Lookups, those that reused something (hits), prompt tokens reused and looked up, tokens evicted."""

    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    prompt_tokens: int = 0
    evicted_tokens: int = 0


class _Node:
    __slots__ = ("ids", "kv", "children", "parent", "used")

    def __init__(self, ids: list[int], kv: torch.Tensor | None, parent: _Node | None):
        self.ids = ids  # the tokens of the edge into this node
        self.kv = kv  # (2, layers, kv_heads, len(ids), head_dim): their keys, then values
        self.children: dict[int, _Node] = {}  # by first token
        self.parent = parent
        self.used = 0  # the clock tick of its last lookup or insert


class PrefixCache:
    """Stored prefixes, at most ``max_bytes`` of keys and values (0 stores nothing).

    ``bytes_per_token``: what one token's keys and values count against the budget; by default what the stored
    tensors take. Under tensor parallelism each rank stores its share of the heads, and every rank must count
    the same, so the caller passes the whole model's figure there."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, bytes_per_token: int | None = None):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.bytes_per_token = bytes_per_token
        self.root = _Node([], None, None)
        self.tokens = 0  # tokens stored
        self.stats = PrefixCacheStats()
        self._clock = itertools.count(1)

    @property
    def nbytes(self) -> int:
        return self.tokens * (self.bytes_per_token or 0)

    def clear(self) -> None:
        self.root = _Node([], None, None)
        self.tokens = 0

    # -- finding --------------------------------------------------------------------------------------------

    def _walk(self, ids: Sequence[int]) -> list[tuple[_Node, int]]:
        """The nodes along ``ids``' longest stored prefix, each with how many of its tokens match."""
        path, node, at = [], self.root, 0
        while at < len(ids):
            child = node.children.get(ids[at])
            if child is None:
                break
            edge = child.ids
            n = 0
            limit = min(len(edge), len(ids) - at)
            while n < limit and edge[n] == ids[at + n]:
                n += 1
            path.append((child, n))
            at += n
            if n < len(edge):
                break
            node = child
        return path

    def match(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ``ids`` are stored (no bookkeeping)."""
        return sum(n for _, n in self._walk(ids))

    def read(self, ids: Sequence[int], limit: int | None = None, count: bool = True):
        """The keys and values of ``ids``' longest stored prefix, at most ``limit`` tokens: (length, keys, values)
        with per-layer (kv_heads, length, head_dim) tensors (None when nothing matches). ``count``: record it as
        a lookup of a prompt in the statistics."""
        limit = len(ids) if limit is None else min(limit, len(ids))
        pieces, length, tick = [], 0, next(self._clock)
        for node, n in self._walk(ids):
            take = min(n, limit - length)
            if take <= 0:
                break
            node.used = tick
            pieces.append(node.kv[:, :, :, :take])
            length += take
        if count:
            self.stats.lookups += 1
            self.stats.prompt_tokens += len(ids)
            self.stats.hits += length > 0
            self.stats.reused_tokens += length
        if not length:
            return 0, None, None
        kv = torch.cat(pieces, dim=3) if len(pieces) > 1 else pieces[0]
        return length, list(kv[0]), list(kv[1])

    def fetch(self, model, ids: Sequence[int], limit: int | None = None, capacity: int = 0) -> KVCache:
        """A new one-row `KVCache` for ``model`` holding ``ids``' longest stored prefix (at most ``limit``
        tokens), ready to hand to ``generate(..., past_key_values=...)``; room for ``capacity`` tokens."""
        length, keys, values = self.read(ids, limit)
        cache = model.new_cache(1, max(capacity, len(ids), 1))
        if length:
            for store, new in ((cache.keys, keys), (cache.values, values)):
                for layer, entries in zip(store, new):
                    layer[0, :, :length] = entries
            cache.ids[0, :length] = torch.tensor(list(ids[:length]), dtype=torch.long)
            cache.offset = length
        return cache

    # -- storing --------------------------------------------------------------------------------------------

    def insert(
        self, ids: Sequence[int], keys: list[torch.Tensor], values: list[torch.Tensor], first: int = 0
    ) -> int:
        """Store ``ids`` with their per-layer keys and values (kv_heads, len(ids) - first, head_dim) from token
        ``first`` on (the tokens before it must be stored already); only the tokens not stored yet are copied.
        Returns how many tokens were new."""
        ids = list(ids)
        if not ids or self.max_bytes == 0:
            return 0
        if self.bytes_per_token is None:
            self.bytes_per_token = 2 * sum(k[:, :1].nbytes for k in keys)
        room = self.max_bytes // self.bytes_per_token
        ids = ids[:room]  # a sequence longer than the whole budget: its beginning
        path, tick = self._walk(ids), next(self._clock)
        node, at = self.root, 0
        for child, n in path:
            if n < len(child.ids):
                child = self._split(child, n)
            child.used = tick
            node, at = child, at + n
        if at == len(ids):
            return 0
        if at < first:
            raise ValueError(f"only tokens {first}.. were given, but {at}.. are not stored")
        rest = ids[at:]
        kv = torch.stack(
            [
                torch.stack([k[:, at - first : len(ids) - first] for k in keys]),
                torch.stack([v[:, at - first : len(ids) - first] for v in values]),
            ]
        )  # a copy: the caller's cache may be overwritten later
        leaf = _Node(rest, kv, node)
        leaf.used = tick
        node.children[rest[0]] = leaf
        self.tokens += len(rest)
        self._evict(keep=leaf)
        return len(rest)

    def insert_cache(self, cache: KVCache, row: int = 0) -> int:
        """Store what row ``row`` of a `KVCache` holds (every slot up to its offset a real token)."""
        n = cache.offset
        return self.insert(
            cache.ids[row, :n].tolist(),
            [k[row, :, :n] for k in cache.keys],
            [v[row, :, :n] for v in cache.values],
        )

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut ``node``'s edge after ``n`` tokens; the first part becomes a new node in its place."""
        head = _Node(node.ids[:n], node.kv[:, :, :, :n].clone(), node.parent)
        head.used = node.used
        node.parent.children[head.ids[0]] = head
        node.ids, node.kv, node.parent = node.ids[n:], node.kv[:, :, :, n:].clone(), head
        head.children[node.ids[0]] = node
        return head

    def _evict(self, keep: _Node | None = None) -> None:
        """Drop the least recently used leaf until the budget holds (never ``keep``, the one just stored, nor
        its ancestors: they lead to it; together they fit, as `insert` cut the sequence to the budget)."""
        protected = set()
        node = keep
        while node is not None:
            protected.add(id(node))
            node = node.parent
        while self.nbytes > self.max_bytes:
            leaves = [n for n in self._nodes() if not n.children and id(n) not in protected]
            self._remove(min(leaves, key=lambda n: n.used))

    def _remove(self, node: _Node) -> None:
        del node.parent.children[node.ids[0]]
        self.tokens -= len(node.ids)
        self.stats.evicted_tokens += len(node.ids)

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
