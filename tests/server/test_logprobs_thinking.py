"""Logprobs with their real alternatives, and thinking split out of the answer, on every API
through the official clients: the fake engine where the exact text matters, the tiny real
model for the numbers (top_logprobs against numpy's log-softmax of its logits) and for a
template that thinks."""

from __future__ import annotations

import itertools
import json
import threading
import urllib.request

import anthropic
import numpy as np
import ollama
import openai
import pytest

from mlxlite.server import openai as openai_routes
from mlxlite.server import responses
from tests.fake_engine import FakeEngine, RunningServer, add_fake_model

THOUGHT = "<think>plan</think>answer"
THINKING_TOKENS = len("<think>plan</think>")     # the fake: one token a byte
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def srv(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(THOUGHT, thinking=True), store) as s:
        yield s


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def runs(seq):
    """Consecutive repeats collapsed: the shape of an event stream whatever the chunking."""
    return [k for k, _ in itertools.groupby(seq)]


# ---- thinking, the fake engine: exact splits ----------------------------------------------
def test_native_chat_and_generate_put_the_thinking_in_its_own_field(srv):
    c = ollama.Client(host=srv.url)
    whole = c.chat("fake", HI)
    assert (whole.message.thinking, whole.message.content) == ("plan", "answer")
    parts = list(c.chat("fake", HI, stream=True))
    kinds = runs(["thinking" if p.message.thinking else "content" for p in parts if not p.done])
    assert kinds == ["thinking", "content"] and not any(p.message.thinking and p.message.content for p in parts)
    assert "".join(p.message.thinking or "" for p in parts) == "plan"
    assert "".join(p.message.content for p in parts) == "answer"
    gen = c.generate("fake", "hi")
    assert (gen.thinking, gen.response) == ("plan", "answer")
    streamed = list(c.generate("fake", "hi", stream=True))
    assert "".join(p.thinking or "" for p in streamed) == "plan" and "".join(p.response for p in streamed) == "answer"
    assert srv.engine.template.extras[-1] == {}         # think unset: the template's own default


def test_think_false_and_levels_reach_the_template_and_false_leaves_the_text_whole(srv):
    c = ollama.Client(host=srv.url)
    off = c.chat("fake", HI, think=False)
    assert off.message.content == THOUGHT and not off.message.thinking
    assert srv.engine.template.extras[-1] == {"enable_thinking": False}
    assert srv.engine.prompts[-1].endswith("<|assistant|><think>\n\n</think>\n\n")
    high = c.generate("fake", "hi", think="high")
    assert (high.thinking, high.response) == ("plan", "answer")
    assert srv.engine.template.extras[-1] == {"enable_thinking": True, "reasoning_effort": "high"}


def test_a_prompt_that_opens_the_section_starts_the_answer_inside_it(store):
    """DeepSeek-R1's template ends the prompt with `<think>`: the output has only the close."""
    add_fake_model(store)
    with RunningServer(FakeEngine("plan</think>answer", thinking=True, opens_thinking=True), store) as s:
        chat = ollama.Client(host=s.url).chat("fake", HI)
        assert (chat.message.thinking, chat.message.content) == ("plan", "answer")
        message = oai(s).chat.completions.create(model="fake", messages=HI).choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == ("plan", "answer")


def test_a_model_that_cannot_think_refuses_think_natively_and_ignores_it_elsewhere(store):
    add_fake_model(store)
    with RunningServer(FakeEngine("Hi."), store) as s:
        c = ollama.Client(host=s.url)
        for think in (True, "low"):
            with pytest.raises(ollama.ResponseError) as err:
                c.chat("fake", HI, think=think)
            assert err.value.status_code == 400 and err.value.error == '"fake:latest" does not support thinking'
        assert c.chat("fake", HI, think=False).message.content == "Hi."
        # OpenAI and Anthropic clients send these by default: a model that cannot think just answers.
        assert oai(s).chat.completions.create(model="fake", messages=HI, reasoning_effort="high") \
            .choices[0].message.content == "Hi."
        assert oai(s).responses.create(model="fake", input="hi", reasoning={"effort": "low"}).output_text == "Hi."
        msg = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0).messages.create(
            model="fake", max_tokens=50, messages=HI, thinking={"type": "enabled", "budget_tokens": 1024})
        assert [b.text for b in msg.content] == ["Hi."]
        assert s.engine.template.extras == [{}] * 4     # nothing reached a template that can't think


