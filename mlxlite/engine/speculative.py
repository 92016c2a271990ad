"""Speculative decoding inside the batch decoder: drafts, one batched verification, exact acceptance.

Owns how a `batch.Decoder` step turns into a speculative one. Each member may bring a
draft of up to `draft_num_predict` tokens: prompt lookup (the latest earlier place in the
prompt and output where the context's last 3, else 2 tokens occur: what followed there),
or a draft model's greedy/sampled guesses (`Decoder.add(..., draft=loaded)`). All members'
drafts are verified in ONE forward of the target model ([next input, d1..dk] per member,
right-padded to the longest), then every member's KV cache is cut back past its rejected
tokens (a uniform trim, then `BatchKVCache`'s own per-row roll where members differ).

Exactness (what the tests hold it to):
  - greedy: a draft token is kept while it is the argmax, so the output is token for token
    what plain decoding gives; sampling: standard rejection sampling (keep d with
    min(1, p(d)/q(d)), else draw from max(0, p - q) renormalized; a prompt-lookup draft has
    q = 1 at d), so each token is distributed as the plain sampler's.
  - penalties see each position's own history; a constraint masks each position with its
    state after the draft tokens before it, and a draft token it forbids ends the draft.
  - logprobs / top_logprobs of a token come from its own position's log-softmax; stop
    strings, EOS and num_predict are applied token by token by the plain step's own
    `Decoder.hand_out`.
  - a constraint that fails (a schema too ambiguous to follow) past a draft token ends the
    draft before that token; one that fails at the member's next token leaves the step to
    the plain one, which fails that member alone.
Policy: on for greedy and unseeded sampling (a seed keeps the plain sampler so the same
seed gives the same text alone, batched or through `run`). It pays only where checking k+1
tokens costs little more than one, so each step is gated: the members' expected yield (their
keep rates) against the cost of checking the extra tokens, measured from the steps that ran;
and only a sequence decoding alone speculates by default (`Speculator.solo`: in batches it
did not pay, on a CPU nor on an H200, BENCHMARKS.md). A member's draft length
follows what gets kept, and one whose drafts keep missing pauses drafting (doubling).
Never changes greedy output nor the distribution of sampled output (only how many tokens a
step yields), never touches the scheduler, and needs plain `KVCache`s (other cache kinds
decode plainly).
"""

from __future__ import annotations

import time
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlite.engine.model import GENERATION_STREAM, new_cache, prefill
from mlxlite.engine.sampling import constraint_mask, make_distribution, top_alternatives
from mlxlite.errors import BadRequest, MlxliteError
from mlxlite.options import Options

NGRAMS = (3, 2)          # prompt lookup: context suffix lengths tried, longest first
MISS_PAUSE_MAX = 64      # steps a member whose drafts keep missing waits before drafting again


