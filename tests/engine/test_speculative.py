"""Speculative decoding in the batch decoder (engine/speculative.py) on real MLX models: greedy
output is plain decoding's token for token (alone, batched, with a schema, with penalties, with
a draft model, over long generations whose caches were cut back after rejections; tiny and
default models); rejection sampling keeps the plain sampler's distribution; logprobs,
top_logprobs, stop strings and num_predict stay exact."""

from __future__ import annotations

import math

import pytest

from mlxlite import options as options_mod
from tests.engine.test_batch import PROMPTS, alone, drive, text

GREEDY = {"temperature": 0}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array",
          "items": {"type": "string"}}}, "required": ["name", "tags"]}
REPEAT = "def area(w, h):\n    return w * h\n\ndef area(w, h):\n    return w * h\n\ndef area("


def opts(**kw) -> options_mod.Options:
    return options_mod.parse(kw)


@pytest.fixture(scope="module")
def tiny(tiny_gguf_loaded):
    return tiny_gguf_loaded


def tokens(pieces) -> list[int]:
    return [p.token for p in pieces]


def run_batch(loaded, prompts, kw, max_batch=8, gate=False, **add):
    """Decode `prompts` together; returns ({key: (pieces, finish)}, decoder). Speculative
    steps run whenever there are drafts (the speed gate off) unless `gate`."""
    from mlxlite.engine import runner

    dec = runner.decoder(loaded, max_batch, keep_caches=True)
    dec.speculator.gate = gate
    for k, ids in enumerate(prompts):
        dec.add(k, ids, opts(**kw), **{n: (v(k) if callable(v) else v) for n, v in add.items()})
    return drive(dec), dec


def assert_same(got, want, logprobs=True):
    """Same tokens, text, finish; logprobs equal to float rounding (a k-token forward sums in
    another order than a 1-token one)."""
    (pieces, finish), (wp, wf) = got, want
    assert tokens(pieces) == tokens(wp)
    assert text(pieces, finish) == text(wp, wf)
    assert (finish.reason, finish.eval_tokens, finish.stop_string) == (wf.reason, wf.eval_tokens, wf.stop_string)
    if logprobs:
        assert max((abs(a.logprob - b.logprob) for a, b in zip(pieces, wp, strict=True)), default=0) < 1e-4


def test_greedy_speculation_is_plain_decoding_alone_and_in_a_batch(tiny):
    from mlxlite.engine import runner

    ids = [runner.tokenize(tiny, p) for p in PROMPTS] + [runner.tokenize(tiny, REPEAT)]
    want = [alone(tiny, i, num_predict=64, **GREEDY) for i in ids]
    for k, i in enumerate(ids):                  # alone: a batch of one cuts plain KVCaches
        got, dec = run_batch(tiny, [i], dict(num_predict=64, **GREEDY))
        assert_same(got[0], want[k])
    got, dec = run_batch(tiny, ids, dict(num_predict=64, **GREEDY))
    spec = dec.speculator
    assert spec.steps > 0 and spec.emitted > spec.steps            # speculation ran and paid
    for k in range(len(ids)):
        assert_same(got[k], want[k])
    got, dec = run_batch(tiny, ids, dict(num_predict=64, draft_num_predict=0, **GREEDY))
    assert dec.speculator.steps == 0 and all(tokens(got[k][0]) == tokens(want[k][0]) for k in range(len(ids)))