def test_openai_chat_puts_the_thinking_in_reasoning_content(srv):
    c = oai(srv)
    resp = c.chat.completions.create(model="fake", messages=HI)
    message = resp.choices[0].message
    assert message.content == "answer"
    assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"] == "plan"
    assert resp.usage.completion_tokens_details.reasoning_tokens == THINKING_TOKENS
    assert resp.usage.completion_tokens == len(THOUGHT)
    chunks = list(c.chat.completions.create(model="fake", messages=HI, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "plan"
    assert "".join(d.content or "" for d in deltas) == "answer"
    assert runs(["reasoning" if (d.model_extra or {}).get("reasoning_content") else "content"
                 for d in deltas if d.content or (d.model_extra or {}).get("reasoning_content")]) == \
        ["reasoning", "content"]
    off = c.chat.completions.create(model="fake", messages=HI, reasoning_effort="none").choices[0].message
    assert off.content == THOUGHT and "reasoning_content" not in (off.model_extra or {})
    assert srv.engine.template.extras[-1] == {"enable_thinking": False}
    # An earlier turn's reasoning goes back with that turn (as its `thinking`).
    turns = openai_routes._messages([*HI, {"role": "assistant", "content": "answer", "reasoning_content": "plan"}])
    assert turns[1]["thinking"] == "plan"


def test_responses_give_a_reasoning_item_with_its_summary_whole_and_streamed(srv):
    c = oai(srv)
    resp = c.responses.create(model="fake", input="hi")
    assert [o.type for o in resp.output] == ["reasoning", "message"]
    assert [s.text for s in resp.output[0].summary] == ["plan"] and resp.output_text == "answer"
    assert resp.usage.output_tokens_details.reasoning_tokens == THINKING_TOKENS
    with c.responses.stream(model="fake", input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert runs(e.type for e in events) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta") == "plan"
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1]
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == "plan" and final.output_text == "answer"
    off = c.responses.create(model="fake", input="hi", reasoning={"effort": "none"})
    assert [o.type for o in off.output] == ["message"] and off.output_text == THOUGHT


def test_a_reasoning_item_sent_back_is_the_thinking_of_the_turn_after_it():
    body = {"input": [{"role": "user", "content": "hi"},
                      {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "plan"}]},
                      {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
                      {"type": "reasoning", "id": "rs_2", "summary": [],
                       "content": [{"type": "reasoning_text", "text": "call it"}]},
                      {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "ok"}]}
    turns = responses._messages(body)
    assert [(t["role"], t.get("thinking")) for t in turns] == [
        ("user", None), ("assistant", "plan"), ("assistant", "call it"), ("tool", None)]


def test_anthropic_thinking_blocks_and_thinking_disabled(srv):
    c = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
    msg = c.messages.create(model="fake", max_tokens=100, messages=HI)
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in msg.content] == [
        ("thinking", "plan"), ("text", "answer")]
    with c.messages.stream(model="fake", max_tokens=100, messages=HI) as stream:
        kinds = runs(e.delta.type for e in stream if e.type == "content_block_delta")
    assert kinds == ["thinking_delta", "text_delta"]
    off = c.messages.create(model="fake", max_tokens=100, messages=HI, thinking={"type": "disabled"})
    assert [(b.type, b.text) for b in off.content] == [("text", THOUGHT)]
    assert srv.engine.template.extras[-1] == {"enable_thinking": False}


# ---- logprobs, the fake engine: one entry per token, every shape -----------------------------
def _alternatives(token: str, k: int) -> list[dict]:
    """What the fake gives: the chosen byte at -0.1, then the next byte values at -3, -4, ..."""
    return [{"token": chr(ord(token) + j), "logprob": -0.1 if j == 0 else -2.0 - j, "bytes": [ord(token) + j]}
            for j in range(k)]


