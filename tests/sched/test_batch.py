"""Pure parts of issue 5, exact: prefix-cache bookkeeping, the metrics registry, and the
scheduler's interleaving across models (fake engine)."""

from __future__ import annotations

import random

import pytest

from mlxlite.sched import GenerateJob, Scheduler, is_finish
from mlxlite.sched.metrics import Registry
from mlxlite.sched.prefix_cache import PrefixCache
from mlxlite.server.prompt import PromptSpec
from tests.fake_engine import FakeEngine, add_fake_model


# ---- prefix cache --------------------------------------------------------------------------
def test_longest_prefix_wins_and_the_last_prompt_token_is_always_computed():
    pc = PrefixCache(1000)
    pc.insert("m", [1, 2, 3, 4, 5], "A", 100)
    pc.insert("m", [1, 2, 3, 9, 9, 9, 9], "B", 100)
    pc.insert("other", [1, 2, 3, 4, 5, 6, 7], "C", 100)
    hit = pc.lookup("m", [1, 2, 3, 4, 5, 6])
    assert (hit.tokens, hit.cache) == (5, "A")
    assert pc.lookup("m", [1, 2, 3, 4, 5]).tokens == 4            # never the whole prompt
    assert pc.lookup("m", [7, 7, 7, 7, 7]) is None                 # nothing shared
    assert pc.lookup("m", [1, 2, 3, 5, 5, 5]) is None              # 3 shared: under MIN_TOKENS
    assert pc.stats()["hits"] == 2 and pc.stats()["tokens_saved"] == 9 and pc.stats()["misses"] == 2


def test_a_longer_entry_replaces_its_prefixes_and_lru_keeps_the_budget():
    pc = PrefixCache(250)
    pc.insert("m", [1, 2, 3, 4], "turn1", 100)
    pc.insert("m", [1, 2, 3, 4, 5, 6], "turn2", 100)               # the chat went on
    assert pc.stats()["entries"] == 1 and pc.stats()["bytes"] == 100
    pc.insert("m", [9, 9, 9, 9], "x", 100)
    pc.lookup("m", [1, 2, 3, 4, 5, 6, 7])                          # turn2 is now most recent
    pc.insert("m", [8, 8, 8, 8], "y", 100)                         # over budget: x (LRU) goes
    assert pc.lookup("m", [9, 9, 9, 9, 9]) is None
    assert pc.lookup("m", [1, 2, 3, 4, 5, 6, 0]).cache == "turn2"
    assert pc.stats()["bytes"] == 200
    assert pc.insert("m", [5, 5, 5, 5, 5], "huge", 251) is False   # never fits: not kept
    pc.drop_model("m")
    assert pc.stats()["entries"] == 0 and pc.stats()["bytes"] == 0
    assert not PrefixCache(0).enabled