def test_long_generations_keep_their_caches_right_after_rejections(tiny):
    """150 tokens each, three members whose drafts are often rejected (so rows are cut back by
    different amounts and rolled); the output stays plain decoding's and each kept cache holds
    exactly its tokens: continuing from it gives what a fresh prefill gives."""
    from mlxlite.engine import runner

    ids = [runner.tokenize(tiny, p) for p in (REPEAT, PROMPTS[0], PROMPTS[5])]
    want = [alone(tiny, i, num_predict=150, **GREEDY) for i in ids]
    got, dec = run_batch(tiny, ids, dict(num_predict=150, **GREEDY))
    for k in range(3):
        assert_same(got[k], want[k])
    states = [s for s in (dec.speculator,)]
    assert states[0].steps > 10
    for k in range(3):
        kept, cache = dec.take_cache(k)
        assert cache[0].offset == len(kept) and kept[:len(ids[k])] == ids[k]
        assert kept[len(ids[k]):] == tokens(got[k][0])[:len(kept) - len(ids[k])]
        follow = kept + runner.tokenize(tiny, " and")
        fresh = alone(tiny, follow, num_predict=12, **GREEDY)
        reused = list(runner.generate(tiny, follow, opts(num_predict=12, **GREEDY), prompt_cache=cache,
                                      cached_tokens=len(kept)))
        assert tokens(reused[:-1]) == tokens(fresh[0])


def test_rejected_drafts_are_counted_and_rows_are_rolled(tiny):
    """The batch path really cut rows back by different amounts (not only whole acceptances)."""
    from mlxlite.engine import runner, speculative

    ids = [runner.tokenize(tiny, p) for p in (REPEAT, PROMPTS[1], PROMPTS[6])]
    rolled = []
    real = speculative.Speculator._trim

    def spy(self, dec, rejected):
        rolled.append(list(rejected))
        return real(self, dec, rejected)

    speculative.Speculator._trim = spy
    try:
        got, dec = run_batch(tiny, ids, dict(num_predict=120, **GREEDY))
    finally:
        speculative.Speculator._trim = real
    assert any(len(r) > 1 and len(set(r)) > 1 for r in rolled)
    for k, i in enumerate(ids):
        assert_same(got[k], alone(tiny, i, num_predict=120, **GREEDY))


def test_a_schema_constrained_member_speculates_and_matches_plain(tiny):
    from mlxlite.constrain import tokens as constrain
    from mlxlite.engine import runner

    def con(_=None):
        return constrain.TokenConstraint(SCHEMA, runner.token_bytes(tiny), tiny.eos_token_ids)

    ids = [runner.tokenize(tiny, p) for p in (REPEAT, PROMPTS[3], PROMPTS[4])]
    want = []
    for i in ids:
        items = list(runner.generate(tiny, i, opts(num_predict=80, **GREEDY), constraint=con()))
        want.append((items[:-1], items[-1]))
    for k, i in enumerate(ids):
        got, _ = run_batch(tiny, [i], dict(num_predict=80, **GREEDY), constraint=con)
        assert_same(got[0], want[k])
    got, dec = run_batch(tiny, ids, dict(num_predict=80, **GREEDY), constraint=con)
    assert dec.speculator.steps > 0
    for k in range(3):
        assert_same(got[k], want[k])


def test_a_member_whose_schema_grows_too_ambiguous_fails_alone_and_the_others_stay_exact(tiny, monkeypatch):
    """In speculative steps too: the member whose constraint passes the recognizer's bound
    (mid-decode, at its 13th `[`) gets the error and leaves; the others decode what they
    decode alone. A constraint failing at a drafting member's next mask leaves the step to
    the plain one, which fails that member alone."""
    from mlxlite.constrain import recognizer
    from mlxlite.constrain import tokens as constrain
    from mlxlite.engine import runner
    from mlxlite.errors import Unsupported
    from tests.engine.test_batch import overlapping

    def con(schema):
        return constrain.TokenConstraint(schema, runner.token_bytes(tiny), tiny.eos_token_ids)

    ids = [runner.tokenize(tiny, REPEAT), runner.tokenize(tiny, PROMPTS[0])]
    want = [alone(tiny, i, num_predict=60, **GREEDY) for i in ids]
    brackets = runner.tokenize(tiny, "[" * 24)     # its lookup drafts are `[`s: they meet the bound too
    solo = []
    with pytest.raises(Unsupported, match="too ambiguous"):
        for piece in runner.generate(tiny, brackets, opts(num_predict=60, **GREEDY), constraint=con(overlapping(13))):
            solo.append(piece)
    dec = runner.decoder(tiny, 8, keep_caches=True)
    dec.speculator.gate = False
    for k, i in enumerate(ids):
        dec.add(k, i, opts(num_predict=60, **GREEDY))
    dec.add("bad", brackets, opts(num_predict=60, **GREEDY), constraint=con(overlapping(13)))
    got = drive(dec)
    assert dec.speculator.steps > 0
    pieces, error = got["bad"]
    assert isinstance(error, Unsupported) and "".join(p.text for p in pieces).count("[") == 12
    assert tokens(pieces) == tokens(solo) and dec.take_cache("bad") is None
    for k in range(2):
        assert_same(got[k], want[k])
    monkeypatch.setattr(recognizer, "MAX_ALTERNATIVES", 1)      # its first mask already fails
    got, dec = run_batch(tiny, [ids[0]], dict(num_predict=60, **GREEDY), constraint=lambda _: con(overlapping(2)))
    assert isinstance(got[0][1], Unsupported) and got[0][0] == [] and len(dec) == 0