def test_the_engine_is_told_whether_logprobs_are_read(srv):
    """Every API's job says whether the request reads logprobs, so the engine can skip
    computing them when it does not (their default, for the scheduler's other callers, is on)."""
    jobs = []
    submit = srv.scheduler.submit
    srv.scheduler.submit = lambda job: jobs.append(job) or submit(job)
    native = json.dumps({"model": "fake", "prompt": "hi", "stream": False}).encode()
    for body in (native, native.replace(b'"stream"', b'"logprobs": true, "stream"')):
        urllib.request.urlopen(urllib.request.Request(srv.url + "/api/generate", body)).read()
    oai(srv).chat.completions.create(model="fake", messages=HI)
    oai(srv).chat.completions.create(model="fake", messages=HI, logprobs=True)
    oai(srv).chat.completions.create(model="fake", messages=HI, top_logprobs=2, logprobs=True)
    anthropic.Anthropic(base_url=srv.url, api_key="unused").messages.create(model="fake", max_tokens=8, messages=HI)
    assert [j.logprobs for j in jobs] == [False, True, False, True, True, False]


def test_every_token_has_a_logprob_entry_even_when_its_text_is_held_back(srv):
    """Tag characters and thinking tokens: one entry each, so the entries spell the whole output."""
    body = {"model": "fake", "prompt": "hi", "stream": False, "logprobs": True, "top_logprobs": 3}
    req = urllib.request.Request(srv.url + "/api/generate", data=json.dumps(body).encode())
    out = json.loads(urllib.request.urlopen(req, timeout=30).read())
    assert "".join(e["token"] for e in out["logprobs"]) == THOUGHT and out["eval_count"] == len(THOUGHT)
    first = out["logprobs"][0]
    assert first == {"token": "<", "logprob": -0.1, "bytes": [60], "top_logprobs": _alternatives("<", 3)}
    streamed = list(ollama.Client(host=srv.url).chat("fake", HI, stream=True, logprobs=True))
    assert "".join(e.token for p in streamed for e in (p.logprobs or [])) == THOUGHT
    # A chunk carries the entries of the tokens whose text it is the first to show.
    assert all(p.logprobs for p in streamed if p.message.thinking or p.message.content)
    c = oai(srv)
    chat = c.chat.completions.create(model="fake", messages=HI, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == THOUGHT
    assert [t.model_dump() for t in content[-1].top_logprobs] == _alternatives("r", 2)
    chunks = list(c.chat.completions.create(model="fake", messages=HI, logprobs=True, stream=True))
    assert "".join(t.token for ch in chunks if ch.choices and ch.choices[0].logprobs
                   for t in ch.choices[0].logprobs.content) == THOUGHT
    resp = c.responses.create(model="fake", input="hi", include=["message.output_text.logprobs"], top_logprobs=1)
    (text,) = resp.output[1].content
    assert "".join(t.token for t in text.logprobs) == THOUGHT
    assert [t.model_dump() for t in text.logprobs[0].top_logprobs] == _alternatives("<", 1)
    with c.responses.stream(model="fake", input="hi", include=["message.output_text.logprobs"]) as stream:
        deltas = [e for e in stream if e.type == "response.output_text.delta"]
    assert "".join(t.token for e in deltas for t in e.logprobs) == THOUGHT     # thinking's ride on the text


# ---- the tiny real model ---------------------------------------------------------------------
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}{% endif %}")
GREEDY = {"temperature": 0, "num_predict": 6}


class Gathered:
    """The real runner, its decoders holding the first step until `n` sequences are in, so
    `n` concurrent requests decode as one batch (no timing involved)."""

    def __init__(self, n: int) -> None:
        from mlxlite.engine import runner

        self.runner, self.n = runner, n

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def decoder(self, *args, **kwargs):
        dec = self.runner.decoder(*args, **kwargs)
        step, started = dec.step, []

        def gathered(is_cancelled):
            if not started and len(dec) < self.n:
                return []
            started.append(True)
            return step(is_cancelled)

        dec.step = gathered
        return dec


@pytest.fixture
def reference(store, tiny_gguf_model):
    """The tiny model loaded in the test itself, for independent references."""
    from mlxlite.engine import runner

    loaded = runner.load(store, store.resolve(tiny_gguf_model))
    yield loaded
    runner.unload(loaded)