def _shared(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_lookup_at_10k_entries_finds_the_longest_shared_prefix_and_never_an_evicted_one():
    """10,000 entries that share system prompts (as a soak's requests do): every lookup
    answers what a scan of all entries would, and entries the byte budget evicted are gone."""
    rng = random.Random(15)
    systems = [[rng.randrange(50) for _ in range(rng.randint(8, 40))] for _ in range(100)]
    pc = PrefixCache(10_000 * 10)
    inserted = []
    for i in range(10_500):             # the first 500 are evicted by the budget
        tokens = systems[i % 100] + [rng.randrange(50) for _ in range(rng.randint(1, 12))]
        pc.insert("m", tokens, i, 10)
        inserted.append(tokens)
    pc.insert("other", systems[0] + [7, 7, 7], "other model", 10)
    live = {cache: tokens for tokens, cache, _ in pc.entries("m")}
    assert pc.stats()["bytes"] <= 10_000 * 10 and len(live) > 9_000
    evicted = [t for i, t in enumerate(inserted) if i not in live]
    queries = [t[:rng.randint(1, len(t))] + [rng.randrange(50)] for t in rng.sample(inserted, 200)]
    queries += [t + [1, 2] for t in rng.sample(evicted, 20)] + [[99] * 10, systems[3][:3] + [0]]
    for query in queries:
        want = max(min(_shared(t, query), len(query) - 1) for t in live.values())
        hit = pc.lookup("m", query)
        if want < 4:
            assert hit is None, query
            continue
        assert hit is not None and hit.tokens == want, (query, want, hit)
        assert hit.cache in live and _shared(live[hit.cache], query) >= want   # a live entry, really shared


class _Tok(int):
    """A token that counts every comparison and hash made of it."""

    ops = 0

    def __eq__(self, other):
        _Tok.ops += 1
        return int(self) == int(other)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        _Tok.ops += 1
        return int.__hash__(self)


def _filled(entries: int) -> tuple[PrefixCache, list[int]]:
    """A cache of `entries` prompts sharing a 30-token system prompt; and that prompt."""
    rng = random.Random(15)
    system = [rng.randrange(50) for _ in range(30)]
    pc = PrefixCache(1 << 40)
    for i in range(entries):
        tail = (i // 2500, i // 50 % 50, i % 50, rng.randrange(50))
        pc.insert("m", [_Tok(x) for x in (*system, *tail)], i, 1)
    return pc, system


def test_lookup_and_insert_cost_does_not_grow_with_the_number_of_entries():
    """The soak's slowdown (107 -> 17.5 requests/s as the cache reached 11,572 entries) was a
    scan of every entry per lookup and insert: token comparisons must not depend on it."""
    costs = []
    for size in (100, 2_000):
        pc, system = _filled(size)
        query = [_Tok(x) for x in (*system, 1, 2, 3, 4, 5)]
        _Tok.ops = 0
        assert pc.lookup("m", query).tokens >= 30
        looked = _Tok.ops
        _Tok.ops = 0
        pc.insert("m", query, "new", 1)
        costs.append((looked, _Tok.ops))
    (small_lookup, small_insert), (big_lookup, big_insert) = costs
    assert big_lookup <= 4 * 35 and big_insert <= 8 * 35, costs     # a few per prompt token
    assert big_lookup <= 2 * small_lookup + 10 and big_insert <= 2 * small_insert + 10, costs


# ---- metrics -------------------------------------------------------------------------------
def test_registry_renders_prometheus_text():
    reg = Registry()
    c = reg.counter("x_requests_total", "requests")
    c.inc(2, route="/a", status="200")
    c.inc(1, route='/b"q', status="404")
    reg.gauge("x_depth", "depth").set(3)
    h = reg.histogram("x_batch", "batch", (1, 4))
    for v in (1, 2, 8):
        h.observe(v)
    reg.gauge_fn("x_fn", "sampled", lambda: 7)
    reg.gauge_fn("x_broken", "fails", lambda: 1 / 0)
    text = reg.render()
    assert "# TYPE x_requests_total counter" in text
    assert 'x_requests_total{route="/a",status="200"} 2' in text
    assert 'x_requests_total{route="/b\\"q",status="404"} 1' in text
    assert "x_depth 3" in text and "x_fn 7" in text and "x_broken" in text
    assert 'x_batch_bucket{le="1"} 1' in text and 'x_batch_bucket{le="4"} 2' in text
    assert 'x_batch_bucket{le="+Inf"} 3' in text and "x_batch_sum 11" in text and "x_batch_count 3" in text
    with pytest.raises(ValueError):
        c.inc(-1)


# ---- scheduler: models interleave ----------------------------------------------------------
def test_a_short_request_for_model_b_finishes_while_model_a_streams(store):
    engine = FakeEngine()
    engine.reply_for = lambda prompt: "b" * 20 if "short" in prompt else "a" * 100000
    s = Scheduler(store, engine, keep_alive=300, max_loaded_models=2)
    a, b = add_fake_model(store, "a"), add_fake_model(store, "b")
    try:
        long = s.submit(GenerateJob(a, PromptSpec("a", prompt="long")))
        events = long.events()
        next(events), next(events)                                  # Ready, first piece: A streams
        short = s.submit(GenerateJob(b, PromptSpec("b", prompt="short")))
        got = list(short.events())
        assert is_finish(got[-1]) and got[-1].reason == "stop" and got[-1].eval_tokens == 20
        assert engine.active == 1 and engine.finished == ["stop"]  # A still running, B done
        long.cancel()
        assert [e for e in events if is_finish(e)][-1].reason == "cancel"
    finally:
        s.close()


# ---- the tokens/s gauge ----------------------------------------------------------------------
def test_the_token_rate_record_stays_small_when_nobody_reads_the_metrics(store):
    """The rate gauge's record holds one entry per second, not one per token: a daemon that
    is never scraped made it grow by an entry for every token it ever generated."""
    engine = FakeEngine(reply="x" * 3000)
    s = Scheduler(store, engine, keep_alive=300)
    try:
        got = list(s.submit(GenerateJob(add_fake_model(store), PromptSpec("fake", prompt="hi"))).events())
        assert is_finish(got[-1]) and got[-1].eval_tokens == 3000
        assert len(s.batches._recent) <= s.batches.RATE_WINDOW + 1
        assert 0 < s.batches.tokens_per_second() <= 3000 / s.batches.RATE_WINDOW
    finally:
        s.close()
