"""Continuous batching on MLX: one `Decoder` per loaded model decodes many sequences together.

Exposed as `runner.decoder(loaded, max_batch)`; the scheduler drives it through that
engine function and never imports mlx.

Contract:
  - `Decoder.add(key, prompt_tokens, options, truncate=, constraint=, prompt_cache=,
    cached_tokens=, top_logprobs=, logprobs=)` queues a sequence; prompt checks (empty, longer than num_ctx) raise
    `BadRequest` at once, exactly as `runner.generate` does. `logprobs=False`: nobody reads
    the chosen tokens' logprobs (`Piece.logprob` is 0.0); a step where no member reads them
    gathers none and reads only the tokens back from the device.
  - `Decoder.step(is_cancelled)` does one unit of work and returns `[(key, Piece|Finish|MlxliteError)]`:
    cancelled sequences leave (Finish "cancel"; `(key, None)` if none of its work ran); waiting sequences join while the batch has
    room (at most one prefill chunk of `num_batch` tokens per step, so a long prompt never
    stalls the others for more than one chunk); then one decode step for every member.
    Each member keeps its own sampler, penalties, stop strings, limit, constraint and
    top_logprobs (the top-k alternatives are computed only in steps where a member asks).
  - A member's own failure (its constraint can't follow it: a JSON schema too ambiguous to
    follow, `constrain`'s `Unsupported`) fails that member alone: `(key, error)` in place of
    its Finish, and it leaves; the others' tokens are what they would be without it. Errors
    of the step itself (MLX's) raise: the batch is lost.
  - Fairness when full: a member that has decoded `time_slice` tokens while others wait is
    parked (its KV cache taken out of the batch) and rejoins at the back of the queue.
  - A batch of one decodes on the plain per-sequence `KVCache`, the same graph as
    `runner.generate`, so a request alone produces what `generate` produces.
  - Speculative decoding (`speculative.py`, `add(..., draft=)`): a step where members have
    drafts verifies them all in one forward instead (the hook at the top of `_decode`).
  - With `keep_caches`, a finished sequence's KV cache is kept for `take_cache(key) ->
    (tokens, cache)` (the exact tokens it holds), for the prefix cache.
Never called from more than one thread (the scheduler's MLX thread).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from mlxlite.engine.model import (
    GENERATION_STREAM,
    alternatives,
    check_prompt,
    context_window,
    new_cache,
    prefill,
    token_piece,
)
from mlxlite.engine.sampling import allowed_logits, make_processors, make_sampler, top_alternatives
from mlxlite.engine.speculative import Speculator
from mlxlite.engine.text import StopMatcher, TextStream
from mlxlite.errors import MlxliteError
from mlxlite.options import Options
from mlxlite.results import Finish, Piece


class _Seq:
    __slots__ = ("key", "prompt", "cached", "limit", "sampler", "greedy", "processors", "stops", "text",
                 "constraint", "cache", "pos", "fed", "next_input", "history", "n", "t0", "t_first",
                 "step", "slice_used", "top", "logprobs", "spec", "error")

    def __init__(self, key: Any, prompt: list[int], cached: int, limit: int, options: Options,
                 num_ctx: int, table: list[bytes], constraint: Any, cache: list[Any] | None,
                 top: int = 0, logprobs: bool = True) -> None:
        self.key = key
        self.prompt = prompt
        self.cached = cached
        self.limit = limit
        self.sampler = make_sampler(options)
        self.greedy = options.temperature <= 0
        self.processors = make_processors(options, num_ctx)
        self.stops = StopMatcher(options.stop)
        self.text = TextStream(table)
        self.constraint = constraint
        self.cache = cache                  # own per-layer caches while outside the batch
        self.pos = cached                   # prompt tokens already in the cache
        self.fed = list(prompt[:cached])    # exactly the tokens the cache holds
        self.next_input = prompt[-1]
        self.history = mx.array(prompt[:-1], dtype=mx.uint32) if self.processors else None
        self.n = 0
        self.t0: float | None = None
        self.t_first: float | None = None
        self.step = max(1, options.num_batch)
        self.slice_used = 0
        self.top = top                      # top_logprobs: alternatives wanted per token
        self.logprobs = logprobs or top > 0  # the chosen token's logprob is read
        self.spec: Any = None               # speculative.SpecState, set by Decoder.add
        self.error: MlxliteError | None = None  # its own failure: it leaves with this, its cache unkept

    @property
    def ready(self) -> bool:
        return self.cache is not None and self.pos >= len(self.prompt) - 1


class Decoder:
    """Batched decoding for one loaded model (see module doc)."""

    time_slice = 128                        # tokens a member may decode while others wait
    lookahead = True                        # queue step t+1 before handing out step t's tokens

    def __init__(self, loaded: Any, max_batch: int, *, keep_caches: bool = False) -> None:
        self.loaded = loaded
        self.max_batch = max(1, int(max_batch))
        self.keep_caches = keep_caches
        self._waiting: deque[_Seq] = deque()
        self._batch: list[_Seq] = []
        self._cache: list[Any] | None = None  # plain caches when one member, batch caches when more
        self._done: list[tuple[Any, Any]] = []  # finishes decided at add() (nothing to compute)
        self._kept: dict[Any, tuple[list[int], list[Any]]] = {}
        self._steps = 0
        self._mergeable: bool | None = None
        self._probe: list[Any] = []
        self._inflight: tuple[Any, ...] | None = None   # a queued look-ahead step (see _forward)
        self._failing = False                    # a member's constraint failed building this step
        self.speculator = Speculator(loaded)     # drafts verified in one batched step (speculative.py)

    # ---- queries --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._waiting) + len(self._batch) + len(self._done)

    @property
    def active(self) -> int:
        return len(self._batch)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def take_cache(self, key: Any) -> tuple[list[int], list[Any]] | None:
        return self._kept.pop(key, None)

    # ---- adding ---------------------------------------------------------------------------
    def add(self, key: Any, prompt_tokens: list[int], options: Options, *, truncate: bool = False,
            constraint: Any = None, prompt_cache: list[Any] | None = None, cached_tokens: int = 0,
            top_logprobs: int = 0, logprobs: bool = True, draft: Any = None) -> int:
        """Queue a sequence; returns its prompt length (after truncation). `draft`: a loaded
        draft model sharing this model's vocabulary (else prompt lookup drafts)."""
        loaded = self.loaded
        num_ctx = context_window(loaded, options)
        given = [int(t) for t in prompt_tokens]
        prompt = check_prompt(loaded, given, num_ctx, options, truncate)
        if prompt_cache is None or len(prompt) != len(given):
            prompt_cache, cached_tokens = None, 0
        cached_tokens = max(0, min(cached_tokens, len(prompt) - 1)) if prompt_cache is not None else 0
        limit = num_ctx - len(prompt)
        if options.num_predict >= 0:
            limit = min(limit, options.num_predict)
        if limit <= 0:
            self._done.append((key, Finish("length", len(prompt), 0, 0, 0.0, 0.0)))
            return len(prompt)
        seq = _Seq(key, prompt, cached_tokens, limit, options, num_ctx, loaded.table, constraint, prompt_cache,
                   max(0, int(top_logprobs)), bool(logprobs))
        seq.spec = self.speculator.state(options, draft)
        self._waiting.append(seq)
        return len(prompt)

    # ---- one unit of work -----------------------------------------------------------------
    def step(self, is_cancelled: Callable[[Any], bool]) -> list[tuple[Any, Any]]:
        out, self._done = self._done, []
        if self._inflight is None:     # membership changes only between computed steps
            self._drop_cancelled(is_cancelled, out)
            self._admit(is_cancelled, out)
        if self._batch:
            self._decode(out, is_cancelled)
        return out

    def _finish(self, seq: _Seq, reason: str, tail: str = "") -> Any:
        now = time.perf_counter()
        t0 = seq.t0 if seq.t0 is not None else now
        t_first = seq.t_first if seq.t_first is not None else now
        return Finish(reason, len(seq.prompt), len(seq.prompt) - seq.cached, seq.n,
                             max(0.0, t_first - t0), now - t_first, tail, seq.stops.matched)

    def _tail(self, seq: _Seq) -> str:
        out, hit = seq.stops.feed(seq.text.flush())
        return out if hit else out + seq.stops.flush()

    def _drop_cancelled(self, is_cancelled: Callable[[Any], bool], out: list) -> None:
        for seq in [s for s in self._waiting if is_cancelled(s.key)]:
            self._waiting.remove(seq)
            seq.cache = None
            if seq.t0 is None:      # nothing of it ran: dropped like a cancelled queued request
                out.append((seq.key, None))
            else:
                out.append((seq.key, self._finish(seq, "cancel", self._tail(seq) if seq.n else "")))
        gone = [i for i, s in enumerate(self._batch) if is_cancelled(s.key)]
        if gone:
            for i in gone:
                seq = self._batch[i]
                out.append((seq.key, self._finish(seq, "cancel", self._tail(seq))))
            self._leave(gone, keep_caches=False)

    def _can_merge(self) -> bool:
        if self._mergeable is None:
            self._probe = new_cache(self.loaded)
            self._mergeable = all(hasattr(type(c), "merge") for c in self._probe)
        return self._mergeable

    def _admit(self, is_cancelled: Callable[[Any], bool], out: list) -> None:
        room = self.max_batch if self._can_merge() else 1
        if len(self._batch) >= room and self._waiting:
            self._park_one()
        prefilled = self._prefill_group(room)
        for seq in list(self._waiting):
            if len(self._batch) >= room:
                break
            if not seq.ready:
                if prefilled:      # one prefill chunk per step keeps decode moving
                    break
                if seq.cache is None:
                    seq.cache = new_cache(self.loaded)
                if seq.t0 is None:
                    seq.t0 = time.perf_counter()
                end = min(len(seq.prompt) - 1, seq.pos + seq.step)
                with mx.stream(GENERATION_STREAM):
                    prefill(self.loaded, seq.prompt[seq.pos:end], seq.cache, seq.step)
                seq.fed.extend(seq.prompt[seq.pos:end])
                seq.pos = end
                prefilled = True
                if not seq.ready:
                    break
            self._waiting.remove(seq)
            self._join(seq)

    def _prefill_group(self, room: int) -> bool:
        """New short prompts at the head of the queue (each within one chunk) are prefilled
        together in one left-padded forward pass and join at once: concurrent arrivals cost
        one batched pass instead of one pass each. False if there was no such group."""
        from mlx_lm.models.cache import BatchKVCache

        group: list[_Seq] = []
        for seq in self._waiting:
            if len(self._batch) + len(group) >= room:
                break
            if seq.cache is not None or seq.pos != 0 or len(seq.prompt) - 1 > seq.step:
                break
            group.append(seq)
        lens = [len(s.prompt) - 1 for s in group]
        if len(group) < 2 or max(lens) == 0 or not self._plain_kv():
            return False
        width = max(lens)
        pads = [width - n for n in lens]
        layers = len(self._probe)
        caches = [BatchKVCache(pads) for _ in range(layers)]
        rows = mx.array([[0] * p + s.prompt[:n] for s, p, n in zip(group, pads, lens, strict=True)], dtype=mx.uint32)
        t0 = time.perf_counter()
        with mx.stream(GENERATION_STREAM):
            self.loaded.model(rows, cache=caches)
            mx.eval([a for c in caches for a in (c.keys, c.values)])
        for s, n in zip(group, lens, strict=True):
            s.t0, s.pos = t0, n
            s.fed.extend(s.prompt[:n])
            s.slice_used = 0
            self._waiting.remove(s)
        if not self._batch:
            self._cache = caches
        else:
            if len(self._batch) == 1:
                self._cache = [BatchKVCache.merge([c]) for c in self._cache]
            for c, g in zip(self._cache, caches, strict=True):
                c.extend(g)
        self._batch.extend(group)
        return True

    def _plain_kv(self) -> bool:
        from mlx_lm.models.cache import KVCache

        return self._can_merge() and all(type(c) is KVCache for c in self._probe)

    def _join(self, seq: _Seq) -> None:
        from mlx_lm.models.cache import BatchKVCache

        if seq.t0 is None:
            seq.t0 = time.perf_counter()
        own, seq.cache = seq.cache, None
        seq.slice_used = 0
        if not self._batch:
            self._cache = own
        elif len(self._batch) == 1:
            self._cache = [BatchKVCache.merge([a, b]) for a, b in zip(self._cache, own, strict=True)]
        else:
            for c, o in zip(self._cache, own, strict=True):
                c.extend(BatchKVCache.merge([o]))
        self._batch.append(seq)

    def _extract(self, i: int) -> list[Any]:
        if len(self._batch) == 1:
            return self._cache
        return [c.extract(i) for c in self._cache]

    def _leave(self, indices: list[int], keep_caches: bool, ahead: bool = False) -> None:
        """Members at `indices` leave; their caches are kept (for the prefix cache) if asked.
        `ahead`: a look-ahead step already fed each member's last token: cut it off."""
        if keep_caches and self.keep_caches:
            for i in indices:
                seq = self._batch[i]
                if seq.error is not None:       # nobody takes a failed sequence's cache
                    continue
                kept = self._extract(i)
                if ahead:
                    kept = [_trimmed(c) for c in kept]
                # Evaluate now: a lazy extract would pin the whole batch buffer it slices.
                mx.eval([a for c in kept for a in (c.keys, c.values) if a is not None])
                self._kept[seq.key] = (list(seq.fed), kept)
        gone = set(indices)
        keep = [i for i in range(len(self._batch)) if i not in gone]
        if not keep:
            self._cache = None
        elif len(self._batch) > 1:
            if len(keep) == 1:
                self._cache = [c.extract(keep[0]) for c in self._cache]
                mx.eval([a for c in self._cache for a in (c.keys, c.values)])
            else:
                for c in self._cache:
                    c.filter(keep)
        self._batch = [self._batch[i] for i in keep]

    def _park_one(self) -> None:
        """Full batch and someone waits: the member that has run longest steps out."""
        i = max(range(len(self._batch)), key=lambda j: self._batch[j].slice_used)
        seq = self._batch[i]
        if seq.slice_used < self.time_slice:
            return
        seq.cache = self._extract(i)
        mx.eval([a for c in seq.cache for a in (c.keys, c.values) if a is not None])
        self._leave([i], keep_caches=False)
        self._waiting.append(seq)

    def _forward(self, inputs: mx.array) -> tuple[mx.array | None, ...]:
        """One decode step's graph for the whole batch: (sampled tokens [B], their logprobs [B]
        or None when no member reads them, the top K ids and logprobs [B, K] or None, None; K
        the most alternatives any member wants)."""
        batch, eos = self._batch, self.loaded.eos_token_ids
        with mx.stream(GENERATION_STREAM):
            logits = self.loaded.model(inputs[:, None], cache=self._cache)[:, -1, :]
            if any(s.processors or s.constraint is not None for s in batch):
                rows = []
                for i, s in enumerate(batch):
                    row = logits[i:i + 1]
                    if s.processors:
                        s.history = mx.concatenate([s.history, inputs[i:i + 1]])
                        for proc in s.processors:
                            row = proc(s.history, row)
                    if s.constraint is not None:
                        try:
                            row = allowed_logits(row, s.constraint, eos)
                        except MlxliteError as exc:     # its own failure: it leaves before its token goes out
                            s.error, self._failing = exc, True
                    rows.append(row)
                logits = mx.concatenate(rows, axis=0)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if all(s.greedy for s in batch):
                toks = mx.argmax(logprobs, axis=-1)
            else:
                toks = mx.concatenate([s.sampler(logprobs[i:i + 1]).reshape(1) for i, s in enumerate(batch)])
            lps = mx.take_along_axis(logprobs, toks[:, None], axis=-1)[:, 0] if any(s.logprobs for s in batch) else None
            k = max(s.top for s in batch)
            if k > 0:
                return (toks, lps, *top_alternatives(logprobs, k))
        return toks, lps, None, None

    def _decode(self, out: list, is_cancelled: Callable[[Any], bool]) -> None:
        if self._inflight is None and self.speculator.step(self, out, is_cancelled):
            self._steps += 1
            return
        batch = self._batch
        if self._inflight is not None:
            step, self._inflight = self._inflight, None
        else:
            step = self._forward(mx.array([s.next_input for s in batch], dtype=mx.uint32))
        toks = step[0]
        # Look ahead (as mlx-lm does): queue the next step before handing these tokens out, so
        # the engine computes while Python routes text. Not when the batch is about to change
        # (someone waits or was cancelled) or a constraint must see each token first.
        ahead = None
        if (self.lookahead and not self._waiting and all(s.constraint is None for s in batch)
                and not any(is_cancelled(s.key) for s in batch) and not self.speculator.wants(batch)):
            # This step goes to the stream on its own first: in one graph with the next, an
            # input-less op of the next (a pipeline stage's receive) could be ordered before this
            # step's collectives on one rank and not on another.
            mx.async_eval(*_arrays(step))
            ahead = self._forward(toks)
            mx.async_eval(*_arrays(ahead))
        mx.eval(*_arrays(step))
        if self._failing:       # never with a look-ahead: constrained members take none
            step = self._drop_failed(step, out)
            batch, toks = self._batch, step[0]
        now = time.perf_counter()
        leaving: list[int] = []
        top_ids, top_values = (step[2].tolist(), step[3].tolist()) if step[2] is not None else (None, None)
        lps = step[1].tolist() if step[1] is not None else [0.0] * len(batch)
        for i, (s, token, lp) in enumerate(zip(batch, toks.tolist(), lps, strict=True)):
            if is_cancelled(s.key):     # cancelled while this step ran: nothing more goes out
                out.append((s.key, self._finish(s, "cancel", self._tail(s))))
                leaving.append(i)
                continue
            s.fed.append(s.next_input)
            s.next_input = token
            if s.t_first is None:
                s.t_first = now
            top = (top_ids[i], top_values[i]) if s.top and top_ids is not None else None
            if self.hand_out(s, token, lp, top, out):
                leaving.append(i)
        if leaving:
            self._leave(leaving, keep_caches=True, ahead=ahead is not None)
        if ahead is not None and self._batch:
            if leaving:
                keep = mx.array([i for i in range(len(batch)) if i not in set(leaving)])
                ahead = tuple(None if a is None else a[keep] for a in ahead)
            self._inflight = ahead
        self._steps += 1
        if self._steps % 256 == 0:
            mx.clear_cache()

    def hand_out(self, s: _Seq, token: int, lp: float, top: tuple[list[int], list[float]] | None,
                 out: list) -> bool:
        """One token `s` generated goes out, as every step hands them out (plain or
        speculative): EOS ends it, its constraint follows it, its stop strings and num_predict;
        its Piece with its logprob and `top` alternatives (ids, logprobs: most likely first).
        True when `s` is done and leaves the batch. A constraint that cannot follow the token
        fails `s` alone: its error goes out in place of a Finish."""
        s.slice_used += 1
        if token in self.loaded.eos_token_ids:
            out.append((s.key, self._finish(s, "stop", self._tail(s))))
            return True
        if s.constraint is not None:
            try:
                s.constraint.advance(token)
            except MlxliteError as exc:
                s.error = exc
                out.append((s.key, exc))
                return True
        s.n += 1
        emit, hit = s.stops.feed(s.text.add(token))
        alts = alternatives(self.loaded, top[0][:s.top], top[1][:s.top]) if top is not None else ()
        out.append((s.key, Piece(token, emit, float(lp) if s.logprobs else 0.0, token_piece(self.loaded, token),
                                 alts)))
        if hit:
            out.append((s.key, self._finish(s, "stop")))
            return True
        if s.n >= s.limit:
            out.append((s.key, self._finish(s, "length", self._tail(s))))
            return True
        return False

    def _drop_failed(self, step: tuple[mx.array | None, ...], out: list) -> tuple[mx.array | None, ...]:
        """Members whose constraint failed while `step` was built leave with their error; the
        step's rows of the others, which nothing of theirs touched, are what remains."""
        self._failing = False
        failed = [i for i, s in enumerate(self._batch) if s.error is not None]
        for i in failed:
            out.append((self._batch[i].key, self._batch[i].error))
        keep = mx.array([i for i in range(len(self._batch)) if i not in failed], dtype=mx.int32)
        self._leave(failed, keep_caches=False)
        return tuple(None if a is None else a[keep] for a in step)

    def close(self) -> None:
        self._inflight = None
        self._waiting.clear()
        self._batch.clear()
        self._cache = None
        self._kept.clear()


