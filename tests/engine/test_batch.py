"""The batched decoder (runner_batch) on a tiny real MLX model: members decode exactly what
they decode alone, leave on cancel, join mid-flight, keep their own options; prefix caches."""

from __future__ import annotations

import pytest

from mlxlite import options as options_mod

GREEDY = {"temperature": 0}
PROMPTS = ["The quick brown fox", "Hello world! Bonjour", "def main():\n\treturn", "What is the capital",
           "emoji and symbols", "class Foo:\n    pass", "Paris is the capital of", "naïve façade. Grüße"]


def opts(**kw) -> options_mod.Options:
    return options_mod.parse(kw)


@pytest.fixture(scope="module")
def tiny(tiny_gguf_loaded):
    return tiny_gguf_loaded


def alone(loaded, ids, **kw):
    from mlxlite.engine import runner

    top = kw.pop("top_logprobs", 0)
    items = list(runner.generate(loaded, ids, opts(**kw), top_logprobs=top))
    return items[:-1], items[-1]


def drive(dec, cancelled=frozenset(), until=None, limit=10_000):
    """Step until every sequence finished; returns {key: (pieces, finish or its own error)}."""
    got: dict = {}
    for _ in range(limit):
        if until is not None and until(got):
            break
        if len(dec) == 0:
            break
        for key, item in dec.step(lambda k: k in cancelled):
            pieces, _ = got.setdefault(key, ([], None))
            if type(item).__name__ == "Finish" or isinstance(item, Exception):
                got[key] = (pieces, item)
            else:
                pieces.append(item)
    return got


def text(pieces, finish):
    return "".join(p.text for p in pieces) + finish.text_tail


def test_eight_members_decode_exactly_what_they_decode_alone(tiny):
    from mlxlite.engine import runner

    ids = [runner.tokenize(tiny, p) for p in PROMPTS]
    want = [alone(tiny, i, num_predict=24, **GREEDY) for i in ids]
    dec = runner.decoder(tiny, 8)
    for k, i in enumerate(ids[:3]):
        dec.add(k, i, opts(num_predict=24, **GREEDY))
    got = drive(dec, until=lambda g: len(g.get(0, ([], None))[0]) >= 5)   # the rest join mid-flight
    for k, i in enumerate(ids[3:], start=3):
        dec.add(k, i, opts(num_predict=24, **GREEDY))
    for key, (pieces, finish) in drive(dec).items():
        got.setdefault(key, ([], None))
        got[key] = (got[key][0] + pieces, finish)
    for k, (pieces, finish) in enumerate(want):
        assert [p.token for p in got[k][0]] == [p.token for p in pieces], k
        assert text(*got[k]) == text(pieces, finish)
        assert got[k][1].reason == finish.reason and got[k][1].eval_tokens == finish.eval_tokens


def test_a_cancelled_member_leaves_and_the_others_finish(tiny):
    from mlxlite.engine import runner

    ids = [runner.tokenize(tiny, p) for p in PROMPTS[:4]]
    want = [alone(tiny, i, num_predict=16, **GREEDY) for i in ids]
    dec = runner.decoder(tiny, 8)
    for k, i in enumerate(ids):
        dec.add(k, i, opts(num_predict=16, **GREEDY))
    got = drive(dec, until=lambda g: len(g.get(3, ([], None))[0]) >= 3)
    rest = drive(dec, cancelled={1})
    assert rest[1][1].reason == "cancel" and rest[1][0] == []
    assert dec.active == 0 and len(dec) == 0
    for k in (0, 2, 3):
        tokens = [p.token for p in got[k][0] + rest[k][0]]
        assert tokens == [p.token for p in want[k][0]] and rest[k][1].reason == want[k][1].reason