def test_penalties_top_logprobs_stop_strings_and_num_predict_stay_exact(tiny):
    from mlxlite.engine import runner
    from tests.engine.test_runner import assert_top_matches

    ids = runner.tokenize(tiny, REPEAT)
    base = alone(tiny, ids, num_predict=60, **GREEDY)
    stop = text(*base)[20:23]
    cases = {"pen": dict(num_predict=60, repeat_penalty=1.2, repeat_last_n=16, **GREEDY),
             "stop": dict(num_predict=60, stop=[stop], **GREEDY),
             "odd": dict(num_predict=37, **GREEDY), "one": dict(num_predict=1, **GREEDY)}
    want = {k: alone(tiny, ids, **kw) for k, kw in cases.items()}
    dec = runner.decoder(tiny, 8)
    dec.speculator.gate = False
    for k, kw in cases.items():
        dec.add(k, ids, opts(**kw))
    dec.add("top", ids, opts(num_predict=40, **GREEDY), top_logprobs=4)
    got = drive(dec)
    assert dec.speculator.steps > 0
    for k in cases:
        assert_same(got[k], want[k])
    assert got["stop"][1].reason == "stop" and stop not in text(*got["stop"])
    assert len(got["odd"][0]) == 37 and len(got["one"][0]) == 1
    top_pieces = got["top"][0]
    assert len(top_pieces) == 40 and all(len(p.top) == 4 for p in top_pieces)
    assert_top_matches(tiny, ids, top_pieces, 4)


def test_seeded_sampling_keeps_the_plain_sampler(tiny):
    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, REPEAT)
    kw = dict(num_predict=40, temperature=0.9, seed=11)
    got, dec = run_batch(tiny, [ids], kw)
    assert dec.speculator.steps == 0
    assert tokens(got[0][0]) == tokens(alone(tiny, ids, **kw)[0])


def perturbed(loaded, scale: float):
    """A copy of `loaded` whose output head is noisier: a draft model that shares the
    vocabulary but often disagrees."""
    import copy

    import mlx.core as mx

    draft = copy.copy(loaded)
    draft.model = copy.deepcopy(loaded.model)
    emb = draft.model.model.embed_tokens     # tied: also the output head
    mx.random.seed(5)
    if hasattr(emb, "scales"):                # quantized: perturb its scales
        emb.scales = emb.scales * (1 + scale * mx.random.normal(emb.scales.shape))
    else:
        emb.weight = emb.weight * (1 + scale * mx.random.normal(emb.weight.shape))
    mx.eval(draft.model.parameters())
    return draft


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_a_draft_model_gives_plain_greedy_output(tiny, scale):
    from mlxlite.engine import runner

    draft = tiny if scale == 0 else perturbed(tiny, scale)
    ids = [runner.tokenize(tiny, p) for p in (REPEAT, PROMPTS[2], PROMPTS[7])]
    want = [alone(tiny, i, num_predict=50, **GREEDY) for i in ids]
    got, dec = run_batch(tiny, ids[:1], dict(num_predict=50, **GREEDY), draft=draft)
    assert_same(got[0], want[0])
    got, dec = run_batch(tiny, ids, dict(num_predict=50, **GREEDY), draft=draft)
    for k in range(3):
        assert_same(got[k], want[k])
    spec = dec.speculator
    assert spec.steps > 0
    if scale == 0:      # the model drafting for itself: every draft is kept
        assert spec.emitted >= 3 * spec.steps
    else:
        assert spec.emitted < 3 * 5 * spec.steps


