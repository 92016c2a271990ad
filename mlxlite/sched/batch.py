"""The scheduler's batching half: admitted generate jobs, one decoder per model, prefix cache.

Contract (used by `scheduler.Scheduler` on its MLX thread only; no mlx import):
  - `Batches(sched, num_parallel, prefix_cache_bytes)`.
  - `admit(ticket, job, resident, load_seconds)`: renders and tokenizes the prompt (a chat
    fitted to the request's num_ctx, `Ready.truncated_messages` saying how many messages it
    lost, `Ready.thinking` whether it opened a thinking section), builds the constraint, looks up the longest cached prefix, sends `Ready` and adds the sequence
    to the model's decoder (the engine's `decoder(loaded, max_batch, keep_caches)`, with the
    `draft` option's model loaded and passed as `draft=` for speculative decoding, or
    `results.SerialDecoder` over `engine.generate` for engines without one). Prompt errors raise.
  - `step()`: one step of every model's decoder that has work, round-robin (a request for
    model B interleaves with model A's batch); routes Pieces/Finish to tickets; a finished
    sequence's KV cache goes into the prefix cache; a model whose decoder empties is
    released (its keep-alive starts). A sequence dropped before it ran gets `Failed(Cancelled)`;
    one that failed alone gets `Failed(its error)` and the rest of its batch goes on; an error
    raised by the step itself fails every sequence of that decoder.
  - `has_work()`, `busy_digests()`, `active()`, `waiting()`, `drop(digest)` (on unload),
    `cancel_all()` (shutdown, from any thread), `close()` (every model dropped, caches saved).
  - Persistence: when a model unloads, its prefix-cache entries (most recent first, up to
    `prefix_cache_disk_bytes`) are written under `$MLXLITE_HOME/cache/prefix/<digest>/`
    (engine `save_cache`); when it loads again (a restart too) they are read back.
Decoder protocol: `add(key, tokens, options, truncate=, constraint=, prompt_cache=,
cached_tokens=, top_logprobs=, logprobs=[, vision=][, draft=]) -> prompt length` (`vision`: a vision
model's image inputs from the rendered prompt, passed only when there are some; `draft`: a loaded
draft model); `step(is_cancelled) -> [(key, Piece | Finish | MlxliteError | None)]`
(None: cancelled before any work ran; an `MlxliteError`: that sequence failed alone and left);
`len()`, `.active`, `.waiting`, `take_cache(key)`, `close()`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

from mlxlite import config
from mlxlite.constrain import TokenConstraint
from mlxlite.errors import Cancelled, MlxliteError
from mlxlite.results import SerialDecoder
from mlxlite.sched.jobs import Failed, Ready, is_finish
from mlxlite.sched.metrics import Registry
from mlxlite.sched.prefix_cache import PrefixCache

log = logging.getLogger("mlxlite.sched")


class _Member:
    __slots__ = ("ticket", "job", "digest", "admitted", "pieces", "batch_seen")

    def __init__(self, ticket: Any, job: Any, digest: str) -> None:
        self.ticket, self.job, self.digest = ticket, job, digest
        self.admitted = time.monotonic()
        self.pieces = 0
        self.batch_seen = 0


class Batches:
    def __init__(self, sched: Any, num_parallel: int, prefix_cache_bytes: int) -> None:
        self.sched = sched
        self.num_parallel = max(1, int(num_parallel))
        self.prefix = PrefixCache(prefix_cache_bytes)
        self._decoders: dict[str, Any] = {}       # digest -> decoder
        self._members: dict[int, _Member] = {}    # ticket id -> member
        self._rr = 0
        self._keep_of: dict[str, float | None] = {}   # digest -> keep_alive of its last finished job
        self._restored: set[str] = set()               # models whose saved prefix caches were read
        self._recent: deque = deque()                  # [whole monotonic second, tokens] of the last seconds
        self._recent_lock = threading.Lock()
        self.metrics = m = Registry()
        self.batch_size = m.histogram("mlxlite_batch_size", "sequences decoded per engine step",
                                      (1, 2, 4, 8, 16, 32, 64))
        self.queue_seconds = m.histogram("mlxlite_queue_seconds", "seconds from submit to admission")
        m.gauge_fn("mlxlite_queue_depth", "requests waiting (queued or admitted, not decoding)", sched.depth)
        m.gauge_fn("mlxlite_active_sequences", "sequences decoding now", self.active)
        self.tokens_in = m.counter("mlxlite_prompt_tokens_total", "prompt tokens, by computed or cached")
        self.tokens_out = m.counter("mlxlite_eval_tokens_total", "generated tokens")
        self.finished = m.counter("mlxlite_generations_total", "finished generations by done reason")
        m.gauge_fn("mlxlite_eval_tokens_per_second", "generated tokens per second, all sequences, last 10 s",
                   self.tokens_per_second)
        for key, help_ in (("hits", "prefix-cache lookups that reused a cached prefix"),
                           ("misses", "prefix-cache lookups without a usable prefix"),
                           ("tokens_saved", "prompt tokens served from the prefix cache")):
            m.gauge_fn(f"mlxlite_prefix_cache_{key}_total", help_,
                       lambda key=key: self.prefix.stats()[key])
        m.gauge_fn("mlxlite_prefix_cache_bytes", "bytes held by the prefix cache", lambda: self.prefix.stats()["bytes"])
        m.gauge_fn("mlxlite_prefix_cache_entries", "entries in the prefix cache",
                   lambda: self.prefix.stats()["entries"])
        m.gauge_fn("mlxlite_loaded_models", "models resident", lambda: len(sched.ps()))
        m.gauge_fn("mlxlite_loaded_bytes", "bytes of resident model weights", lambda: sum(r.size for r in sched.ps()))
        for key in ("loads", "unloads", "cancelled_in_queue", "jobs"):
            m.gauge_fn(f"mlxlite_{key}_total", f"scheduler count of {key.replace('_', ' ')}",
                       lambda key=key: sched.counters.get(key, 0))

    RATE_WINDOW = 10                    # seconds the tokens/s gauge looks back

    def tokens_per_second(self, window: float = RATE_WINDOW) -> float:
        now = int(time.monotonic())
        with self._recent_lock:
            total = sum(n for second, n in self._recent if second > now - window)
        return round(total / window, 3)

    def _count_tokens(self, n: int) -> None:
        """Tokens per whole second, the last RATE_WINDOW seconds only: one entry per second,
        not per token, so a daemon nobody scrapes keeps a few entries, not one per token."""
        now = int(time.monotonic())
        with self._recent_lock:
            recent = self._recent
            if recent and recent[-1][0] == now:
                recent[-1][1] += n
            else:
                recent.append([now, n])
                while recent[0][0] <= now - self.RATE_WINDOW:
                    recent.popleft()

    def _finished(self, event: Any) -> None:
        self.tokens_in.inc(event.prompt_eval_tokens, kind="computed")
        self.tokens_in.inc(event.prompt_tokens - event.prompt_eval_tokens, kind="cached")
        self.tokens_out.inc(event.eval_tokens)
        self.finished.inc(1, reason=event.reason)

    # ---- queries (MLX thread; the counts are also read racily by metrics, which is fine) --
    def has_work(self) -> bool:
        return any(len(d) for d in list(self._decoders.values()))

    def busy_digests(self) -> set[str]:
        return {d for d, dec in list(self._decoders.items()) if len(dec)}

    def active(self) -> int:
        return sum(dec.active for dec in list(self._decoders.values()))

    def waiting(self) -> int:
        return sum(dec.waiting for dec in list(self._decoders.values()))

    # ---- admission --------------------------------------------------------------------------
    def _decoder(self, resident: Any) -> Any:
        digest = resident.entry.digest
        dec = self._decoders.get(digest)
        if dec is None:
            engine = self.sched.engine
            if hasattr(engine, "decoder"):
                dec = engine.decoder(resident.loaded, self.num_parallel, keep_caches=self.prefix.enabled)
            else:
                dec = SerialDecoder(resident.loaded, engine.generate)
            self._decoders[digest] = dec
            self._restore(digest)
        return dec

    # ---- persistence of prefix caches -------------------------------------------------------
    def _disk_dir(self, digest: str) -> Any:
        return config.home() / "cache" / "prefix" / digest.replace(":", "-")

    def _disk_budget(self) -> int:
        engine = self.sched.engine
        if not self.prefix.enabled or not hasattr(engine, "save_cache"):
            return 0
        return int(config.get("prefix_cache_disk_bytes") or 0)

    def _persist(self, digest: str) -> None:
        budget = self._disk_budget()
        if budget <= 0:
            return
        import hashlib
        import shutil

        folder = self._disk_dir(digest)
        shutil.rmtree(folder, ignore_errors=True)
        used = 0
        for tokens, cache, nbytes in self.prefix.entries(digest):
            if used + nbytes > budget:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha256(repr(tokens).encode()).hexdigest()[:24]
            tmp = folder / f".{name}.safetensors"
            self.sched.engine.save_cache(str(tmp), cache, list(tokens))
            os.replace(tmp, folder / f"{name}.safetensors")
            used += nbytes

    def _restore(self, digest: str) -> None:
        if self._disk_budget() <= 0:
            return
        self._restored.add(digest)
        folder = self._disk_dir(digest)
        if not folder.is_dir():
            return
        engine = self.sched.engine
        # Written most recently used first: insert in reverse so that order survives.
        files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
        for f in files:
            try:
                cache, tokens = engine.load_cache(str(f))
                self.prefix.insert(digest, tokens, cache, int(engine.cache_nbytes(cache)))
            except Exception as exc:  # a damaged file is only a lost cache
                log.warning("dropping unreadable prefix cache %s: %s", f, exc)
                f.unlink(missing_ok=True)

    def _context_window(self, loaded: Any, options: Any) -> int:
        """The num_ctx the engine will use (engines without `context_window`: the same rule)."""
        window = getattr(self.sched.engine, "context_window", None)
        if window is not None:
            return int(window(loaded, options))
        return max(4, min(options.num_ctx or self.sched.num_ctx, int(loaded.context_length)))

    def admit(self, ticket: Any, job: Any, resident: Any, load_seconds: float) -> None:
        engine, loaded = self.sched.engine, resident.loaded
        options = loaded.defaults.merged(job.options)
        rendered = job.prompt.render(loaded, engine, self._context_window(loaded, options), options.num_predict)
        tokens = list(rendered.tokens)
        constraint = None
        if job.format is not None:
            if resident.token_bytes is None:
                resident.token_bytes = engine.token_bytes(loaded)
            constraint = TokenConstraint(job.format, resident.token_bytes, loaded.eos_token_ids)
        dec = self._decoder(resident)
        digest = resident.entry.digest
        cache, cached = None, 0
        vision = getattr(rendered, "vision", None)     # image inputs: their placeholder tokens are no cache key
        if self.prefix.enabled and hasattr(engine, "cache_prefix") and vision is None:
            hit = self.prefix.lookup(digest, tokens)
            if hit is not None:
                cache = engine.cache_prefix(hit.cache, hit.tokens)
                cached = hit.tokens if cache is not None else 0
        speculates = options.draft and hasattr(engine, "decoder")     # a SerialDecoder can't use a draft
        draft = self.sched.draft_model(options.draft, ticket, digest) if speculates else None
        extra = {"draft": draft} if draft is not None else {}
        dec.add(ticket.id, tokens, options, truncate=job.truncate, constraint=constraint,
                prompt_cache=cache, cached_tokens=cached, top_logprobs=job.top_logprobs, logprobs=job.logprobs,
                **({"vision": vision} if vision is not None else {}), **extra)
        member = _Member(ticket, job, digest)
        self._members[ticket.id] = member
        queue_s = time.monotonic() - ticket.submitted
        ticket.replies.put(Ready(load_seconds, tuple(tokens), queue_seconds=queue_s, batch_size=len(dec),
                                 truncated_messages=rendered.truncated_messages,
                                 thinking=getattr(rendered, "thinking", False),
                                 harmony=getattr(rendered, "harmony", None)))
        self.queue_seconds.observe(queue_s)

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> None:
        digests = [d for d, dec in self._decoders.items() if len(dec)]
        if not digests:
            return
        # Round-robin start so no model always goes first.
        self._rr = (self._rr + 1) % len(digests)
        for digest in digests[self._rr:] + digests[:self._rr]:
            dec = self._decoders.get(digest)
            if dec is None:
                continue
            try:
                events = dec.step(self._is_cancelled)
            except MlxliteError as exc:
                self._fail_decoder(digest, dec, exc)
                continue
            except Exception as exc:  # never let one batch kill the MLX thread
                log.exception("decoder step failed")
                self._fail_decoder(digest, dec, MlxliteError(f"internal error: {type(exc).__name__}: {exc}"))
                continue
            self.batch_size.observe(dec.active)
            pieces = 0
            for key, event in events:
                pieces += self._route(digest, dec, key, event)
            if pieces:
                self._count_tokens(pieces)
            if not len(dec):
                self._idle(digest)

    def _is_cancelled(self, key: int) -> bool:
        member = self._members.get(key)
        return member is None or member.ticket.cancelled

    def _route(self, digest: str, dec: Any, key: int, event: Any) -> int:
        """Hand one decoder event to its ticket; 1 if it was a generated token, else 0."""
        member = self._members.get(key)
        if member is None:
            return 0
        if event is None:               # cancelled before it ran: dropped, as from the queue
            self._members.pop(key, None)
            self.sched.counters["cancelled_in_queue"] += 1
            member.ticket.replies.put(Failed(Cancelled("request canceled")))
            return 0
        if isinstance(event, MlxliteError):     # it failed alone and left; the rest of its batch goes on
            self._members.pop(key, None)
            member.ticket.replies.put(Failed(event))
            return 0
        member.ticket.replies.put(event)
        if not is_finish(event):
            member.pieces += 1
            return 1
        self._members.pop(key, None)
        c = self.sched.counters
        c["prompt_tokens"] += event.prompt_eval_tokens
        c["eval_tokens"] += event.eval_tokens
        c["cached_tokens"] = c.get("cached_tokens", 0) + event.prompt_tokens - event.prompt_eval_tokens
        self._finished(event)
        kept = dec.take_cache(key)
        if kept is not None and event.reason != "cancel":
            tokens, cache = kept
            try:
                nbytes = int(self.sched.engine.cache_nbytes(cache))
                self.prefix.insert(digest, tokens, cache, nbytes)
            except Exception:
                log.exception("prefix cache insert failed")
        self._keep_of[digest] = member.job.keep_alive
        return 0

    def _idle(self, digest: str) -> None:
        keep = self._keep_of.pop(digest, None)
        self.sched._release(digest, self.sched._keep(keep))

    def _fail_decoder(self, digest: str, dec: Any, exc: MlxliteError) -> None:
        for key, member in list(self._members.items()):
            if member.digest == digest:
                self._members.pop(key, None)
                member.ticket.replies.put(Failed(exc))
        dec.close()
        self._decoders.pop(digest, None)
        self._idle(digest)

    def drop(self, digest: str) -> None:
        """The model is being unloaded: its decoder and cached prefixes go too."""
        dec = self._decoders.pop(digest, None)
        if dec is not None:
            for key, member in list(self._members.items()):
                if member.digest == digest:
                    self._members.pop(key, None)
                    member.ticket.replies.put(Failed(Cancelled("the model was unloaded")))
            dec.close()
        try:
            if digest in self._restored:    # else this residency never read its files: keep them
                self._restored.discard(digest)
                self._persist(digest)
        except Exception:
            log.exception("saving prefix caches failed")
        self.prefix.drop_model(digest)

    def cancel_all(self) -> None:
        """Shutting down (any thread): every admitted sequence stops at its next step."""
        for member in list(self._members.values()):
            member.ticket.cancel()

    def close(self) -> None:
        for digest in list(self._decoders):
            self.drop(digest)