def test_members_keep_their_own_options(tiny):
    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, PROMPTS[0])
    cases = {"short": dict(num_predict=3, **GREEDY), "pen": dict(num_predict=12, repeat_penalty=1.5, **GREEDY),
             "seed": dict(num_predict=12, temperature=0.9, seed=7),
             "stop": dict(num_predict=30, **GREEDY)}
    want = {k: alone(tiny, ids, **kw) for k, kw in cases.items()}
    stop_text = text(*want["stop"])[3:6]
    cases["stop"]["stop"] = [stop_text]
    want["stop"] = alone(tiny, ids, **cases["stop"])
    dec = runner.decoder(tiny, 8)
    for k, kw in cases.items():
        dec.add(k, ids, opts(**kw))
    got = drive(dec)
    for k in cases:
        assert text(*got[k]) == text(*want[k]), k
        assert got[k][1].reason == want[k][1].reason
    assert stop_text not in text(*got["stop"]) and got["stop"][1].reason == "stop"
    assert got["stop"][1].stop_string == stop_text and got["short"][1].stop_string == ""


def test_full_batch_time_slices_so_a_waiting_request_runs(tiny):
    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, PROMPTS[1])
    want_long = alone(tiny, ids, num_predict=40, **GREEDY)
    want_short = alone(tiny, ids, num_predict=3, **GREEDY)
    dec = runner.decoder(tiny, 1)
    dec.time_slice = 8
    dec.add("long", ids, opts(num_predict=40, **GREEDY))
    got = drive(dec, until=lambda g: len(g.get("long", ([], None))[0]) >= 2)
    dec.add("short", ids, opts(num_predict=3, **GREEDY))
    order = []
    while len(dec):
        for key, item in dec.step(lambda k: False):
            order.append(key)
            pieces, _ = got.setdefault(key, ([], None))
            if type(item).__name__ == "Finish":
                got[key] = (pieces, item)
            else:
                pieces.append(item)
    assert order.index("short") < len(order) - 20     # the short one ended long before the long one
    assert [p.token for p in got["long"][0]] == [p.token for p in want_long[0]]
    assert [p.token for p in got["short"][0]] == [p.token for p in want_short[0]]


def test_kept_cache_serves_a_longer_prompt(tiny):
    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, PROMPTS[6])
    dec = runner.decoder(tiny, 4, keep_caches=True)
    dec.add("a", ids, opts(num_predict=6, **GREEDY))
    first = drive(dec)["a"]
    tokens, cache = dec.take_cache("a")
    assert tokens == ids + [p.token for p in first[0]][:-1] and cache[0].offset == len(tokens)
    assert runner.cache_nbytes(cache) > 0
    follow = ids + [p.token for p in first[0]] + runner.tokenize(tiny, " and more", add_special=False)
    want = alone(tiny, follow, num_predict=6, **GREEDY)
    n = len(tokens)
    view = runner.cache_prefix(cache, n)
    dec.add("b", follow, opts(num_predict=6, **GREEDY), prompt_cache=view, cached_tokens=n)
    got = drive(dec)["b"]
    assert [p.token for p in got[0]] == [p.token for p in want[0]]
    assert (got[1].prompt_tokens, got[1].prompt_eval_tokens) == (len(follow), len(follow) - n)
    assert cache[0].offset == n       # the stored cache was not touched


def test_a_constrained_member_matches_its_solo_output(tiny):
    from mlxlite.constrain import tokens as constrain
    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, PROMPTS[3])

    def con():
        return constrain.TokenConstraint("json", runner.token_bytes(tiny), tiny.eos_token_ids)

    items = list(runner.generate(tiny, ids, opts(num_predict=30, **GREEDY), constraint=con()))
    want = text(items[:-1], items[-1])
    dec = runner.decoder(tiny, 8)
    dec.add("json", ids, opts(num_predict=30, **GREEDY), constraint=con())
    for k, p in enumerate(PROMPTS[:3]):
        dec.add(k, runner.tokenize(tiny, p), opts(num_predict=30, **GREEDY))
    got = drive(dec)
    assert text(*got["json"]) == want and want.strip()[:1] in "{[\"-0123456789tfn"


def overlapping(levels: int) -> dict:
    """A schema whose documents all open `levels` arrays, each a union of two array branches
    that overlap: each `[` doubles the live parses, so past 12 levels the recognizer passes
    its bound (4,096, constrain's MAX_ALTERNATIVES) partway through the output."""
    defs: dict = {f"l{levels}": {"type": "integer"}}
    for i in range(levels):
        items = {"$ref": f"#/$defs/l{i + 1}"}
        defs[f"l{i}"] = {"anyOf": [{"type": "array", "items": items, "minItems": 1},
                                   {"type": "array", "items": items, "minItems": 1, "maxItems": 3}]}
    return {"$defs": defs, "$ref": "#/$defs/l0"}