def _arrays(step: tuple[mx.array | None, ...]) -> list[mx.array]:
    """A step's arrays, less the parts it did not compute."""
    return [a for a in step if a is not None]


def _trimmed(c: Any) -> Any:
    """A copy-free view of a plain KVCache without its last token."""
    from mlx_lm.models.cache import KVCache

    k = KVCache()
    n = c.offset - 1
    k.keys, k.values, k.offset = c.keys[..., :n, :], c.values[..., :n, :], n
    return k


# ---- KV caches as the prefix cache sees them (opaque objects with a size) ---------------------
def cache_nbytes(cache: list[Any]) -> int:
    return sum(int(getattr(c, "nbytes", 0) or 0) for c in cache)


def cache_prefix(cache: list[Any], n: int) -> list[Any] | None:
    """New caches holding the first `n` tokens of `cache` (which stays untouched: the slices
    are new arrays, and the first update of a sliced cache reallocates); None if the cache
    kind can't be cut."""
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        if type(c) is not KVCache or c.keys is None or c.offset < n:
            return None
        k = KVCache()
        k.keys, k.values, k.offset = c.keys[..., :n, :], c.values[..., :n, :], n
        out.append(k)
    return out


def save_cache(path: str, cache: list[Any], tokens: list[int]) -> None:
    """Write a plain KV cache (the tokens it holds in the metadata) as safetensors."""
    import json

    arrays = {}
    for i, c in enumerate(cache):
        arrays[f"{i}.keys"] = c.keys[..., :c.offset, :]
        arrays[f"{i}.values"] = c.values[..., :c.offset, :]
    mx.save_safetensors(path, arrays, metadata={"tokens": json.dumps([int(t) for t in tokens]),
                                                "layers": str(len(cache))})


def load_cache(path: str) -> tuple[list[Any], list[int]]:
    """Read what `save_cache` wrote: (caches, tokens). ValueError if it doesn't add up."""
    import json

    from mlx_lm.models.cache import KVCache

    arrays, meta = mx.load(path, return_metadata=True)
    # Read now: a lazily loaded array holds its file open until evaluated, and a restore keeps
    # hundreds of caches (the daemon ran out of descriptors; select() failed past 1023).
    mx.eval(list(arrays.values()))
    tokens = json.loads(meta["tokens"])
    cache = []
    for i in range(int(meta["layers"])):
        c = KVCache()
        c.keys, c.values = arrays[f"{i}.keys"], arrays[f"{i}.values"]
        c.offset = c.keys.shape[2]
        if c.offset != len(tokens):
            raise ValueError("cache length does not match its tokens")
        cache.append(c)
    return cache, tokens