def test_the_gate_speculates_where_the_expected_yield_beats_the_measured_cost(tiny):
    """With a width-5 speculative step modelled at 2.5 plain steps: a member keeping 90% of
    its drafts (expected 4.1 tokens a step) speculates, one keeping 20% (1.25) does not,
    except once every EXPLORE steps to measure again (and meanwhile plain steps may pipeline);
    plain cost first, then a first try."""
    from mlxlite.engine import runner
    from mlxlite.engine.speculative import Speculator

    spec = Speculator(tiny)
    seq = type("Seq", (), {})()
    seq.spec = spec.state(opts(**GREEDY))
    draft = [[1, 2, 3, 4]]
    assert not spec.pays([seq], draft, 5)                # no plain step timed yet: a plain step
    spec.plain[1] = 0.05
    assert spec.pays([seq], draft, 5)                    # no speculative step timed yet: try one
    spec.extra = 0.375                                   # width 5: 1 + 0.375 * 4 = 2.5 plain steps
    seq.spec.rate = 0.9
    assert spec.pays([seq], draft, 5)
    seq.spec.rate = 0.2
    decisions = [spec.pays([seq], draft, 5) for _ in range(2 * (Speculator.EXPLORE + 1))]
    assert decisions.count(True) == 2 and decisions[Speculator.EXPLORE] and decisions[-1]
    # While it declines, plain steps may pipeline (no speculation wanted) until it looks again.
    seq.n = 0
    assert not spec.pays([seq], draft, 5)
    wanted = [spec.wants([seq]) for _ in range(Speculator.EXPLORE)]
    assert wanted.count(True) == 1 and wanted[-1]
    seq.spec.rate = 0.5                                  # 1.5 tokens for 1.375 steps pays, 1.94 for 2.5 not
    assert spec.pays([seq], [[1]], 2) and not spec.pays([seq], draft, 5)
    # With the gate on, a batch decodes what plain decoding gives, whatever it decided.
    ids = [runner.tokenize(tiny, p) for p in (REPEAT, PROMPTS[0])]
    got, dec = run_batch(tiny, ids, dict(num_predict=60, **GREEDY), gate=True)
    for k, i in enumerate(ids):
        assert_same(got[k], alone(tiny, i, num_predict=60, **GREEDY))
    got, dec = run_batch(tiny, ids[:1], dict(num_predict=60, **GREEDY), gate=True)
    assert_same(got[0], alone(tiny, ids[0], num_predict=60, **GREEDY))
    assert dec.speculator.plain                          # alone, it timed its steps as it went
    # On a CPU (measured: BENCHMARKS.md) only a sequence alone speculates by default.
    spec.solo, spec._paying = True, True
    assert spec.wants([seq]) and not spec.wants([seq, seq])
    spec.gate = False
    assert spec.wants([seq, seq])


def test_sampled_speculation_honours_a_schema_with_lookup_and_draft_model_drafts(tiny):
    """Sampling (no seed) with a schema: every member's drafts are checked against the
    constraint, so each answer stays a valid prefix of the schema's documents (complete when
    it ended on EOS), with prompt-lookup drafts and with a disagreeing draft model."""
    import mlx.core as mx

    from mlxlite.constrain import tokens as constrain
    from mlxlite.engine import runner

    def con(_=None):
        return constrain.TokenConstraint(SCHEMA, runner.token_bytes(tiny), tiny.eos_token_ids)

    mx.random.seed(3)
    ids = [runner.tokenize(tiny, p) for p in (REPEAT, PROMPTS[3], PROMPTS[4])]
    for draft in (None, perturbed(tiny, 0.5)):
        got, dec = run_batch(tiny, ids, dict(num_predict=60, temperature=0.7), constraint=con,
                             **({"draft": draft} if draft is not None else {}))
        assert dec.speculator.steps > 0
        for pieces, finish in got.values():
            raw = b"".join(runner.token_bytes(tiny)[p.token] for p in pieces)
            state = constrain.recognize(SCHEMA, raw)
            assert state == "complete" if finish.reason == "stop" else state in ("prefix", "complete")
            assert all(math.isfinite(p.logprob) for p in pieces)


