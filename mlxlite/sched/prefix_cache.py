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


@dataclass
class _Entry:
    model: str
    tokens: tuple[int, ...]
    cache: Any
    nbytes: int


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[int, _Entry] = OrderedDict()   # id -> entry, least recent first
        self._ids = 0
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
            best_id, best = None, 0
            limit = len(tokens) - 1
            for eid, e in self._entries.items():
                if e.model != model:
                    continue
                n = min(common_prefix(e.tokens, tokens), limit)
                if n > best:
                    best_id, best = eid, n
            if best_id is None or best < MIN_TOKENS:
                self.misses += 1
                return None
            self._entries.move_to_end(best_id)
            self.hits += 1
            self.tokens_saved += best
            return Hit(best, self._entries[best_id].cache)

    def insert(self, model: str, tokens: list[int], cache: Any, nbytes: int) -> bool:
        """Remember `cache` (holding exactly `tokens`); False if it can't fit at all."""
        key = tuple(tokens)
        with self._lock:
            if nbytes > self.max_bytes or len(key) < MIN_TOKENS:
                return False
            for eid, e in list(self._entries.items()):
                if e.model == model and len(e.tokens) <= len(key) and key[:len(e.tokens)] == e.tokens:
                    self._drop(eid)
            self._ids += 1
            self._entries[self._ids] = _Entry(model, key, cache, int(nbytes))
            self._bytes += int(nbytes)
            while self._bytes > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))
            return True

    def _drop(self, eid: int) -> None:
        e = self._entries.pop(eid)
        self._bytes -= e.nbytes

    def entries(self, model: str) -> list[tuple[tuple[int, ...], Any, int]]:
        """(tokens, cache, nbytes) of one model's entries, most recently used first."""
        with self._lock:
            return [(e.tokens, e.cache, e.nbytes) for e in reversed(self._entries.values()) if e.model == model]

    def drop_model(self, model: str) -> None:
        with self._lock:
            for eid in [i for i, e in self._entries.items() if e.model == model]:
                self._drop(eid)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "tokens_saved": self.tokens_saved,
                    "entries": len(self._entries), "bytes": self._bytes}