def fails_alone(tiny, dec, bad_prompt, constraint, *, join_after=0, num_predict=40):
    """Three plain members and one constrained one ("bad", joining once the others have
    `join_after` tokens) decode in `dec`; the plain ones must decode exactly what they decode
    alone. Returns (the bad one's pieces, its error, members still decoding when it failed)."""
    from mlxlite.engine import runner

    ids = [runner.tokenize(tiny, p) for p in PROMPTS[:3]]
    want = [alone(tiny, i, num_predict=num_predict, **GREEDY) for i in ids]
    for k, i in enumerate(ids):
        dec.add(k, i, opts(num_predict=num_predict, **GREEDY))
    got = drive(dec, until=lambda g: all(len(g.get(k, ([], None))[0]) >= join_after for k in range(3)))
    dec.add("bad", runner.tokenize(tiny, bad_prompt), opts(num_predict=num_predict, **GREEDY), constraint=constraint)
    others_left = None
    while len(dec):
        for key, item in dec.step(lambda k: False):
            pieces, _ = got.setdefault(key, ([], None))
            if type(item).__name__ == "Finish" or isinstance(item, Exception):
                got[key] = (pieces, item)
                if key == "bad":
                    others_left = sum(got.get(k, ([], None))[1] is None for k in range(3))
            else:
                pieces.append(item)
    for k, (pieces, finish) in enumerate(want):
        assert [p.token for p in got[k][0]] == [p.token for p in pieces], k
        assert (got[k][1].reason, got[k][1].eval_tokens, text(*got[k])) == \
            (finish.reason, finish.eval_tokens, text(pieces, finish)), k
    assert dec.take_cache("bad") is None and dec.active == 0 and len(dec) == 0
    return got["bad"][0], got["bad"][1], others_left


def test_a_member_whose_schema_grows_too_ambiguous_mid_decode_fails_alone(tiny):
    """Its constraint passes the recognizer's bound at its 13th `[`: that member gets the
    error in place of a Finish (and keeps no cache); the rest of the batch goes on exactly."""
    from mlxlite.constrain import tokens as constrain
    from mlxlite.engine import runner
    from mlxlite.errors import Unsupported

    bad = constrain.TokenConstraint(overlapping(13), runner.token_bytes(tiny), tiny.eos_token_ids)
    dec = runner.decoder(tiny, 8, keep_caches=True)
    pieces, error, others_left = fails_alone(tiny, dec, PROMPTS[3], bad)
    assert isinstance(error, Unsupported) and "too ambiguous" in str(error)
    assert "".join(p.text for p in pieces).count("[") == 12       # it failed partway, at the 13th
    assert others_left == 3                                        # while the others were decoding


def test_a_member_whose_constraint_fails_building_its_mask_fails_alone(tiny, monkeypatch):
    """The bound passed while the constraint's mask is built (a token spelling several `[`,
    here a bound of 1 and the two branches `[` starts): it joins a running batch and fails
    at its first step, alone."""
    from mlxlite.constrain import recognizer
    from mlxlite.constrain import tokens as constrain
    from mlxlite.engine import runner
    from mlxlite.errors import Unsupported

    monkeypatch.setattr(recognizer, "MAX_ALTERNATIVES", 1)
    bad = constrain.TokenConstraint(overlapping(3), runner.token_bytes(tiny), tiny.eos_token_ids)
    dec = runner.decoder(tiny, 8, keep_caches=True)
    pieces, error, others_left = fails_alone(tiny, dec, PROMPTS[4], bad, join_after=3)
    assert isinstance(error, Unsupported) and pieces == [] and others_left == 3


@pytest.mark.parametrize("kw", [dict(num_predict=20), dict(num_predict=20, repeat_penalty=1.3, repeat_last_n=8),
                                dict(num_predict=30, stop=["e"]), dict(num_predict=12, temperature=0.8, seed=3)])
