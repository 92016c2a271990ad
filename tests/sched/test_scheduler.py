"""The scheduler: one MLX thread, bounded queue, cancellation, residency (fake engine: exact)."""

import contextlib
import threading

import pytest

from mlxlite.errors import BadRequest, Busy, Cancelled, MlxliteError
from mlxlite.sched import (
    Done,
    Embedded,
    EmbedJob,
    GenerateJob,
    LoadJob,
    Ready,
    Scheduler,
    Tokenized,
    TokenizeJob,
    is_finish,
)
from mlxlite.server.prompt import PromptSpec
from tests.fake_engine import FakeEngine, add_fake_model, wait_for


def _job(entry, text="hi", **kw):
    return GenerateJob(entry, PromptSpec(entry.name.display, prompt=text), **kw)


def _text(ticket):
    events = list(ticket.events())
    assert isinstance(events[0], Ready)
    assert is_finish(events[-1])
    return "".join(e.text for e in events[1:-1]) + events[-1].text_tail, events[-1]


@contextlib.contextmanager
def _one_running(store, **kw):
    """A scheduler over a fake engine whose first job is running, held after its first token
    until `engine.resume` is set: (scheduler, engine, model entry, that job's ticket)."""
    engine = FakeEngine(hold_after=1)
    s = Scheduler(store, engine, keep_alive=300, **kw)
    entry = add_fake_model(store)
    try:
        running = s.submit(_job(entry))
        wait_for(lambda: engine.active == 1, what="first job running")
        yield s, engine, entry, running
    finally:
        s.close()


@pytest.fixture
def sched(store):
    s = Scheduler(store, FakeEngine(), max_queue=4, keep_alive=300, max_loaded_models=2)
    yield s
    s.close()


def test_every_engine_call_happens_on_the_one_mlx_thread(store, sched):
    entry = add_fake_model(store)
    text, finish = _text(sched.submit(_job(entry)))
    assert text == sched.engine.reply and finish.reason == "stop"
    list(sched.submit(EmbedJob(entry, ("a", "b"))).events())
    assert sched.engine.threads == {"mlxlite-mlx"}


def test_options_layer_over_model_defaults_and_num_predict_limits(store, sched):
    entry = add_fake_model(store)
    text, finish = _text(sched.submit(_job(entry, options={"num_predict": 5, "temperature": 0.0})))
    assert text == sched.engine.reply[:5] and finish.reason == "length" and finish.eval_tokens == 5
    assert sched.engine.options[-1].temperature == 0.0


def test_a_full_queue_answers_busy_at_once(store):
    with _one_running(store, max_queue=2) as (s, engine, entry, running):
        queued = [s.submit(_job(entry)) for _ in range(2)]
        assert s.depth() == 2
        with pytest.raises(Busy, match="maximum pending requests"):
            s.submit(_job(entry))
        engine.resume.set()
        for t in [running, *queued]:
            assert _text(t)[1].reason == "stop"
        assert s.depth() == 0


def test_a_cancelled_queued_job_is_dropped_without_running(store):
    with _one_running(store, max_queue=8) as (s, engine, entry, running):
        dropped = s.submit(_job(entry, "never"))
        dropped.cancel()
        engine.resume.set()
        _text(running)
        with pytest.raises(Cancelled):
            list(dropped.events())
        assert engine.started == 1 and "never" not in "".join(engine.prompts)
        assert s.counters["cancelled_in_queue"] == 1


def test_cancel_stops_a_running_generation_within_a_step(store):
    engine = FakeEngine(reply="x" * 10000, step_delay=0.001)
    s = Scheduler(store, engine, keep_alive=300)
    entry = add_fake_model(store)
    try:
        ticket = s.submit(_job(entry))
        events = ticket.events()
        assert isinstance(next(events), Ready)
        next(events)
        ticket.cancel()
        rest = list(events)
        assert is_finish(rest[-1]) and rest[-1].reason == "cancel"
        assert rest[-1].eval_tokens < 10000
        wait_for(lambda: engine.active == 0, what="generation to stop")
    finally:
        s.close()


def test_client_gone_cancels_while_waiting(store):
    from mlxlite.sched import ClientGone

    engine = FakeEngine(prefill_delay=30.0, prefill_chunks=3000)
    s = Scheduler(store, engine, keep_alive=300)
    entry = add_fake_model(store)
    try:
        ticket = s.submit(_job(entry))
        gone = threading.Event()
        wait_for(lambda: engine.in_prefill == 1, what="prefill to start")
        gone.set()
        with pytest.raises(ClientGone):
            list(ticket.events(gone=gone.is_set))
        wait_for(lambda: engine.active == 0, what="prefill to stop")
        assert engine.finished == ["cancel"]
    finally:
        s.close()


def test_engine_errors_reach_the_caller_and_the_thread_survives(store, sched):
    entry = add_fake_model(store)
    sched.engine.fail_after = 2
    with pytest.raises(MlxliteError, match="failed on purpose"):
        list(sched.submit(_job(entry)).events())
    sched.engine.fail_after = None
    # A prompt longer than the context is the runner's BadRequest, before any piece.
    with pytest.raises(BadRequest, match="longer than the context"):
        list(sched.submit(_job(entry, "y" * 5000)).events())
    assert _text(sched.submit(_job(entry)))[1].reason == "stop"


def test_a_generation_that_fails_fails_alone_and_the_next_in_line_still_runs(store):
    """One sequence at a time (an engine without a batch decoder, as vision models run): the
    request whose generation raises gets its error; the one queued behind it still runs."""
    with _one_running(store, max_queue=8) as (s, engine, entry, running):
        failing = s.submit(_job(entry, "y" * 5000))     # longer than the context: its generation raises
        after = s.submit(_job(entry))
        engine.resume.set()
        assert _text(running)[1].reason == "stop"
        with pytest.raises(BadRequest, match="longer than the context"):
            list(failing.events())
        assert _text(after)[1].reason == "stop"


