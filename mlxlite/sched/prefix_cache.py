"""Prompt-prefix cache: pure bookkeeping of (model, tokens) -> KV cache, LRU, byte-bounded.

Contract:
  - `PrefixCache(max_bytes)`; `lookup(model, tokens) -> Hit | None`: the entry sharing the
    longest prefix with `tokens` (at most `len(tokens) - 1`: the last prompt token is always
    computed, it yields the first logits). `Hit.tokens` is how many prompt tokens the entry
    covers; the caller cuts the entry's cache to that length (the engine's `cache_prefix`)
    and must never modify `Hit.cache` itself.
  - `insert(model, tokens, cache, nbytes)`: remember a cache that holds exactly `tokens`.
    Entries whose tokens are a prefix of the new ones are dropped (the new one serves them
    too); then least recently used entries go until the total fits `max_bytes`. An entry
    larger than the whole budget is not kept.
  - `drop_model(model)` (on unload), `entries(model)` (for persisting), `clear()`,
    `stats()` (hits, misses, tokens saved, entries, bytes) for metrics.
Lookup and insertion cost grows with the prompt's length, never with the number of entries:
each model's entries sit in a radix tree over their tokens (an edge holds a run of tokens, a
node branches on the next token), so the longest shared prefix is one walk from the root.
The caches are opaque here (sizes come from the engine), so this module has no mlx and is
exact to test. Thread-safe (one lock), though only the MLX thread inserts and looks up.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MIN_TOKENS = 4          # shorter shared prefixes aren't worth copying a cache for


@dataclass(frozen=True)
class Hit:
    tokens: int             # prompt tokens the cache covers
    cache: Any              # the stored cache (read-only for the caller)


class _Node:
    """A point in one model's radix tree: the tokens from the root to here are the parent's
    plus `edge`. `entry` is the entry holding exactly those tokens, if any."""

    __slots__ = ("edge", "parent", "children", "entry")

    def __init__(self, edge: tuple[int, ...], parent: _Node | None) -> None:
        self.edge = edge
        self.parent = parent
        self.children: dict[int, _Node] = {}    # first token of the child's edge -> child
        self.entry: _Entry | None = None


@dataclass(eq=False)
class _Entry:
    model: str
    tokens: tuple[int, ...]
    cache: Any
    nbytes: int
    node: _Node | None = None


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _walk(root: _Node, key: tuple[int, ...]) -> tuple[_Node, int, int]:
    """(node, shared, into): the first `shared` tokens of `key` match from the root down,
    ending `into` tokens into `node`'s edge (all of it when they end exactly at `node`)."""
    node, i, n = root, 0, len(key)
    while i < n:
        child = node.children.get(key[i])
        if child is None:
            break
        edge = child.edge
        end = i + len(edge)
        if key[i:end] != edge:
            into = common_prefix(edge, key[i:end])
            return child, i + into, into
        node, i = child, end
    return node, i, len(node.edge)


def _any_entry(node: _Node) -> _Entry:
    """An entry at or below `node` (pruning guarantees every leaf holds one)."""
    while node.entry is None:
        node = next(iter(node.children.values()))
    return node.entry


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._lru: OrderedDict[int, _Entry] = OrderedDict()    # id(entry) -> entry, least recent first
        self._roots: dict[str, _Node] = {}                      # model -> its radix tree
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, model: str, tokens: list[int]) -> Hit | None:
        with self._lock:
            root = self._roots.get(model)
            best, entry = 0, None
            if root is not None:
                node, shared, _ = _walk(root, tuple(tokens))
                best = min(shared, len(tokens) - 1)
                if best >= MIN_TOKENS:
                    entry = _any_entry(node)    # every entry below `node` shares `shared` tokens
            if entry is None:
                self.misses += 1
                return None
            self._lru.move_to_end(id(entry))
            self.hits += 1
            self.tokens_saved += best
            return Hit(best, entry.cache)

    def insert(self, model: str, tokens: list[int], cache: Any, nbytes: int) -> bool:
        """Remember `cache` (holding exactly `tokens`); False if it can't fit at all."""
        key = tuple(tokens)
        with self._lock:
            if nbytes > self.max_bytes or len(key) < MIN_TOKENS:
                return False
            root = self._roots.get(model)
            if root is not None:
                # Entries on the path hold prefixes of `key` (the same tokens too): the new one serves them.
                node, _, into = _walk(root, key)
                if into < len(node.edge):
                    node = node.parent
                doomed = []
                while node is not None:
                    if node.entry is not None:
                        doomed.append(node.entry)
                    node = node.parent
                for old in doomed:
                    self._drop(old)
            node = self._place(self._roots.setdefault(model, _Node((), None)), key)
            entry = _Entry(model, key, cache, int(nbytes), node)
            node.entry = entry
            self._lru[id(entry)] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and self._lru:
                self._drop(next(iter(self._lru.values())))
            return True

    @staticmethod
    def _place(root: _Node, key: tuple[int, ...]) -> _Node:
        """The node for exactly `key`, made (splitting an edge if need be) when missing."""
        node, shared, into = _walk(root, key)
        if into < len(node.edge):       # the match ends inside node's edge: split it there
            parent = node.parent
            middle = _Node(node.edge[:into], parent)
            parent.children[middle.edge[0]] = middle
            node.edge = node.edge[into:]
            node.parent = middle
            middle.children[node.edge[0]] = node
            node = middle
        if shared < len(key):
            leaf = _Node(key[shared:], node)
            node.children[leaf.edge[0]] = leaf
            node = leaf
        return node

    def _drop(self, entry: _Entry) -> None:
        self._lru.pop(id(entry), None)
        self._bytes -= entry.nbytes
        node, entry.node = entry.node, None
        if node is not None:
            node.entry = None
            self._prune(entry.model, node)

    def _prune(self, model: str, node: _Node) -> None:
        """Remove what no entry needs below the root: empty leaves go, and a node without an
        entry and with one child merges into it (so every leaf holds an entry)."""
        while node.parent is not None and node.entry is None and len(node.children) <= 1:
            parent = node.parent
            if node.children:
                child = next(iter(node.children.values()))
                child.edge = node.edge + child.edge
                child.parent = parent
                parent.children[node.edge[0]] = child
                return
            del parent.children[node.edge[0]]
            node = parent
        if node.parent is None and not node.children and node.entry is None:
            self._roots.pop(model, None)

    def entries(self, model: str) -> list[tuple[tuple[int, ...], Any, int]]:
        """(tokens, cache, nbytes) of one model's entries, most recently used first."""
        with self._lock:
            return [(e.tokens, e.cache, e.nbytes) for e in reversed(self._lru.values()) if e.model == model]

    def drop_model(self, model: str) -> None:
        with self._lock:
            for entry in [e for e in self._lru.values() if e.model == model]:
                self._lru.pop(id(entry))
                self._bytes -= entry.nbytes
                entry.node = None
            self._roots.pop(model, None)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._roots.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "tokens_saved": self.tokens_saved,
                    "entries": len(self._lru), "bytes": self._bytes}
