"""The lockstep engine: the runner's interface, every call carried out by the whole group.

Owns what the scheduler sees in distributed serving: `LockstepEngine(group)` has the
functions the scheduler calls on `mlxlite.engine.runner` (`load`, `unload`, `tokenize`,
`detokenize`, `token_bytes`, `context_window`, `embed`, `decoder`, `cache_prefix`,
`cache_nbytes`), and each goes to rank 0, which sends it on to every rank (`rank.py`). What
comes back stands in for the real objects: `RemoteLoaded` (a loaded model's metadata, its
chat template rebuilt here, placement in `info["placement"]`), `RemoteDecoder` (the decoder
protocol: `add`, `step(is_cancelled)` with the cancelled keys decided once, here, for every
rank), `CacheHandle` (a kept KV cache that lives on the ranks, freed there when the prefix
cache lets go of it). After a restart, stale objects reload or recreate themselves in the
new group. The scheduler, batching and prefix cache run unchanged. Never imports mlx.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from mlxlite import config
from mlxlite.dist.group import Group
from mlxlite.errors import MlxliteError, RankLost, Unsupported
from mlxlite.formats import templates
from mlxlite.options import Options


@dataclass
class RemoteLoaded:
    name: str
    digest: str
    entry: Any
    generation: int = 0
    context_length: int = 0
    eos_token_ids: frozenset = frozenset()
    size_bytes: int = 0
    info: dict = field(default_factory=dict)
    defaults: Options = field(default_factory=Options)
    system: str | None = None
    messages: list = field(default_factory=list)
    template: Any = None
    bos_token: str | None = None
    table: list | None = None


class CacheHandle:
    """A KV cache kept on every rank under one id; `nbytes` is rank 0's share."""

    __slots__ = ("ident", "generation", "nbytes", "tokens", "__weakref__")

    def __init__(self, group: Group, ident: int, generation: int, nbytes: int, tokens: int) -> None:
        self.ident, self.generation, self.nbytes, self.tokens = ident, generation, nbytes, tokens
        weakref.finalize(self, group.free, generation, ident)


def _template(spec: tuple) -> Any:
    kind, source, bos, eos, name = spec
    if kind == "GoChatTemplate":
        return templates.GoChatTemplate(source, name=name)
    return templates.ChatTemplate(source, bos_token=bos or None, eos_token=eos or None, name=name)


class LockstepEngine:
    """The runner's interface over a `Group` (see module doc)."""

    def __init__(self, group: Group) -> None:
        self.group = group

    # ---- the daemon's life -----------------------------------------------------------------
    def attach(self, daemon_url: str) -> None:
        """Start the group; its ranks fetch missing blobs from `daemon_url`."""
        self.group.start(daemon_url)

    def shutdown(self) -> None:
        self.group.stop()

    def health(self) -> dict:
        return self.group.health()

    def memory_budget(self) -> int:
        """The group's: a model split across the ranks may be bigger than any one of them holds."""
        return self.group.memory_budget() or int(config.memory_budget())

    # ---- models ---------------------------------------------------------------------------
    def load(self, store: Any, entry: Any) -> RemoteLoaded:
        store.check_integrity(entry)    # rank 0's copy is what the ranks fetch: verified first
        loaded = RemoteLoaded(entry.name.display, entry.digest, entry)
        self._load(loaded)
        return loaded

    def _load(self, loaded: RemoteLoaded) -> None:
        gen = self.group.generation
        meta = self.group.call("load", loaded.entry.name.display, loaded.entry.manifest.raw, self.group.daemon_url)
        loaded.generation = gen
        loaded.context_length = int(meta["context_length"])
        loaded.eos_token_ids = frozenset(meta["eos_token_ids"])
        loaded.size_bytes = int(meta["size_bytes"])
        loaded.info = dict(meta["info"])
        loaded.defaults = meta["defaults"]
        loaded.system, loaded.messages = meta["system"], list(meta["messages"] or [])
        loaded.bos_token = meta["bos_token"]
        loaded.template = _template(meta["template"])
        loaded.table = None

    def _ready(self, loaded: RemoteLoaded) -> None:
        """A model loaded by an earlier generation loads again in this one."""
        if loaded.generation != self.group.generation:
            self._load(loaded)

    def unload(self, loaded: RemoteLoaded) -> None:
        if loaded.generation == self.group.generation:
            try:
                self.group.call("unload", loaded.digest)
            except RankLost:
                pass
        loaded.table = None

    # ---- tokens -------------------------------------------------------------------------
    def tokenize(self, loaded: RemoteLoaded, text: str, add_special: bool = True) -> list[int]:
        self._ready(loaded)
        return self.group.call("tokenize", loaded.digest, text, add_special)

    def detokenize(self, loaded: RemoteLoaded, tokens: list[int]) -> str:
        self._ready(loaded)
        return self.group.call("detokenize", loaded.digest, list(tokens))

    def token_bytes(self, loaded: RemoteLoaded) -> list[bytes]:
        self._ready(loaded)
        if loaded.table is None:
            loaded.table = self.group.call("token_bytes", loaded.digest)
        return loaded.table

    def context_window(self, loaded: RemoteLoaded, options: Options) -> int:
        n = options.num_ctx or int(config.get("num_ctx"))   # the engine's rule (engine.model.context_window)
        return max(4, min(n, loaded.context_length))

    def embed(self, loaded: RemoteLoaded, texts: list[str], truncate: bool = True) -> list[list[float]]:
        self._ready(loaded)
        return self.group.call("embed", loaded.digest, list(texts))

    # ---- batching and the prefix cache ----------------------------------------------------------
    def decoder(self, loaded: RemoteLoaded, max_batch: int, keep_caches: bool = False) -> RemoteDecoder:
        return RemoteDecoder(self, loaded, max_batch, keep_caches)

    def cache_nbytes(self, cache: CacheHandle) -> int:
        return cache.nbytes

    def cache_prefix(self, cache: CacheHandle, n: int) -> CacheHandle | None:
        if cache.generation != self.group.generation:
            return None     # kept by a group that is gone: prefill from scratch
        ident = self.group.call("cache_prefix", cache.ident, int(n))
        if ident is None:
            return None
        share = cache.nbytes * n // max(1, cache.tokens)
        return CacheHandle(self.group, ident, cache.generation, share, int(n))