def greedy_reference(loaded, tokens: list[int], steps: int, k: int) -> list[tuple[str, list[tuple[str, float]]]]:
    """Greedy decoding by full forward passes (no KV cache): per step the chosen token and
    the k most likely, with numpy's log-softmax of the model's logits."""
    import mlx.core as mx

    from mlxlite.engine import runner

    seen, out = list(tokens), []
    for _ in range(steps):
        logits = np.array(loaded.model(mx.array(seen)[None])[0, -1].astype(mx.float32), dtype=np.float64)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        ids = [int(i) for i in np.argsort(-logprobs, kind="stable")[:k]]
        text = [runner.token_piece(loaded, i).decode("utf-8", "replace") for i in ids]
        out.append((text[0], [(t, float(logprobs[i])) for t, i in zip(text, ids, strict=True)]))
        seen.append(ids[0])
    return out


def assert_matches(entries, want) -> None:
    """Client logprob entries (token, logprob, top_logprobs) against `greedy_reference`."""
    assert len(entries) == len(want)
    for entry, (token, top) in zip(entries, want, strict=True):
        assert entry.token == token and entry.top_logprobs[0].token == token      # greedy: the top one
        assert [t.token for t in entry.top_logprobs] == [t for t, _ in top]
        assert max(abs(t.logprob - v) for t, (_, v) in zip(entry.top_logprobs, top, strict=True)) < 1e-4
        assert abs(entry.logprob - top[0][1]) < 1e-4


def _chat_tokens(loaded, content: str) -> list[int]:
    from mlxlite.engine import runner

    text = loaded.template.render([{"role": "user", "content": content}], add_generation_prompt=True)
    return runner.tokenize(loaded, text, add_special=False)


def test_top_logprobs_are_the_models_log_softmax_native_and_openai(store, tiny_gguf_model, reference):
    from mlxlite.engine import runner

    with RunningServer(None, store) as s:
        gen = ollama.Client(host=s.url).generate(tiny_gguf_model, "The quick brown", raw=True, options=GREEDY,
                                                 logprobs=True, top_logprobs=5)
        assert_matches(gen.logprobs, greedy_reference(reference, runner.tokenize(reference, "The quick brown"), 6, 5))
        msgs = [{"role": "user", "content": "What is the capital"}]
        chat = oai(s).chat.completions.create(model=tiny_gguf_model, messages=msgs, temperature=0, max_tokens=6,
                                               logprobs=True, top_logprobs=4)
        assert_matches(chat.choices[0].logprobs.content,
                       greedy_reference(reference, _chat_tokens(reference, msgs[0]["content"]), 6, 4))
        native = ollama.Client(host=s.url).chat(tiny_gguf_model, msgs, options=GREEDY, logprobs=True,
                                                top_logprobs=4)
        assert [e.token for e in native.logprobs] == [e.token for e in chat.choices[0].logprobs.content]


def test_top_logprobs_in_a_batch_are_each_requests_own(store, tiny_gguf_model, reference):
    """Three requests (OpenAI, native, OpenAI) asking for 2, 5 and 3 alternatives, decoded together."""
    prompts, tops = ["Hello world! Bonjour", "def main():", "Paris is the capital of"], (2, 5, 3)
    wants = [greedy_reference(reference, _chat_tokens(reference, p), 6, k) for p, k in zip(prompts, tops, strict=True)]
    got: dict[int, object] = {}
    with RunningServer(Gathered(len(prompts)), store) as s:
        def ask(i: int) -> None:
            msgs = [{"role": "user", "content": prompts[i]}]
            k = tops[i]
            if i == 1:
                got[i] = ollama.Client(host=s.url).chat(tiny_gguf_model, msgs, options=GREEDY, logprobs=True,
                                                        top_logprobs=k).logprobs
            else:
                got[i] = oai(s).chat.completions.create(
                    model=tiny_gguf_model, messages=msgs, temperature=0, max_tokens=6, logprobs=True,
                    top_logprobs=k).choices[0].logprobs.content
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        lines = s.logged("/api/chat", 1) + s.logged("/v1/chat/completions", 2)
    assert sorted(r["batch_size"] for r in lines) == [1, 2, 3]     # all three were in one batch
    for i, want in enumerate(wants):
        assert_matches(got[i], want)


