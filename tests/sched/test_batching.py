"""Issue 5 through the real server and the real runner on tiny MLX models: concurrent streams
batch and match their solo output, a cancelled member leaves, the queue bound answers 503,
keep-alive and LRU residency with two models, the second chat turn computes only new tokens,
/metrics shows batching and prefix-cache figures."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time

from mlxlite.sched import Scheduler
from tests.fake_engine import RunningServer, wait_for

PROMPTS = ["The quick brown fox", "Hello world! Bonjour", "def main():", "What is the capital",
           "emoji and symbols", "class Foo:", "Paris is the capital of", "naïve façade. Grüße"]
GREEDY = {"temperature": 0, "num_predict": 60}


def post(srv, path: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def stream(srv, body: dict, *, stop_after: int | None = None, started: threading.Event | None = None
           ) -> tuple[str, dict | None]:
    """Stream /api/generate; returns (text, final chunk). `stop_after` lines: hang up then."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
    conn.request("POST", "/api/generate", json.dumps({**body, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200
    text, final, n = [], None, 0
    for line in resp:
        chunk = json.loads(line)
        n += 1
        if started is not None:
            started.set()
        if chunk.get("done") or "error" in chunk:     # the last line, or the error line that ends it
            final = chunk
            break
        text.append(chunk["response"])
        if stop_after is not None and n >= stop_after:
            conn.sock.shutdown(2)
            break
    conn.close()
    return "".join(text), final


def metric(srv, name: str) -> float:
    text = srv.scheduler.metrics.render()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Slow:
    """The real runner with a pause after every decoder step, so a test can see a request
    still running (timing-free assertions: the pause only widens windows). With `gather`
    set, its decoder takes no step until that many sequences were added (then steps
    freely), so concurrent requests surely share one batch."""

    def __init__(self, delay: float = 0.02) -> None:
        from mlxlite.engine import runner

        self.runner, self.delay, self.gather = runner, delay, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def decoder(self, *args, **kwargs):
        dec = self.runner.decoder(*args, **kwargs)
        step = dec.step

        def slow_step(is_cancelled):
            if len(dec) < self.gather:
                return []
            self.gather = 0
            out = step(is_cancelled)
            time.sleep(self.delay)
            return out

        dec.step = slow_step
        return dec


def test_eight_concurrent_streams_match_their_solo_output(store, tiny_gguf_model):
    with RunningServer(None, store) as srv:
        bodies = [{"model": tiny_gguf_model, "prompt": p, "options": GREEDY} for p in PROMPTS]
        alone = [stream(srv, b) for b in bodies]
        assert all(final["eval_count"] > 0 for _, final in alone)
        results: list = [None] * len(bodies)
        gate = threading.Barrier(len(bodies))

        def client(i):
            gate.wait()
            results[i] = stream(srv, bodies[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for (text, final), (want, want_final) in zip(results, alone, strict=True):
            assert text == want
            assert final["eval_count"] == want_final["eval_count"]
            assert final["done_reason"] == want_final["done_reason"]
        # They really shared steps: some engine steps decoded more than one sequence.
        assert metric(srv, "mlxlite_batch_size_count") > metric(srv, 'mlxlite_batch_size_bucket{le="1"}')


def test_a_cancelled_member_leaves_and_the_others_finish(store, tiny_gguf_model):
    sched = Scheduler(store, Slow(0.01), keep_alive=300, num_parallel=8)
    with RunningServer(None, store, scheduler=sched) as srv:
        body = {"model": tiny_gguf_model, "options": {"temperature": 0, "num_predict": 40}}
        want = [stream(srv, {**body, "prompt": p}) for p in PROMPTS[:3]]
        results: list = [None] * 3
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, stream(srv, {**body, "prompt": PROMPTS[i]}))) for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: sched.batches.active() == 3, 60, "three members decoding")
        cut, _ = stream(srv, {**body, "prompt": PROMPTS[3], "options": {"temperature": 0, "num_predict": 200}},
                        stop_after=3)
        for t in threads:
            t.join(120)
        assert [r[0] for r in results] == [w[0] for w in want]
        wait_for(lambda: not sched.busy(), 30, "the batch to drain")
        wait_for(lambda: any(r.get("done_reason") == "cancel" or r.get("status") == 499
                             for r in srv.log_lines()), 10, "the cancelled request's log line")
        assert metric(srv, "mlxlite_active_sequences") == 0


def test_a_request_whose_schema_grows_too_ambiguous_fails_alone_and_its_batch_goes_on(store, tiny_gguf_model):
    """Three requests share one batch; one's JSON schema passes the recognizer's bound
    partway through its output: its client gets the 400, the other two stream exactly
    what they stream alone."""
    from tests.engine.test_batch import overlapping

    engine = Slow(0)
    with RunningServer(engine, store) as srv:
        plain = [{"model": tiny_gguf_model, "prompt": p, "options": GREEDY} for p in PROMPTS[:2]]
        alone = [stream(srv, b) for b in plain]
        assert all(final["eval_count"] > 20 for _, final in alone)    # still decoding when the bad one fails
        bad = {"model": tiny_gguf_model, "prompt": PROMPTS[3], "format": overlapping(13), "stream": False,
               "options": GREEDY}
        engine.gather = 3
        results: list = [None] * 3
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(srv, plain[i])))
                   for i in range(2)]
        threads.append(threading.Thread(target=lambda: results.__setitem__(2, post(srv, "/api/generate", bad))))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        status, body = results[2]
        assert status == 400 and "too ambiguous" in body["error"]
        for (text, final), (want, want_final) in zip(results[:2], alone, strict=True):
            assert "error" not in final and text == want
            assert (final["eval_count"], final["done_reason"]) == (want_final["eval_count"], want_final["done_reason"])
        assert engine.gather == 0 and metric(srv, "mlxlite_active_sequences") == 0


