"""One rank of a group: the process MLX's launcher starts on every host (`python -m mlxlite.dist.rank`).

Owns a rank's life: it joins the group (`engine.distributed.init_group`), connects back to
the daemon (a heartbeat connection from every rank, carrying its memory; the command
connection from rank 0 only), then runs the step loop. Rank 0 takes each engine call from
the daemon, sends it on to the other ranks over `mx.distributed` (`broadcast`), runs it and
answers; the other ranks run every call they receive, in the same order, on their own
shard, each woken by one byte from the daemon first (an idle rank blocks on its socket,
not in a collective that spins). A call that only reads rank 0's tokenizer (`LOCAL`) is not sent on. Models load
from the rank's own store; blobs it lacks come from the daemon's blob API, verified by
digest as they are written. Never serves HTTP, never decides that a rank is lost (the
daemon does: `group`).
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.request
from typing import Any

from mlxlite import names
from mlxlite.constrain import TokenConstraint
from mlxlite.dist import wire
from mlxlite.errors import MlxliteError
from mlxlite.store import Manifest, Store

BEAT_SECONDS = 0.5


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def fetch_model(store: Any, name: str, raw: bytes, daemon: str) -> Any:
    """The model in this rank's store, its missing blobs first fetched from the daemon
    (`GET /api/blobs/<digest>`), each verified against its digest as it is written."""
    manifest = Manifest.parse(raw)
    try:
        entry = store.resolve(name)
        if entry.digest == manifest.digest and all(store.has_blob(b.digest, b.size) for b in manifest.blobs):
            return entry
    except MlxliteError:
        pass
    headers = {}
    if os.environ.get("MLXLITE_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['MLXLITE_API_KEY']}"
    for blob in manifest.blobs:
        if store.has_blob(blob.digest, blob.size):
            continue
        req = urllib.request.Request(f"{daemon}/api/blobs/{blob.digest}", headers=headers)
        with urllib.request.urlopen(req, timeout=60) as resp:
            store.put_stream(resp, expected=blob.digest)
    store.write_manifest(name, raw)
    return store.resolve(name)


class Rank:
    """A rank's engine state: loaded models, decoders and kept KV caches, by ids every rank
    assigns in the same order (so rank 0's answers name the same objects everywhere)."""

    def __init__(self, group: Any, engine: Any, distributed: Any) -> None:
        self.group, self.engine, self.dist = group, engine, distributed
        self.rank, self.size = group.rank(), group.size()
        self.models: dict[str, Any] = {}
        self.decoders: dict[int, Any] = {}
        self.caches: dict[int, Any] = {}
        self.next_id = 1
        self.weights: dict[str, int] = {}
        self._store = None

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    @property
    def store(self) -> Any:
        if self._store is None:
            self._store = Store()
        return self._store

    # ---- calls ----------------------------------------------------------------------------
    def run(self, op: str, args: tuple, free: list[int]) -> Any:
        for cid in free:
            self.caches.pop(cid, None)
        return getattr(self, f"op_{op}")(*args)

    def op_ping(self) -> str:
        return "pong"

    def op_noop(self) -> None:
        """Broadcast to every rank, nothing run: what one step's message costs (bench/dist.py)."""

    def op_load(self, name: str, raw: bytes, daemon: str) -> dict:
        entry = fetch_model(self.store, names.parse(name), raw, daemon)
        held = self.dist.reset_peak()      # the peak reported is this load's, not other models'
        # Sharded before it is read: safetensors lazily, a GGUF pipeline rank reads only its layers.
        loaded = self.engine.load(self.store, entry, lazy=True, pick=self.dist.layer_pick(self.group))
        placement = self.dist.shard(loaded, self.group)
        placement["bytes_per_rank"] = self.dist.gather_ints(self.group, int(loaded.size_bytes))
        placement["peak_bytes_per_rank"] = self.dist.gather_ints(self.group, self.dist.peak_bytes(held))
        self.models[entry.digest] = loaded
        self.weights[entry.digest] = int(loaded.size_bytes)
        template = loaded.template
        return {
            "context_length": loaded.context_length, "eos_token_ids": loaded.eos_token_ids,
            "size_bytes": sum(placement["bytes_per_rank"]), "info": {**loaded.info, "placement": placement},
            "defaults": loaded.defaults, "system": loaded.system, "messages": loaded.messages,
            "bos_token": loaded.bos_token,
            "template": (type(template).__name__, template.source, getattr(template, "bos_token", None),
                         getattr(template, "eos_token", None), template.name),
        }

    def op_unload(self, digest: str) -> None:
        loaded = self.models.pop(digest, None)
        self.weights.pop(digest, None)
        for did in [d for d, dec in self.decoders.items() if dec.loaded is loaded]:
            self.decoders.pop(did).close()
        if loaded is not None:
            self.engine.unload(loaded)

    def op_tokenize(self, digest: str, text: str, add_special: bool) -> list[int]:
        return self.engine.tokenize(self.models[digest], text, add_special=add_special)

    def op_detokenize(self, digest: str, tokens: list[int]) -> str:
        return self.engine.detokenize(self.models[digest], tokens)

    def op_token_bytes(self, digest: str) -> list[bytes]:
        return list(self.engine.token_bytes(self.models[digest]))

    def op_embed(self, digest: str, texts: list[str]) -> list[list[float]]:
        with self.dist.step_stream():
            return self.engine.embed(self.models[digest], texts)

    def op_decoder(self, digest: str, max_batch: int, keep_caches: bool) -> int:
        did = self._new_id()
        self.decoders[did] = self.dist.LockstepDecoder(self.models[digest], max_batch, self.group,
                                                       keep_caches=keep_caches)
        return did

    def op_add(self, did: int, key: Any, tokens: list[int], options: Any, truncate: bool, spec: Any,
               cache_id: int | None, cached_tokens: int, top_logprobs: int, logprobs: bool = True) -> int:
        dec = self.decoders[did]
        constraint = None
        if spec is not None:
            loaded = dec.loaded
            constraint = TokenConstraint(spec, self.engine.token_bytes(loaded), loaded.eos_token_ids)
        cache = self.caches.pop(cache_id, None) if cache_id is not None else None
        n = dec.add(key, tokens, options, truncate=truncate, constraint=constraint,
                    prompt_cache=cache, cached_tokens=cached_tokens if cache is not None else 0,
                    top_logprobs=top_logprobs, logprobs=logprobs)
        return n, (len(dec), dec.active, dec.waiting)

    def op_step(self, did: int, cancelled: frozenset) -> tuple[list, dict, tuple]:
        dec = self.decoders[did]
        events = dec.step(lambda key: key in cancelled)
        kept = {}
        for key, event in events:
            if event is None or not hasattr(event, "reason"):
                continue
            got = dec.take_cache(key)
            if got is not None and event.reason != "cancel":
                tokens, cache = got
                cid = self._new_id()
                self.caches[cid] = cache
                kept[key] = (list(tokens), cid, int(self.engine.cache_nbytes(cache)))
        return events, kept, (len(dec), dec.active, dec.waiting)

    def op_close(self, did: int) -> None:
        dec = self.decoders.pop(did, None)
        if dec is not None:
            dec.close()

    def op_cache_prefix(self, cid: int, n: int) -> int | None:
        cache = self.caches.get(cid)
        if cache is None:
            return None
        cut = self.engine.cache_prefix(cache, n)
        if cut is None:
            return None
        new = self._new_id()
        self.caches[new] = cut
        return new

    def op_stop(self) -> None:
        raise SystemExit(0)


def _beat(sock: socket.socket, state: Rank, lock: threading.Lock) -> None:
    while True:
        try:
            with lock:
                wire.send(sock, {"rss": rss_bytes(), "weights": sum(state.weights.values())})
        except wire.ChannelClosed:
            os._exit(3)     # the daemon is gone: nothing left to serve
        time.sleep(BEAT_SECONDS)


def _answer(op: str, fn: Any) -> tuple:
    try:
        return ("ok", fn())
    except SystemExit:
        raise
    except MlxliteError as exc:
        return ("err", type(exc).__name__, str(exc), exc.status)
    except Exception as exc:
        traceback.print_exc()
        return ("err", "MlxliteError", f"internal error in {op}: {type(exc).__name__}: {exc}", 500)


def main(argv: list[str] | None = None) -> int:
    rank_home = os.environ.get("MLXLITE_DIST_RANK_HOME", "")
    if rank_home:   # each rank its own store (the daemon's, when unset)
        os.environ["MLXLITE_HOME"] = rank_home.replace("{rank}", os.environ.get("MLX_RANK", "0"))
    faulthandler.register(signal.SIGUSR1)   # `kill -USR1 <pid>` prints where a stuck rank is
    control = os.environ["MLXLITE_DIST_CONTROL"]
    secret = os.environ["MLXLITE_DIST_SECRET"]
    backend = os.environ.get("MLXLITE_DIST_BACKEND", "any")
    from mlxlite.engine import blas  # deferring mlx: OpenBLAS must be loaded before it

    blas.preload()
    from mlxlite.engine import distributed, runner  # deferring mlx to this process's start

    group = distributed.init_group(backend)
    state = Rank(group, runner, distributed)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "size": state.size,
            "budget": int(runner.memory_budget())}
    beat = _connect(control)
    wire.hello(beat, secret, state.rank, "beat", info)
    threading.Thread(target=_beat, args=(beat, state, threading.Lock()), daemon=True).start()
    cmd = None
    if state.rank == 0:
        cmd = _connect(control)
        wire.hello(cmd, secret, 0, "cmd", info)
    distributed.barrier(group)
    try:
        while True:
            if cmd is not None:
                op, args, free = wire.recv(cmd)
                if op not in wire.LOCAL:
                    distributed.broadcast(group, pickle.dumps((op, args, free)))
                reply = _answer(op, lambda op=op, args=args, free=free: state.run(op, args, free))
                wire.send(cmd, reply)
            else:
                # Idle ranks wait here, on their socket: MLX's ring backend spins a core while
                # a collective waits for its peers, so they join the broadcast only when told.
                if wire.read_exact(beat, 1) != wire.GO:
                    raise wire.ChannelClosed("unexpected byte from the daemon")
                op, args, free = pickle.loads(distributed.broadcast(group, None))
                reply = _answer(op, lambda op=op, args=args, free=free: state.run(op, args, free))
                if reply[0] == "err" and reply[3] >= 500:
                    print(f"rank {state.rank}: {op} failed: {reply[2]}", file=sys.stderr, flush=True)
    except (SystemExit, wire.ChannelClosed):
        pass
    runner.end_thread()
    os._exit(0)     # a group's teardown can hang on a peer that is already gone


if __name__ == "__main__":
    sys.exit(main())