class SpecState:
    """One sequence's speculative state: its n-gram index or draft model cache, its pacing."""

    __slots__ = ("k", "size", "rate", "dist", "index", "indexed", "draft", "dcache", "dfed", "dfed_drafts", "q",
                 "masks", "resume_at", "backoff", "drafted", "accepted")

    def __init__(self, options: Options, draft: Any = None) -> None:
        sampled = options.temperature > 0
        # A seeded sampler keeps its own key chain: speculation would draw other numbers.
        self.k = 0 if sampled and options.seed >= 0 else int(options.draft_num_predict)
        self.size = self.k          # this step's draft length: follows how much gets kept
        self.rate = 0.6             # running estimate of a draft token's chance to be kept
        self.dist = make_distribution(options) if sampled else None
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAMS}
        self.indexed = 0
        self.draft = draft
        self.dcache: list[Any] | None = None
        self.dfed = 0               # context tokens the draft model's cache holds
        self.dfed_drafts = 0        # draft tokens fed after them in the last draft
        self.q: mx.array | None = None      # the draft model's log q per draft position
        self.masks: list[np.ndarray] | None = None
        self.resume_at = 0          # drafting pauses until the sequence has this many tokens
        self.backoff = 1
        self.drafted = 0
        self.accepted = 0

    # ---- prompt lookup ------------------------------------------------------------------
    def lookup(self, fed: list[int], last: int, k: int) -> list[int]:
        for i in range(self.indexed, len(fed)):      # index the tokens that became final
            for n, table in self.index.items():
                if i >= n:
                    table[tuple(fed[i - n:i])] = i
        self.indexed = len(fed)
        for n, table in self.index.items():
            if len(fed) < n:
                continue
            p = table.get((*fed[len(fed) - n + 1:], last))
            if p is not None:
                out = fed[p:p + k]
                if len(out) < k:
                    out.append(last)
                return out
        return []

    def settle(self, drafted: int, accepted: int, n: int) -> None:
        """Pace drafting (`n`: tokens generated so far): a draft kept whole grows the next one
        by a token (up to `k`), one kept in part shrinks it to one past what was kept; a draft
        with no token kept halves it, pauses drafting for `backoff` tokens and doubles that."""
        self.drafted += drafted
        self.accepted += accepted
        self.rate = 0.75 * self.rate + 0.25 * (accepted / drafted)
        if accepted == drafted:
            self.size = min(self.k, self.size + 1)
        else:
            self.size = max(1, accepted + 1 if accepted else self.size // 2)
        if accepted:
            self.backoff = 1
        else:
            self.resume_at = n + self.backoff
            self.backoff = min(MISS_PAUSE_MAX, self.backoff * 2)

    def active(self, n: int) -> bool:
        return self.k > 0 and n >= self.resume_at

    def expected(self, n: int) -> float:
        """Tokens a step is expected to yield with a draft of `n`: 1 + rate + rate^2 + ..."""
        return 1.0 + sum(self.rate ** j for j in range(1, n + 1))


class Speculator:
    """The Decoder's speculative step (see module doc)."""

    gate = True         # speculate only where it is expected to pay; False: whenever there are drafts
    enabled = True      # False: never (a distributed group's ranks must take the same steps)
    EXPLORE = 16        # steps declined in a row before one is tried anyway (costs drift)

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        # Measured (BENCHMARKS.md): speculation paid for a sequence alone, on a CPU and on an
        # H200, and not in batches of 4 on either (a CPU's batch step keeps its cores busy; the
        # GPU's verify steps of the default model did not beat plain ones). So only a sequence
        # alone speculates by default; False lets the gate try batches too.
        self.solo = True
        # The cost model, measured as the seconds between consecutive steps when exactly one
        # step ran and nobody was joining: a plain step of B members takes plain[B]; a
        # speculative one of width W takes plain[B] * (1 + extra * (W - 1)).
        self.plain: dict[int, float] = {}
        self.extra: float | None = None
        self._last: tuple[float, int, int, int] | None = None
        self._paying = True         # the gate's last word (while False, plain steps pipeline)
        self._declined = 0          # plain steps since it last said yes
        args = getattr(loaded.model, "args", None)
        self.vocab = int(getattr(args, "vocab_size", 0) or len(loaded.table))
        self.steps = 0              # speculative steps run (diagnostics, benches)
        self.rows = 0               # sequences they verified (a step of 4 members counts 4)
        self.emitted = 0            # tokens they yielded

    def state(self, options: Options, draft: Any = None) -> SpecState:
        """A sequence's state; BadRequest if `draft` reads tokens differently from this model."""
        if draft is not None and draft is not self.loaded and draft.table != self.loaded.table:
            raise BadRequest(f"draft model '{draft.name}' does not share the vocabulary of '{self.loaded.name}'")
        return SpecState(options, draft)

    def wants(self, batch: list[Any]) -> bool:
        """Whether the next step may speculate (the plain step then queues no look-ahead):
        some member drafts, and the gate said yes last time, has not timed this batch size
        yet, or is due to look again (every EXPLORE steps)."""
        if not self.enabled or not any(s.spec is not None and s.spec.active(s.n) for s in batch):
            return False
        if self.gate and self.solo and len(batch) > 1:
            return False
        if not self.gate or self._paying or len(batch) not in self.plain or self._declined >= self.EXPLORE:
            return True
        self._declined += 1
        return False

    # ---- drafting -------------------------------------------------------------------------
    def _draft(self, s: Any) -> list[int]:
        st: SpecState | None = s.spec
        if st is None:
            return []
        st.q, st.masks = None, None
        if not st.active(s.n):
            return []
        k = min(st.size, s.limit - s.n - 1)  # tokens past num_predict would be thrown away
        if k <= 0:
            return []
        if st.draft is not None and st.draft.model is None:     # unloaded meanwhile: prompt lookup
            st.draft, st.dcache = None, None
        draft = st.lookup(s.fed, s.next_input, k) if st.draft is None else self._model_draft(s, st, k)
        eos = self.loaded.eos_token_ids
        for j, t in enumerate(draft):        # nothing after an EOS
            if t in eos:
                draft = draft[:j + 1]
                break
        if s.constraint is not None and draft:
            draft = self._constrained(s, st, draft)
        if st.q is not None:
            st.q = st.q[:len(draft)]
        if not draft:
            self._rewind_draft(st, 0)
        return draft

    def _constrained(self, s: Any, st: SpecState, draft: list[int]) -> list[int]:
        """Cut the draft at the first token the constraint forbids; keep each position's mask
        (len(draft) + 1 of them: the last one for the token after the draft)."""
        eos = self.loaded.eos_token_ids
        state, forked, masks = s.constraint, False, []
        try:
            for j, t in enumerate(draft):
                mask = constraint_mask(state, eos, self.vocab)
                masks.append(mask)
                if not (t < len(mask) and mask[t]):
                    st.masks = masks
                    return draft[:j]
                if t in eos:                    # the last draft token: nothing comes after it
                    masks.append(mask)
                    st.masks = masks
                    return draft
                if not forked:
                    state, forked = state.fork(), True
                state.advance(t)
            masks.append(constraint_mask(state, eos, self.vocab))
        except MlxliteError:
            if not masks:       # at the member's own next token: the plain step fails it alone
                raise
            # Past a draft token it fails: the draft ends before it, each position keeping its mask.
            st.masks = masks
            return draft[:len(masks) - 1]
        st.masks = masks
        return draft

    def _model_draft(self, s: Any, st: SpecState, k: int) -> list[int]:
        """k tokens from the draft model (greedy, or sampled from q with the same options)."""
        dl = st.draft
        if st.dcache is None:
            st.dcache = new_cache(dl)
        catch_up = s.fed[st.dfed:] + [s.next_input]
        toks, qs = [], []
        with mx.stream(GENERATION_STREAM):
            if len(catch_up) > s.step:      # a whole prompt: in chunks, as the model's own prefill
                prefill(dl, catch_up[:-1], st.dcache, s.step)
                catch_up = catch_up[-1:]
            logits = dl.model(mx.array(catch_up, dtype=mx.uint32)[None], cache=st.dcache)[:, -1, :]
            for j in range(k):
                logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                if st.dist is None:
                    t = mx.argmax(logp, axis=-1)
                else:
                    q = st.dist(logp)
                    qs.append(q)
                    t = mx.random.categorical(q)
                toks.append(t)
                if j + 1 < k:
                    logits = dl.model(t[:, None].astype(mx.uint32), cache=st.dcache)[:, -1, :]
            if qs:
                st.q = mx.concatenate(qs, axis=0)
            mx.eval(toks, *qs)
        st.dfed = len(s.fed) + 1
        st.dfed_drafts = k - 1
        return [int(t.item()) for t in toks]

    def _rewind_draft(self, st: SpecState, accepted: int) -> None:
        if st.dcache is None:
            return
        kept = min(accepted, st.dfed_drafts)
        cut = st.dfed_drafts - kept
        if cut:
            for c in st.dcache:
                c.trim(cut)
        st.dfed += kept
        st.dfed_drafts = 0

    # ---- one speculative step -------------------------------------------------------------
    def step(self, dec: Any, out: list, is_cancelled: Any) -> bool:
        """Run one speculative step for the whole batch; False (nothing done) when no member
        has a draft or the batch can't be cut back (the plain step runs instead)."""
        if not self.enabled:
            return False
        batch = dec._batch
        now = time.perf_counter()
        self._observe(dec, now)
        self._last = (now, dec._steps, len(batch), 1) if not dec.waiting else None
        drafting = any(s.spec is not None and s.spec.active(s.n) for s in batch)
        if (not drafting or (self.gate and self.solo and len(batch) > 1) or any(is_cancelled(s.key) for s in batch)
                or not dec._plain_kv()):
            return False
        try:
            drafts = [self._draft(s) for s in batch]
            if not any(drafts):
                return False
            width = 1 + max(len(d) for d in drafts)
            if self.gate and not self.pays(batch, drafts, width):
                self._abandon(batch)
                return False
            eos = self.loaded.eos_token_ids
            for s in batch:     # members without a draft: their next token's mask, before the cache moves
                if s.constraint is not None and s.spec.masks is None:
                    s.spec.masks = [constraint_mask(s.constraint, eos, self.vocab)]
        except MlxliteError:    # a member's constraint fails at its next token: the plain step fails it alone
            self._abandon(batch)
            return False
        if self._last is not None:
            self._last = (now, dec._steps, len(batch), width)
        rows = [[s.next_input, *d] + [s.next_input] * (width - 1 - len(d)) for s, d in zip(batch, drafts, strict=True)]
        results = self._verify(dec, batch, drafts, rows, width)
        self._trim(dec, [width - len(r[0]) for r in results])
        self._emit(dec, batch, drafts, results, out, is_cancelled)
        self.steps += 1
        self.rows += len(batch)
        return True

    def _abandon(self, batch: list[Any]) -> None:
        """This step's drafts are dropped: draft models' caches forget them."""
        for s in batch:
            if s.spec is not None and s.spec.dcache is not None:
                self._rewind_draft(s.spec, 0)

    # ---- whether it pays -------------------------------------------------------------------
    def _observe(self, dec: Any, now: float) -> None:
        """The step that began at `_last` took until now: fold it into the cost model."""
        last = self._last
        if last is None or dec._steps != last[1] + 1 or dec.waiting:
            return
        seconds, members, width = now - last[0], last[2], last[3]
        plain = self.plain.get(members)
        if width == 1:
            if plain is None:
                self.plain[members] = seconds
            elif seconds < 4 * plain:        # a stall (another model's step, a pause) is no step's cost
                self.plain[members] = 0.8 * plain + 0.2 * seconds
        elif plain is not None:
            extra = min(4.0, max(0.0, (seconds / plain - 1) / (width - 1)))
            self.extra = extra if self.extra is None else 0.8 * self.extra + 0.2 * extra

    def pays(self, batch: list[Any], drafts: list[list[int]], width: int) -> bool:
        """Whether a speculative step of this width is expected to yield more tokens per
        second than a plain one: the members' expected yield (their keep rates) per member
        against the modelled cost ratio 1 + extra * (W - 1). Until a plain step of this size
        has been timed, a plain step; until a speculative one has, a speculative step; after
        EXPLORE declines in a row, one speculative step to measure again."""
        members = len(batch)
        if members not in self.plain:
            return False
        if self.extra is None:
            return True
        gain = sum(s.spec.expected(len(d)) for s, d in zip(batch, drafts, strict=True))
        self._paying = gain / members >= 1 + self.extra * (width - 1)
        if self._paying or self._declined >= self.EXPLORE:
            self._declined = 0
            return True
        self._declined += 1
        return False

    def _verify(self, dec: Any, batch: list[Any], drafts: list[list[int]], rows: list[list[int]],
                width: int) -> list[tuple[list[int], list[float], list[int], Any]]:
        """One forward over every member's draft; per member (tokens, logprobs, positions,
        top alternatives or None): the accepted draft tokens then one more."""
        with mx.stream(GENERATION_STREAM):
            inputs = mx.array(rows, dtype=mx.uint32)
            logits = self.loaded.model(inputs, cache=dec._cache)           # [B, W, V]
            vocab = logits.shape[-1]
            if any(s.processors or s.constraint is not None for s in batch):
                fixed = []
                for i, s in enumerate(batch):
                    if not (s.processors or s.constraint is not None):
                        fixed.append(logits[i])
                        continue
                    hist, per = s.history, []
                    for j in range(width):
                        row = logits[i, j:j + 1]
                        if j <= len(drafts[i]):
                            if s.processors:
                                hist = mx.concatenate([hist, inputs[i, j:j + 1]])
                                for proc in s.processors:
                                    row = proc(hist, row)
                            if s.constraint is not None:
                                mask = _fit(s.spec.masks[j], vocab)
                                row = mx.where(mx.array(mask), row, mx.array(-float("inf"), dtype=row.dtype))
                        per.append(row)
                    fixed.append(mx.concatenate(per, axis=0))
                logits = mx.stack(fixed)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [B, W, V]
            argmax = mx.argmax(logprobs, axis=-1)                              # [B, W]
            greedy_lp = mx.take_along_axis(logprobs, argmax[..., None], axis=-1)[..., 0]
            k = max(s.top for s in batch)
            tops = top_alternatives(logprobs.reshape(-1, vocab), k) if k > 0 else None
            sampled: dict[int, tuple[mx.array, ...]] = {}
            for i, s in enumerate(batch):
                if not s.greedy:
                    sampled[i] = sample_graph(s.spec, logprobs[i], drafts[i])
            mx.eval(argmax, greedy_lp, *(tops or ()), *[a for v in sampled.values() for a in v])
        argmax_l, glp_l = argmax.tolist(), greedy_lp.tolist()
        top_ids = tops[0].reshape(len(batch), width, -1).tolist() if tops else None
        top_vals = tops[1].reshape(len(batch), width, -1).tolist() if tops else None
        results = []
        for i, (s, d) in enumerate(zip(batch, drafts, strict=True)):
            if s.greedy:
                a = 0
                while a < len(d) and argmax_l[i][a] == d[a]:
                    a += 1
                tokens, lps = argmax_l[i][:a + 1], glp_l[i][:a + 1]
            else:
                keep, d_lp, res, res_lp, bonus, bonus_lp = (v.tolist() for v in sampled[i])
                a = 0
                while a < len(d) and keep[a]:
                    a += 1
                tokens = d[:a] + ([res[a]] if a < len(d) else bonus)
                lps = d_lp[:a] + ([res_lp[a]] if a < len(d) else bonus_lp)
            top = (top_ids[i], top_vals[i]) if top_ids is not None and s.top else None
            if d:
                s.spec.settle(len(d), a, s.n)
            results.append((tokens, lps, list(range(a + 1)), top))
        return results

    def _trim(self, dec: Any, rejected: list[int]) -> None:
        """Cut every member's cache back to its accepted tokens (`rejected[i]` positions)."""
        cache = dec._cache
        if len(dec._batch) == 1:
            if rejected[0]:
                for c in cache:
                    c.trim(rejected[0])
            return
        low = min(rejected)
        if low:
            for c in cache:
                c.trim(low)
        extra = [r - low for r in rejected]
        if any(extra):
            for c in cache:      # roll each row right by its extra, growing its left padding
                c.prepare(right_padding=extra)
                c.finalize()

    def _emit(self, dec: Any, batch: list[Any], drafts: list[list[int]], results: list, out: list,
              is_cancelled: Any) -> None:
        """Hand out each member's tokens as a plain step would, one by one."""
        now = time.perf_counter()
        leaving: list[int] = []
        for i, (s, d, (tokens, lps, positions, top)) in enumerate(zip(batch, drafts, results, strict=True)):
            accepted = len(tokens) - 1
            fed = [s.next_input, *d[:accepted]]
            s.fed.extend(fed)
            if s.processors:
                s.history = mx.concatenate([s.history, mx.array(fed, dtype=mx.uint32)])
            if s.spec is not None:
                self._rewind_draft(s.spec, accepted)
            if is_cancelled(s.key):
                out.append((s.key, dec._finish(s, "cancel", dec._tail(s))))
                leaving.append(i)
                continue
            if s.t_first is None:
                s.t_first = now
            s.next_input = tokens[-1]
            n = s.n
            for token, lp, j in zip(tokens, lps, positions, strict=True):
                if dec.hand_out(s, token, lp, None if top is None else (top[0][j], top[1][j]), out):
                    leaving.append(i)
                    break
            self.emitted += s.n - n
        if leaving:
            dec._leave(leaving, keep_caches=True)


def sample_graph(st: SpecState, logprobs: mx.array, draft: list[int]) -> tuple[mx.array, ...]:
    """Rejection sampling's arrays for one member: keep flags [n], draft tokens' logprobs [n],
    residual draws and their logprobs [n], the bonus draw and its logprob (n = draft length)."""
    n = len(draft)
    logp = st.dist(logprobs)                          # [W, V]: what the plain sampler draws from
    bonus = mx.random.categorical(logp[n:n + 1])
    bonus_lp = mx.take_along_axis(logprobs[n:n + 1], bonus[:, None], axis=-1)[:, 0]
    if n == 0:
        empty = mx.zeros((0,), dtype=mx.float32)
        return empty, empty, empty.astype(mx.uint32), empty, bonus, bonus_lp
    d = mx.array(draft, dtype=mx.uint32)[:, None]
    p = mx.take_along_axis(mx.exp(logp[:n]), d, axis=-1)[:, 0]
    if st.q is None:      # a point-mass draft: keep with p(d); else p without d
        ratio = p
        residual = mx.put_along_axis(logp[:n], d, mx.array(-float("inf"), dtype=logp.dtype), axis=-1)
    else:
        q = mx.exp(st.q)
        ratio = p / mx.maximum(mx.take_along_axis(q, d, axis=-1)[:, 0], 1e-30)
        left = mx.maximum(mx.exp(logp[:n]) - q, 0.0)
        residual = mx.where(left.sum(axis=-1, keepdims=True) > 0, mx.log(left), logp[:n])
    keep = mx.random.uniform(shape=(n,)) < ratio
    res = mx.random.categorical(residual)
    d_lp = mx.take_along_axis(logprobs[:n], d, axis=-1)[:, 0]
    res_lp = mx.take_along_axis(logprobs[:n], res[:, None], axis=-1)[:, 0]
    return keep, d_lp, res, res_lp, bonus, bonus_lp


def _fit(mask: np.ndarray, vocab: int) -> np.ndarray:
    if mask.shape[0] >= vocab:
        return mask[:vocab]
    return np.concatenate([mask, np.zeros(vocab - mask.shape[0], dtype=bool)])