def test_a_full_queue_answers_503_at_once(store, tiny_gguf_model):
    sched = Scheduler(store, Slow(0.02), keep_alive=300, num_parallel=1, max_queue=1)
    with RunningServer(None, store, scheduler=sched) as srv:
        body = {"model": tiny_gguf_model, "prompt": "hi", "options": {"temperature": 0, "num_predict": 200}}
        started = threading.Event()
        first = threading.Thread(target=lambda: stream(srv, body, stop_after=5, started=started))
        first.start()
        started.wait(60)
        second = threading.Thread(target=lambda: stream(srv, body, stop_after=2))
        second.start()
        wait_for(lambda: sched.depth() == 1, 30, "the second request waiting")
        t0 = time.monotonic()
        status, err = post(srv, "/api/generate", {**body, "stream": False})
        assert status == 503 and "maximum pending requests" in err["error"]
        assert time.monotonic() - t0 < 30          # at once, not after the others (generous for CI)
        first.join(60)
        second.join(60)
        wait_for(lambda: not sched.busy() and sched.depth() == 0, 30, "idle")


def test_second_chat_turn_computes_only_the_new_tokens(store, tiny_gguf_model):
    with RunningServer(None, store) as srv:
        opts = {"temperature": 0, "num_predict": 12}
        status, one = post(srv, "/api/generate", {"model": tiny_gguf_model, "prompt": "The quick brown fox",
                                                  "options": opts, "stream": False})
        assert status == 200 and "prompt_cached_count" not in one
        context = one["context"]
        status, two = post(srv, "/api/generate", {"model": tiny_gguf_model, "prompt": " jumps over",
                                                  "context": context, "options": opts, "stream": False})
        assert status == 200
        # The cache holds turn one's prompt and every token but the last one generated (never
        # fed back); turn two computes the rest: that last token plus its own prompt.
        assert two["prompt_cached_count"] == len(context) - 1
        prompt_two = len(two["context"]) - two["eval_count"]      # context = prompt + output
        # prompt_eval_count is the whole prompt (as Ollama reports it), cached part included.
        assert two["prompt_eval_count"] == prompt_two and one["prompt_eval_count"] == len(context) - one["eval_count"]
        (line,) = [r for r in srv.logged("/api/generate", 2) if r["prompt_tokens"] == prompt_two]
        assert line["prompt_eval_tokens"] == prompt_two - (len(context) - 1)
        # A chat: turn two resends the history; its rendered prefix comes from the cache.
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        status, c1 = post(srv, "/api/chat", {"model": tiny_gguf_model, "messages": messages,
                                             "options": opts, "stream": False})
        messages += [c1["message"], {"role": "user", "content": "And of Germany?"}]
        status, c2 = post(srv, "/api/chat", {"model": tiny_gguf_model, "messages": messages,
                                             "options": opts, "stream": False})
        assert c2["prompt_cached_count"] >= c1["prompt_eval_count"]
        # OpenAI usage reports the same cached tokens.
        status, o = post(srv, "/v1/chat/completions", {"model": tiny_gguf_model, "messages": messages,
                                                       "max_tokens": 4, "temperature": 0})
        assert o["usage"]["prompt_tokens_details"]["cached_tokens"] >= c1["prompt_eval_count"]
        assert metric(srv, "mlxlite_prefix_cache_hits_total") >= 3
        assert metric(srv, "mlxlite_prefix_cache_tokens_saved_total") > 0
        assert metric(srv, "mlxlite_prefix_cache_bytes") > 0