def test_a_real_template_that_thinks(store, tiny_gguf_model, reference):
    """A chatml template that opens `<think>` unless `enable_thinking` is false: by default
    the tiny model's whole (random) answer is thinking; `think: false` makes it content."""
    from mlxlite.engine import runner

    with RunningServer(None, store) as s:
        c = ollama.Client(host=s.url)
        list(c.create(model="thinker", from_=tiny_gguf_model, template=THINKING_TEMPLATE, stream=True))
        assert "thinking" in c.show("thinker").capabilities
        assert "thinking" not in c.show(tiny_gguf_model).capabilities
        thinker = runner.load(store, store.resolve("thinker"))
        try:
            def answer(**extra) -> str:
                text = thinker.template.render(HI, add_generation_prompt=True, **extra)
                items = list(runner.generate(thinker, runner.tokenize(thinker, text, add_special=False),
                                             thinker.defaults.merged(GREEDY)))
                return "".join(p.text for p in items[:-1]) + items[-1].text_tail
            thought, plain = answer(), answer(enable_thinking=False)
        finally:
            runner.unload(thinker)
        assert "</think>" not in thought and thought.strip()
        chat = c.chat("thinker", HI, options=GREEDY)
        assert (chat.message.thinking, chat.message.content) == (thought.lstrip(), "")
        off = c.chat("thinker", HI, options=GREEDY, think=False)
        assert (off.message.thinking, off.message.content) == (None, plain)
        message = oai(s).chat.completions.create(model="thinker", messages=HI, temperature=0,
                                                  max_tokens=6).choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == (thought.lstrip(), "")
        with pytest.raises(ollama.ResponseError) as err:
            c.chat(tiny_gguf_model, HI, think=True)
        assert err.value.status_code == 400 and "does not support thinking" in err.value.error


# ---- /v1/completions: the legacy shape (tokens, token_logprobs, top_logprobs, text_offset) ------
def test_legacy_completions_logprobs_fake_engine(srv):
    c = oai(srv)
    done = c.completions.create(model="fake", prompt="hi", logprobs=2)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text == THOUGHT
    assert lp.token_logprobs == [-0.1] * len(THOUGHT)
    assert lp.top_logprobs[0] == {"<": -0.1, "=": -3.0}      # N alternatives (the sampled one among them)
    assert lp.text_offset == list(range(len(THOUGHT)))       # into the returned text: no echo
    chunks = list(c.completions.create(model="fake", prompt="hi", logprobs=0, stream=True))
    got = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert "".join(t for g in got for t in g.tokens) == THOUGHT
    assert [o for g in got for o in g.text_offset] == list(range(len(THOUGHT)))   # carried across chunks
    assert got[0].top_logprobs[0] == {"<": -0.1}              # logprobs 0: the sampled token alone
    plain = c.completions.create(model="fake", prompt="hi")
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        c.completions.create(model="fake", prompt="hi", logprobs=21)


def test_legacy_completions_logprobs_are_the_models_log_softmax(store, tiny_gguf_model, reference):
    from mlxlite.engine import runner

    with RunningServer(None, store) as s:
        done = oai(s).completions.create(model=tiny_gguf_model, prompt="The quick brown", temperature=0,
                                         max_tokens=6, logprobs=3)
    want = greedy_reference(reference, runner.tokenize(reference, "The quick brown"), 6, 3)
    lp = done.choices[0].logprobs
    assert lp.tokens == [token for token, _ in want]
    for got_top, got_lp, (_, top) in zip(lp.top_logprobs, lp.token_logprobs, want, strict=True):
        expected: dict[str, float] = {}
        for t, v in top:   # a dict: tokens that decode alike (partial UTF-8 -> U+FFFD) keep the likelier
            expected.setdefault(t, v)
        assert list(got_top) == list(expected)
        assert max(abs(got_top[t] - v) for t, v in expected.items()) < 1e-4 and abs(got_lp - top[0][1]) < 1e-4
    text, offsets = done.choices[0].text, lp.text_offset
    # Each token's offset is where its text starts in the returned text (a byte that is no
    # character on its own shows there as U+FFFD, as in the text itself).
    assert offsets[0] == 0 and sorted(offsets) == offsets
    assert all(text[o:].startswith(t) for o, t in zip(offsets, lp.tokens, strict=True))