def test_a_request_alone_in_the_batch_path_is_exactly_generate(tiny, kw):
    from mlxlite.engine import runner

    kw = {**GREEDY, **kw}
    ids = runner.tokenize(tiny, PROMPTS[2])
    pieces, finish = alone(tiny, ids, **kw)
    dec = runner.decoder(tiny, 8)
    dec.add("x", ids, opts(**kw))
    got_pieces, got_finish = drive(dec)["x"]
    assert [(p.token, p.text, p.logprob) for p in got_pieces] == [(p.token, p.text, p.logprob) for p in pieces]
    assert (got_finish.reason, got_finish.eval_tokens, got_finish.text_tail) == \
        (finish.reason, finish.eval_tokens, finish.text_tail)


def test_unread_logprobs_are_not_computed_and_the_tokens_stay_the_same(tiny):
    """A sequence whose logprobs nobody reads (`logprobs=False`, what the server asks unless
    the request wants them) decodes the same tokens and text, alone and beside one that reads
    them; its pieces carry 0.0, and a step where no member reads them gathers none."""
    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, PROMPTS[0])
    want, finish = alone(tiny, ids, num_predict=20, **GREEDY)
    assert any(p.logprob != 0.0 for p in want)
    plain = list(runner.generate(tiny, ids, opts(num_predict=20, **GREEDY), logprobs=False))
    assert [(p.token, p.text, p.logprob) for p in plain[:-1]] == [(p.token, p.text, 0.0) for p in want]
    dec = runner.decoder(tiny, 8)
    # Speculation off: a plain step is what queues a look-ahead to inspect.
    dec.add("alone", ids, opts(num_predict=20, draft_num_predict=0, **GREEDY), logprobs=False)
    first = drive(dec, until=lambda g: len(g.get("alone", ([], None))[0]) >= 3)["alone"][0]
    assert dec._inflight is not None and dec._inflight[1] is None      # the queued step gathers none
    pieces = first + drive(dec)["alone"][0]
    assert [(p.token, p.text, p.logprob) for p in pieces] == [(p.token, p.text, 0.0) for p in want]
    dec.add("reads", ids, opts(num_predict=20, **GREEDY))
    dec.add("skips", ids, opts(num_predict=20, **GREEDY), logprobs=False)
    got = drive(dec)
    assert [p.token for p in got["reads"][0]] == [p.token for p in want]
    assert [p.logprob for p in got["reads"][0]] == pytest.approx([p.logprob for p in want], abs=1e-4)  # batched
    assert [(p.token, p.logprob) for p in got["skips"][0]] == [(p.token, 0.0) for p in want]
    assert text(*got["skips"]) == text(want, finish)


def test_top_logprobs_in_a_batch_are_each_members_own_log_softmax(tiny):
    """Members asking for 0, 3 and 5 alternatives decode together; each gets its own, equal
    to numpy's log-softmax of the model's logits (one full forward pass) at every step."""
    from mlxlite.engine import runner
    from tests.engine.test_runner import assert_top_matches

    ids = [runner.tokenize(tiny, p) for p in PROMPTS[:3]]
    dec = runner.decoder(tiny, 8)
    for k, (prompt, top) in enumerate(zip(ids, (0, 3, 5), strict=True)):
        dec.add(k, prompt, opts(num_predict=6, **GREEDY), top_logprobs=top)
    got = drive(dec)
    assert all(p.top == () for p in got[0][0])
    for k, top in ((1, 3), (2, 5)):
        pieces = got[k][0]
        assert len(pieces) == 6 and all(len(p.top) == top for p in pieces)
        assert_top_matches(tiny, ids[k], pieces, top)
    # Alone, a member asking for alternatives gets exactly what generate gives.
    dec.add("alone", ids[2], opts(num_predict=6, **GREEDY), top_logprobs=5)
    want, _ = alone(tiny, ids[2], num_predict=6, top_logprobs=5, **GREEDY)
    assert [(p.token, p.top) for p in drive(dec)["alone"][0]] == [(p.token, p.top) for p in want]