def test_keep_alive_expiry_and_lru_eviction_with_two_models(store, tiny_gguf_model, tiny_safetensors_model):
    sched = Scheduler(store, Slow(0.01), keep_alive=300, max_loaded_models=1)
    with RunningServer(None, store, scheduler=sched) as srv:
        body = {"prompt": "hi", "options": {"temperature": 0, "num_predict": 3}, "stream": False}
        assert post(srv, "/api/generate", {**body, "model": tiny_gguf_model, "keep_alive": -1})[0] == 200
        assert [r.name for r in sched.ps()] == ["tiny-gguf:latest"]
        # Limit 1: the second model evicts the idle first one.
        assert post(srv, "/api/generate", {**body, "model": tiny_safetensors_model})[0] == 200
        assert [r.name for r in sched.ps()] == ["tiny-st:latest"]
        ps = json.loads(srv_get(srv, "/api/ps"))["models"]
        assert ps[0]["name"] == "tiny-st:latest" and ps[0]["size"] > 0 and ps[0]["context_length"] > 0
        assert ps[0]["expires_at"].startswith(time.strftime("%Y"))
        # A busy model is never evicted: the other model's request waits for it, then runs.
        started = threading.Event()
        long = threading.Thread(target=lambda: stream(
            srv, {"model": tiny_safetensors_model, "prompt": "hi", "options": {"temperature": 0, "num_predict": 60}},
            started=started))
        long.start()
        started.wait(60)
        status, other = post(srv, "/api/generate", {**body, "model": tiny_gguf_model, "keep_alive": 0.2})
        assert status == 200 and other["eval_count"] > 0
        long.join(60)
        # keep_alive 0.2 s: it expires and unloads on its own.
        wait_for(lambda: sched.ps() == [], 30, "keep-alive expiry")
        assert sched.counters["unloads"] >= 2


def srv_get(srv, path: str) -> str:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("GET", path)
    data = conn.getresponse().read().decode()
    conn.close()
    return data


def test_memory_budget_refuses_a_model_that_cannot_fit(store, tiny_gguf_model):
    sched = Scheduler(store, None, keep_alive=300, memory_budget=1000)
    with RunningServer(None, store, scheduler=sched) as srv:
        status, err = post(srv, "/api/generate", {"model": tiny_gguf_model, "prompt": "hi", "stream": False})
        assert status == 503 and "memory budget" in err["error"] and sched.ps() == []
        assert srv.scheduler.counters["loads"] == 0


def test_metrics_page_has_the_batching_figures(store, tiny_gguf_model):
    with RunningServer(None, store) as srv:
        post(srv, "/api/generate", {"model": tiny_gguf_model, "prompt": "hi", "stream": False,
                                    "options": {"num_predict": 5, "temperature": 0}})
        text = srv_get(srv, "/metrics")
        for name in ("mlxlite_requests_total", "mlxlite_queue_depth", "mlxlite_batch_size_bucket",
                     'mlxlite_prompt_tokens_total{kind="computed"}', "mlxlite_eval_tokens_total",
                     "mlxlite_eval_tokens_per_second", "mlxlite_prefix_cache_hits_total",
                     "mlxlite_prefix_cache_tokens_saved_total", "mlxlite_loaded_models 1", "mlxlite_loaded_bytes"):
            assert name in text, name
        (line,) = [r for r in srv.log_lines() if r.get("path") == "/api/generate"]
        assert {"queue_ms", "cached_tokens", "eval_tps", "prompt_eval_tokens", "batch_size"} <= set(line)
        assert line["batch_size"] == 1


def test_prefix_cache_survives_a_restart(store, tiny_gguf_model):
    body = {"model": tiny_gguf_model, "prompt": "The quick brown fox jumps", "stream": False,
            "options": {"temperature": 0, "num_predict": 6}}
    with RunningServer(None, store) as srv:
        status, one = post(srv, "/api/generate", body)
        assert status == 200 and "prompt_cached_count" not in one
    # Closing the server unloaded the model, which wrote its prefix caches to disk.
    with RunningServer(None, store) as srv:
        status, two = post(srv, "/api/generate", {**body, "context": one["context"], "prompt": " over"})
        assert status == 200 and two["prompt_cached_count"] == len(one["context"]) - 1


def test_stop_on_a_busy_model_unloads_it_once_its_batch_drains(store, tiny_gguf_model):
    sched = Scheduler(store, Slow(0.01), keep_alive=300)
    with RunningServer(None, store, scheduler=sched) as srv:
        started = threading.Event()
        result: list = []
        body = {"model": tiny_gguf_model, "prompt": "hi", "options": {"temperature": 0, "num_predict": 40}}
        t = threading.Thread(target=lambda: result.append(stream(srv, body, started=started)))
        t.start()
        started.wait(60)
        status, out = post(srv, "/api/generate", {"model": tiny_gguf_model, "keep_alive": 0, "stream": False})
        assert status == 200 and out["done_reason"] == "unload"
        assert [r.name for r in sched.ps()] == ["tiny-gguf:latest"]     # still serving its stream
        t.join(60)
        assert result[0][1]["done"] and result[0][1]["eval_count"] == 40
        wait_for(lambda: sched.ps() == [], 30, "the unload after the stream")