# ---- distribution: rejection sampling on a tiny vocabulary ----------------------------------
def first_tokens(p_target: list[float], draft: int, q: list[float] | None, trials: int) -> list[int]:
    """`trials` independent speculative draws of one token (the draft `draft`, or from q when
    given), each through the module's own rejection-sampling graph."""
    import mlx.core as mx

    from mlxlite.engine.speculative import SpecState, sample_graph

    st = SpecState(opts(temperature=1.0, top_p=1.0, top_k=0))
    logits = mx.log(mx.array([p_target] * (trials + 1)))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if q is None:
        drafts = [draft] * trials
    else:
        st.q = mx.log(mx.array([q] * trials))
        drafts = mx.random.categorical(st.q).tolist()
    keep, _, res, _, _, _ = (a.tolist() for a in sample_graph(st, logprobs, drafts))
    return [d if k else r for d, k, r in zip(drafts, keep, res, strict=True)]


def within(counts: list[int], p: list[float], trials: int) -> bool:
    """Every frequency within 5 standard errors of its probability (a false alarm is < 1e-5)."""
    return all(abs(c / trials - pi) <= 5 * math.sqrt(pi * (1 - pi) / trials) + 1e-9
               for c, pi in zip(counts, p, strict=True))


@pytest.mark.parametrize("q", [None, [0.1, 0.6, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
def test_rejection_sampling_keeps_the_target_distribution(q):
    import mlx.core as mx

    mx.random.seed(1234)
    p = [0.5, 0.05, 0.25, 0.15, 0.05]
    trials = 40_000
    for draft in ((1, 2) if q is None else (None,)):
        got = first_tokens(p, draft, q, trials)
        counts = [got.count(t) for t in range(len(p))]
        assert within(counts, p, trials), (draft, counts)
        # The check has power: accepting every draft (no rejection step) fails it.
        naive = [draft] * trials if q is None else mx.random.categorical(mx.log(mx.array([q] * trials))).tolist()
        assert not within([naive.count(t) for t in range(len(p))], p, trials)


# ---- the default model (SmolLM2-135M) -------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.slow
def test_default_model_speculative_greedy_is_plain(store, default_model):
    from mlxlite.constrain import tokens as constrain
    from mlxlite.engine import runner

    loaded = runner.load(store, store.resolve(default_model))
    try:
        chat = [{"role": "user", "content": "Repeat this line exactly, twice: the cat sat on the mat by the door."}]
        prompts = [runner.tokenize(loaded, loaded.template.render(chat, add_generation_prompt=True)),
                   runner.tokenize(loaded, "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
                                           "def mul(a, b):\n"),
                   runner.tokenize(loaded, "Once upon a time")]
        want = [alone(loaded, i, num_predict=40, **GREEDY) for i in prompts]
        got, dec = run_batch(loaded, prompts[:1], dict(num_predict=40, **GREEDY))
        assert_same(got[0], want[0], logprobs=False)
        got, dec = run_batch(loaded, prompts, dict(num_predict=40, **GREEDY))
        assert dec.speculator.steps > 0
        for k in range(3):
            assert_same(got[k], want[k], logprobs=False)

        def con(_=None):
            return constrain.TokenConstraint(SCHEMA, runner.token_bytes(loaded), loaded.eos_token_ids)

        items = list(runner.generate(loaded, prompts[0], opts(num_predict=40, **GREEDY), constraint=con()))
        got, dec = run_batch(loaded, [prompts[0], prompts[1]], dict(num_predict=40, **GREEDY), constraint=con)
        assert_same(got[0], (items[:-1], items[-1]), logprobs=False)
    finally:
        runner.unload(loaded)