class RemoteDecoder:
    """The decoder protocol (`sched/batch.py`) over the group: the decoder itself runs on every rank."""

    def __init__(self, engine: LockstepEngine, loaded: RemoteLoaded, max_batch: int, keep_caches: bool) -> None:
        self.engine, self.loaded = engine, loaded
        self.max_batch, self.keep_caches = max_batch, keep_caches
        self.generation = -1
        self.ident = 0
        self._keys: set = set()
        self._kept: dict[Any, tuple[list[int], CacheHandle]] = {}
        self._counts = (0, 0, 0)    # len, active, waiting, as of rank 0's last answer

    def _ready(self) -> None:
        group = self.engine.group
        if self.generation != group.generation:
            self.engine._ready(self.loaded)
            self.ident = group.call("decoder", self.loaded.digest, self.max_batch, self.keep_caches)
            self.generation = group.generation
            self._keys.clear()
            self._kept.clear()
            self._counts = (0, 0, 0)

    def __len__(self) -> int:
        return self._counts[0] if self.generation == self.engine.group.generation else len(self._keys)

    @property
    def active(self) -> int:
        return self._counts[1]

    @property
    def waiting(self) -> int:
        return self._counts[2]

    def add(self, key: Any, tokens: list[int], options: Options, *, truncate: bool = False,
            constraint: Any = None, prompt_cache: CacheHandle | None = None, cached_tokens: int = 0,
            top_logprobs: int = 0, logprobs: bool = True, vision: Any = None) -> int:
        if vision is not None:
            raise Unsupported("images are not served across ranks: serve the vision model without --ranks")
        self._ready()
        spec = None if constraint is None else constraint.spec
        cache_id = None
        if prompt_cache is not None and prompt_cache.generation == self.generation:
            cache_id = prompt_cache.ident
        n, self._counts = self.engine.group.call(
            "add", self.ident, key, [int(t) for t in tokens], options, truncate, spec, cache_id,
            int(cached_tokens), int(top_logprobs), bool(logprobs))
        self._keys.add(key)
        return n

    def step(self, is_cancelled: Any) -> list[tuple[Any, Any]]:
        if self.generation != self.engine.group.generation:
            raise RankLost(self.engine.group.detail or "the group was restarted")
        cancelled = frozenset(k for k in self._keys if is_cancelled(k))
        events, kept, self._counts = self.engine.group.call("step", self.ident, cancelled)
        for key, event in events:
            if event is None or hasattr(event, "reason") or isinstance(event, MlxliteError):
                self._keys.discard(key)
        gen = self.generation
        for key, (tokens, ident, nbytes) in kept.items():
            self._kept[key] = (tokens, CacheHandle(self.engine.group, ident, gen, nbytes, len(tokens)))
        return events

    def take_cache(self, key: Any) -> tuple[list[int], CacheHandle] | None:
        return self._kept.pop(key, None)

    def close(self) -> None:
        self._keys.clear()
        self._kept.clear()
        if self.generation == self.engine.group.generation:
            try:
                self.engine.group.call("close", self.ident)
            except RankLost:
                pass
        self.generation = -1
