"""The one thread that owns MLX: a bounded job queue, model residency, keep-alive.

Contract: HTTP threads call `Scheduler.submit(job)` and get a `Ticket` (a reply queue
plus a cancel event) or `Busy` at once when `max_queue` jobs already wait. Only the
scheduler thread calls the engine (`mlxlite.engine.runner`, imported lazily on that thread, or
a fake with the same functions), so no other thread ever touches MLX. Events come back
in order: `Ready` (model loaded, prompt tokenized), then `Piece`s and one `Finish` from
the runner (or `Embedded`, `Tokenized`), or a single `Failed`. A ticket whose cancel
event is set stops within one engine step (the runner checks it between prefill chunks
and decode steps); a queued job that is cancelled is dropped without running.

Shutdown: `close()` cancels what runs, refuses what waits, unloads every model (its prefix
caches are saved, `batch`), then the MLX thread's last call is the engine's `end_thread`
(MLX's per-thread streams freed before the thread exits) and `close` returns whether the
thread stopped in time. `on_event(record)`, when set, hears each load and unload (the daemon
logs them: model, load time).

Residency: a loaded model stays for its keep-alive (request value, else the
`keep_alive` setting; 0 unloads after the request, negative keeps it forever), at most
`max_loaded_models` at once, the least recently used idle one evicted first.

Batching (`batch.Batches`): a generate job is admitted into its model's decoder
(prompt rendered, longest cached prefix looked up, `Ready` sent); the loop then steps every
decoder with work (round-robin across models) between taking new jobs, so requests join a
running batch at the next step and leave when done or cancelled; `num_parallel` caps a
batch. A model is busy while its decoder holds sequences: only idle models are evicted
(LRU) or expire; a job for a model that can't be loaded yet (all slots busy, or over
`memory_budget_bytes` until a busy model goes idle) waits; one that could never fit gets
`OutOfMemory`. Without a set budget the engine's `memory_budget()` decides on the MLX
thread (the GPU's memory on a GPU, host RAM on the CPU). Load/embed jobs run between
steps. Models interleave step by step when they are loaded together (`max_loaded_models` >= 2, default 3); at 1, a job for another
model waits until the running model's batch drains (its members are not preempted). `max_queue` bounds the jobs queued plus
those admitted but not yet decoding. This module never imports mlx itself.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxlite import config
from mlxlite.errors import BadRequest, Busy, Cancelled, MlxliteError, OutOfMemory
from mlxlite.sched.batch import Batches
from mlxlite.sched.jobs import (
    Done,
    Embedded,
    EmbedJob,
    Failed,
    GenerateJob,
    LoadJob,
    Ticket,
    Tokenized,
    TokenizeJob,
)

log = logging.getLogger("mlxlite.sched")


class _Wait(Exception):
    """The job can't start yet (its model can't load until a busy one goes idle)."""


@dataclass
class Resident:
    """A loaded model and its residency bookkeeping (touched on the MLX thread only)."""

    entry: Any
    loaded: Any
    expires_at: float | None        # wall-clock seconds; None = never
    last_used: float
    token_bytes: list | None = None
    load_seconds: float = 0.0


@dataclass(frozen=True)
class ResidentInfo:
    """A snapshot of one loaded model for `/api/ps`."""

    name: str
    digest: str
    size: int
    context_length: int
    expires_at: float | None
    info: dict
    active: bool
    load_seconds: float = 0.0       # how long its load took (integrity check, weights, tokenizer)


_STOP = object()


class Scheduler:
    """Owns the MLX thread. `engine` defaults to `mlxlite.engine.runner`, imported on that thread."""

    def __init__(self, store: Any = None, engine: Any = None, *, max_queue: int | None = None,
                 keep_alive: float | None = None, max_loaded_models: int | None = None,
                 num_parallel: int | None = None, prefix_cache_bytes: int | None = None,
                 memory_budget: int | None = None) -> None:
        self.store = store
        self._engine = engine
        self.max_queue = max_queue if max_queue is not None else int(config.get("max_queue"))
        self.default_keep_alive = (keep_alive if keep_alive is not None
                                   else config.parse_duration(config.get("keep_alive")))
        self.max_loaded = max(1, max_loaded_models if max_loaded_models is not None
                              else int(config.get("max_loaded_models")))
        self.num_ctx = int(config.get("num_ctx"))    # read once: config.get reads config.json
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0                       # queued, not yet taken by the MLX thread
        self._lock = threading.Lock()
        self._models: OrderedDict[str, Resident] = OrderedDict()   # digest -> resident, LRU first
        self._snapshot: list[ResidentInfo] = []
        self._active: Ticket | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.counters = {"jobs": 0, "cancelled_in_queue": 0, "loads": 0, "unloads": 0,
                         "prompt_tokens": 0, "eval_tokens": 0, "cached_tokens": 0}
        self.memory_budget = config.memory_budget(memory_budget)
        # A budget given or set is final; else the engine's, asked on the MLX thread (it knows the device).
        self._budget_final = memory_budget is not None or int(config.get("memory_budget_bytes") or 0) > 0
        self.on_event: Callable[[dict], None] | None = None
        self.batches = Batches(
            self, num_parallel if num_parallel is not None else int(config.get("num_parallel")),
            prefix_cache_bytes if prefix_cache_bytes is not None else int(config.get("prefix_cache_bytes")))
        self.metrics = self.batches.metrics
        self._deferred: list[Ticket] = []       # jobs waiting for a model slot or memory
        self._doomed: set[str] = set()          # digests to unload once their batch drains
        self._waiting_in_batches = 0            # admitted, not yet decoding (counts toward max_queue)

    # ---- called from any thread -------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mlxlite-mlx", daemon=True)
            self._thread.start()
        return self

    def submit(self, job: Any) -> Ticket:
        """Queue a job; `Busy` at once when `max_queue` jobs are already waiting."""
        if self._closed:
            raise Busy("server is shutting down")
        ticket = Ticket(job)
        with self._lock:
            if self._pending + self._waiting_in_batches >= self.max_queue:
                raise Busy(f"server busy, please try again: maximum pending requests exceeded "
                           f"({self.max_queue})")
            self._pending += 1
        self.start()
        self._queue.put(ticket)
        return ticket

    def depth(self) -> int:
        """Jobs waiting, not counting those running (decoding)."""
        with self._lock:
            return self._pending + self._waiting_in_batches

    def busy(self) -> bool:
        return self._active is not None or self.batches.has_work()

    def ps(self) -> list[ResidentInfo]:
        with self._lock:
            return list(self._snapshot)

    def close(self, timeout: float = 10.0) -> bool:
        """Cancel what runs, drop what waits, unload everything, stop the thread; False if
        the thread is still running after `timeout` seconds."""
        self._closed = True
        active = self._active
        if active is not None:
            active.cancel()
        self.batches.cancel_all()       # decoding stops within one step or prefill chunk
        if self._thread is None:
            return True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- the MLX thread ---------------------------------------------------------------
    @property
    def engine(self) -> Any:
        if self._engine is None:
            from mlxlite.engine import runner  # lazy, on the MLX thread: the server starts without mlx

            self._engine = runner
        return self._engine

    def _loop(self) -> None:
        try:
            self._serve_jobs()
        finally:
            # Last on this thread: MLX's per-thread streams go before the thread exits (else
            # their teardown can race the interpreter's exit and abort a clean shutdown).
            if self._engine is not None and hasattr(self._engine, "end_thread"):
                self._safe(self._engine.end_thread)

    def _serve_jobs(self) -> None:
        while True:
            items: list[Any] = []
            busy = self.batches.has_work()
            try:    # block only when nothing is decoding; else take what is there and step
                items.append(self._queue.get_nowait() if busy else
                             self._queue.get(timeout=self._next_expiry_wait(bool(self._deferred))))
                while True:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if _STOP in items:
                for ticket in items:
                    if ticket is not _STOP:
                        ticket.replies.put(Failed(Busy("server is shutting down")))
                break
            deferred, self._deferred = self._deferred, []
            self.counters["jobs"] += len(items)
            for ticket in deferred + items:
                self._take(ticket)
            self._safe(self.batches.step)
            with self._lock:    # one update, so a job is always counted once toward max_queue
                self._pending -= len(items)
                self._waiting_in_batches = self.batches.waiting() + len(self._deferred)
            self._safe(self._expire)
        # Shutting down: refuse what waits, release every model.
        for ticket in self._deferred:
            ticket.replies.put(Failed(Busy("server is shutting down")))
        self.batches.close()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Ticket):
                item.replies.put(Failed(Busy("server is shutting down")))
        for digest in list(self._models):
            self._safe(self._unload, digest)

    def _take(self, ticket: Ticket) -> None:
        """Run (or admit) one job; errors go to its ticket, never up."""
        if ticket.cancelled:
            self.counters["cancelled_in_queue"] += 1
            ticket.replies.put(Failed(Cancelled("request canceled")))
            return
        self._active = ticket
        try:
            self._run(ticket)
        except _Wait:
            self._deferred.append(ticket)
        except MlxliteError as exc:
            ticket.replies.put(Failed(exc))
        except Exception as exc:  # never let one request kill the MLX thread
            log.exception("job %d failed", ticket.id)
            ticket.replies.put(Failed(MlxliteError(f"internal error: {type(exc).__name__}: {exc}")))
        finally:
            self._active = None

    def _safe(self, fn: Callable[..., Any], *args: Any) -> None:
        """Housekeeping must never kill the MLX thread (every waiting client would hang)."""
        try:
            fn(*args)
        except Exception:
            log.exception("scheduler housekeeping failed")

    def _run(self, ticket: Ticket) -> None:
        job = ticket.job
        if isinstance(job, LoadJob):
            keep = self._keep(job.keep_alive)
            if keep == 0:
                if job.entry.digest in self.batches.busy_digests():
                    self._doomed.add(job.entry.digest)   # unloads when its batch drains
                else:
                    self._unload(job.entry.digest)
                ticket.replies.put(Done("unload"))
                return
            _, load_seconds = self._acquire(job.entry, ticket)
            self._release(job.entry.digest, keep)
            ticket.replies.put(Done("load", load_seconds))
            return
        resident, load_seconds = self._acquire(job.entry, ticket)
        admitted = False
        try:
            if isinstance(job, EmbedJob):
                self._run_embed(ticket, job, resident, load_seconds)
            elif isinstance(job, TokenizeJob):
                tokens = job.prompt.to_tokens(resident.loaded, self.engine)
                ticket.replies.put(Tokenized(tuple(tokens), load_seconds))
            elif isinstance(job, GenerateJob):
                # Decoded by the batch loop; released when the model's batch drains.
                self.batches.admit(ticket, job, resident, load_seconds)
                admitted = True
            else:
                raise MlxliteError(f"unknown job type {type(job).__name__}")
        finally:
            if not admitted and job.entry.digest not in self.batches.busy_digests():
                self._release(job.entry.digest, self._keep(job.keep_alive))

    def _run_embed(self, ticket: Ticket, job: EmbedJob, resident: Resident, load_seconds: float) -> None:
        engine, loaded = self.engine, resident.loaded
        if ticket.cancelled:
            raise Cancelled("request canceled")
        start = time.perf_counter()
        limit = min(loaded.context_length, int(job.options.get("num_ctx") or self.num_ctx))
        texts = list(job.texts)
        counts = [len(engine.tokenize(loaded, text)) for text in texts]
        for i, count in enumerate(counts):
            if count > limit:
                if not job.truncate:
                    raise BadRequest(f"input {i} is {count} tokens, longer than the context "
                                     f"length {limit}; set truncate to true to cut it")
                tokens = engine.tokenize(loaded, texts[i])[:limit]
                texts[i] = engine.detokenize(loaded, tokens)
                counts[i] = limit
        vectors = engine.embed(loaded, texts) if texts else []
        self.counters["prompt_tokens"] += sum(counts)
        ticket.replies.put(Embedded(vectors, sum(counts), load_seconds, time.perf_counter() - start))

    # ---- residency (MLX thread only) ---------------------------------------------------
    def _keep(self, keep_alive: float | None) -> float:
        return self.default_keep_alive if keep_alive is None else float(keep_alive)

    def draft_model(self, name: str, ticket: Ticket, target: str) -> Any | None:
        """The loaded draft model `name` for a sequence of model `target` (which is never
        evicted for it), released to its keep-alive at once; None when it can't be loaded
        beside the target now (no slot or memory): that sequence drafts by prompt lookup."""
        entry = self.store.resolve(name)
        if entry.digest == target:
            return self._models[target].loaded
        try:
            resident, _ = self._acquire(entry, ticket, protect=target)
        except (_Wait, OutOfMemory) as exc:
            log.warning("draft model %s not loaded beside %s: %s", name, target, exc or "no free slot")
            return None
        if entry.digest not in self.batches.busy_digests():   # a busy model is released when its batch drains
            self._release(entry.digest, self._keep(ticket.job.keep_alive))
        return resident.loaded

    def _acquire(self, entry: Any, ticket: Ticket, protect: str | None = None) -> tuple[Resident, float]:
        resident = self._models.get(entry.digest)
        if resident is not None:
            self._models.move_to_end(entry.digest)
            resident.expires_at = None      # in use: never expires while running
            resident.entry = entry
            self._doomed.discard(entry.digest)
            self._publish()
            return resident, 0.0
        self._make_room(entry, protect)
        if ticket.cancelled:
            raise Cancelled("request canceled")
        engine = self.engine    # importing it (mlx) on the first load is not the model's load time
        start = time.perf_counter()
        loaded = engine.load(self.store, entry)
        seconds = time.perf_counter() - start
        self.counters["loads"] += 1
        resident = Resident(entry, loaded, None, time.time(), load_seconds=seconds)
        self._models[entry.digest] = resident
        self._publish()
        info = getattr(loaded, "info", {}) or {}
        self._event({"event": "load", "model": entry.name.display, "digest": entry.digest,
                     "load_ms": round(seconds * 1e3, 2), "size": int(getattr(loaded, "size_bytes", 0)),
                     "device": info.get("device"), "weights": info.get("weights")})
        return resident, seconds

    def _event(self, record: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event({"time": round(time.time(), 3), **record})
            except Exception:   # a log that fails must not fail the job
                log.exception("scheduler event listener failed")

    def _budget(self) -> int:
        if not self._budget_final and hasattr(self.engine, "memory_budget"):
            self.memory_budget = int(self.engine.memory_budget())
            self._budget_final = True
        return self.memory_budget

    def _make_room(self, entry: Any, protect: str | None = None) -> None:
        """Evict idle models (least recently used first) until `entry` may load: a free slot
        under `max_loaded_models` and its bytes within the memory budget. Busy models are
        never evicted: then the job waits (`_Wait`); past the budget on its own, OutOfMemory."""
        need = int(getattr(entry, "size", 0) or 0)
        budget = self._budget()
        if need > budget:
            raise OutOfMemory(f"model '{entry.name.display}' needs {need} bytes, more than the memory budget "
                              f"of {budget} bytes (memory_budget_bytes)")
        busy = self.batches.busy_digests() | {protect}
        while (len(self._models) >= self.max_loaded
               or sum(int(getattr(r.loaded, "size_bytes", 0)) for r in self._models.values()) + need > budget):
            idle = [d for d in self._models if d not in busy]
            if not idle:
                raise _Wait()
            self._unload(idle[0])

    def _release(self, digest: str, keep: float) -> None:
        resident = self._models.get(digest)
        if resident is None:
            return
        resident.last_used = time.time()
        if digest in self._doomed:
            keep = 0
            self._doomed.discard(digest)
        if keep == 0:
            self._unload(digest)
            return
        resident.expires_at = None if keep < 0 else time.time() + keep
        self._publish()

    def _unload(self, digest: str) -> None:
        resident = self._models.pop(digest, None)
        self.batches.drop(digest)
        if resident is None:
            return
        try:
            self.engine.unload(resident.loaded)
        finally:
            self.counters["unloads"] += 1
            self._publish()
            self._event({"event": "unload", "model": resident.entry.name.display, "digest": digest})

    def _expire(self) -> None:
        now = time.time()
        for digest, resident in list(self._models.items()):
            if resident.expires_at is not None and resident.expires_at <= now:
                self._unload(digest)

    def _next_expiry_wait(self, deferred: bool = False) -> float | None:
        times = [r.expires_at for r in self._models.values() if r.expires_at is not None]
        if deferred:    # retry waiting jobs soon (a model may have gone idle)
            times.append(time.time() + 0.05)
        if not times:
            return None
        return max(0.0, min(times) - time.time()) + 0.001

    def _publish(self) -> None:
        active = self.batches.busy_digests()
        if self._active is not None:
            active.add(self._active.job.entry.digest)
        snap = []
        num_ctx = self.num_ctx
        for digest, r in reversed(self._models.items()):
            loaded = r.loaded
            snap.append(ResidentInfo(
                name=r.entry.name.display, digest=digest, size=int(getattr(loaded, "size_bytes", 0)),
                context_length=min(int(getattr(loaded, "context_length", 0)), num_ctx), expires_at=r.expires_at,
                info=dict(getattr(loaded, "info", {}) or {}), active=digest in active,
                load_seconds=r.load_seconds))
        with self._lock:
            self._snapshot = snap