def test_keep_alive_zero_unloads_after_the_request(store, sched):
    entry = add_fake_model(store)
    _text(sched.submit(_job(entry, keep_alive=0)))
    wait_for(lambda: sched.ps() == [], what="unload")
    assert sched.engine.unloads == ["fake:latest"]


def test_keep_alive_expiry_unloads_an_idle_model(store, sched):
    entry = add_fake_model(store)
    _text(sched.submit(_job(entry, keep_alive=0.05)))
    wait_for(lambda: sched.engine.unloads == ["fake:latest"], what="expiry")
    assert sched.ps() == []


def test_negative_keep_alive_keeps_forever_and_load_job_reports(store, sched):
    entry = add_fake_model(store)
    events = list(sched.submit(LoadJob(entry, -1)).events())
    assert isinstance(events[-1], Done) and events[-1].reason == "load"
    (info,) = sched.ps()
    assert info.expires_at is None and info.name == "fake:latest" and info.size == 1234
    events = list(sched.submit(LoadJob(entry, 0)).events())
    assert events[-1].reason == "unload" and sched.ps() == []


def test_least_recently_used_model_is_evicted_at_the_limit(store, sched):
    a, b, c = (add_fake_model(store, n) for n in ("a", "b", "c"))
    for entry in (a, b, a, c):
        _text(sched.submit(_job(entry)))
    # Limit 2: loading c evicts b (a was used more recently).
    assert sched.engine.unloads == ["b:latest"]
    assert sorted(r.name for r in sched.ps()) == ["a:latest", "c:latest"]


def test_embeddings_come_back_normalized_with_counts(store, sched):
    entry = add_fake_model(store)
    (event,) = list(sched.submit(EmbedJob(entry, ("hello", "world"))).events())
    assert isinstance(event, Embedded) and len(event.vectors) == 2
    assert event.prompt_tokens == len("hello") + len("world") + 2
    assert abs(sum(v * v for v in event.vectors[0]) - 1.0) < 1e-9


def test_tokenize_renders_the_prompt_like_generate_and_generates_nothing(store, sched):
    entry = add_fake_model(store)
    spec = PromptSpec(entry.name.display, messages=({"role": "user", "content": "hi"},), system="S")
    (event,) = list(sched.submit(TokenizeJob(entry, spec)).events())
    assert isinstance(event, Tokenized) and sched.engine.started == 0
    assert bytes(event.tokens).decode() == "<|system|>S\n<|user|>hi\n<|assistant|>"
    events = list(sched.submit(GenerateJob(entry, spec)).events())
    assert list(events[0].prompt_tokens) == list(event.tokens)          # the same prompt a generation sees
    assert sched.ps()[0].name == "fake:latest"                          # loaded, and kept for its keep-alive


def test_close_refuses_new_work(store):
    s = Scheduler(store, FakeEngine(), keep_alive=300)
    entry = add_fake_model(store)
    _text(s.submit(_job(entry)))
    s.close()
    with pytest.raises(Busy):
        s.submit(_job(entry))
    assert s.engine.unloads == ["fake:latest"]


class _EndingEngine(FakeEngine):
    """A fake engine that says which thread unloads and ends, in what order."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.calls: list[tuple[str, str]] = []

    def unload(self, loaded) -> None:
        super().unload(loaded)
        self.calls.append(("unload", threading.current_thread().name))

    def end_thread(self) -> None:
        self.calls.append(("end_thread", threading.current_thread().name))


def test_close_unloads_every_model_then_ends_the_mlx_thread_with_end_thread(store):
    """MLX's per-thread streams must be freed by the MLX thread itself, last, after the models
    are unloaded (their prefix caches saved): freed at thread exit, they raced the
    interpreter's exit and `serve` died of SIGABRT after a clean SIGTERM."""
    engine = _EndingEngine()
    s = Scheduler(store, engine, keep_alive=300)
    _text(s.submit(_job(add_fake_model(store))))
    assert s.close() is True
    assert engine.calls == [("unload", "mlxlite-mlx"), ("end_thread", "mlxlite-mlx")]


def test_close_cancels_a_generation_in_flight_so_the_thread_stops(store):
    """A prefill that would run for ~1000 s is cancelled between chunks at shutdown, instead
    of outliving the join (the interpreter would then exit under a thread inside MLX)."""
    engine = _EndingEngine(prefill_delay=1000.0, prefill_chunks=10_000)
    s = Scheduler(store, engine, keep_alive=300)
    ticket = s.submit(_job(add_fake_model(store)))
    wait_for(lambda: engine.in_prefill == 1, what="the prefill to start")
    assert s.close(timeout=60) is True
    assert engine.finished == ["cancel"] and engine.calls[-1] == ("end_thread", "mlxlite-mlx")
    assert ticket.cancelled


def test_without_a_set_budget_the_engine_sizes_it_for_its_device(store, monkeypatch):
    """On a GPU the budget is the device's memory, which only the engine knows (asked on the
    MLX thread): here an engine whose device holds 100 bytes refuses a larger model."""
    monkeypatch.delenv("MLXLITE_MEMORY_BUDGET_BYTES", raising=False)

    class SmallDevice(FakeEngine):
        def memory_budget(self) -> int:
            return 100

    s = Scheduler(store, SmallDevice(), keep_alive=300)
    try:
        entry = add_fake_model(store)
        assert entry.size > 100
        with pytest.raises(MlxliteError, match="more than the memory budget of 100 bytes"):
            list(s.submit(_job(entry)).events())
    finally:
        s.close()
