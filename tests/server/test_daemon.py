"""The daemon over real sockets (urllib/http.client) with the fake engine: routes, streaming
as generated, errors before and after the first byte, cancellation, security, logs."""

import http.client
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fake_engine import FakeEngine, RunningServer, add_fake_model, wait_for


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def srv(store, engine):
    add_fake_model(store)
    with RunningServer(engine, store) as s:
        yield s


def call(srv, method, path, body=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(srv.url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            payload = resp.read()
            status, ctype = resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        payload, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    if "json" in ctype and payload:
        if "ndjson" in ctype:
            return status, [json.loads(line) for line in payload.splitlines() if line.strip()]
        return status, json.loads(payload)
    return status, payload.decode()


def test_store_routes_without_loading_a_model(srv):
    assert call(srv, "GET", "/") == (200, "mlxlite is running")
    assert call(srv, "GET", "/api/version")[1]["version"]
    status, tags = call(srv, "GET", "/api/tags")
    (model,) = tags["models"]
    assert model["name"] == "fake:latest" and len(model["digest"]) == 64
    assert model["details"]["format"] == "gguf" and model["size"] > 0
    status, show = call(srv, "POST", "/api/show", {"model": "fake"})
    assert status == 200 and show["details"]["family"] == "fake" and "completion" in show["capabilities"]
    assert call(srv, "POST", "/api/copy", {"source": "fake", "destination": "other:v2"}) == (200, "")
    assert [m["name"] for m in call(srv, "GET", "/api/tags")[1]["models"]] == ["other:v2", "fake:latest"]
    assert call(srv, "DELETE", "/api/delete", {"model": "other:v2"}) == (200, "")
    assert call(srv, "DELETE", "/api/delete", {"model": "other:v2"})[0] == 404
    assert call(srv, "POST", "/api/copy", {"source": "missing", "destination": "x"})[0] == 404
    assert srv.engine.loads == []
    assert call(srv, "GET", "/api/ps") == (200, {"models": []})


def test_a_gguf_nothing_can_run_lists_no_capabilities_and_says_why(store, tiny_gguf_path, tiny_gguf_bad_arch,
                                                                   tmp_path, run_cli):
    """An architecture with no map, or a tensor type nothing loads: /api/tags and /api/show
    list no capability and say why in `details` (Ollama's client still parses both), as
    `show` (CLI) says `runs on: nothing: ...`; a model that runs keeps its capabilities."""
    import ollama

    from mlxlite.store.importers import import_path

    raw = bytearray(tiny_gguf_path.read_bytes())
    at = raw.index(b"blk.0.ffn_up.weight\x02\x00\x00\x00") + len("blk.0.ffn_up.weight") + 4 + 2 * 8
    assert raw[at:at + 4] == (2).to_bytes(4, "little")     # Q4_0: retyped IQ2_XXS, which nothing loads
    raw[at:at + 4] = (16).to_bytes(4, "little")
    (tmp_path / "iq2.gguf").write_bytes(bytes(raw))
    import_path(store, tmp_path / "iq2.gguf", "iq2")
    import_path(store, tiny_gguf_bad_arch, "mamba")
    import_path(store, tiny_gguf_path, "runs")
    why = {"mamba:latest": "GGUF architecture 'mamba' is not supported",
           "iq2:latest": "GGUF tensor type IQ2_XXS (tensor 'blk.0.ffn_up.weight') is not supported"}
    with RunningServer(FakeEngine(), store) as server:
        models = {m["name"]: m for m in call(server, "GET", "/api/tags")[1]["models"]}
        assert "completion" in models["runs:latest"]["capabilities"]
        assert "unsupported" not in models["runs:latest"]["details"]
        for name, reason in why.items():
            assert models[name]["capabilities"] == [] and models[name]["details"]["unsupported"].startswith(reason)
            status, shown = call(server, "POST", "/api/show", {"model": name})
            assert status == 200 and shown["capabilities"] == [] and shown["details"]["unsupported"].startswith(reason)
            code, out, _ = run_cli("show", name, "--json")
            cli = json.loads(out)
            assert code == 0 and cli["capabilities"] == [] and cli["runs_on"] == f"nothing: {shown['details']['unsupported']}"
        client = ollama.Client(host=server.url)
        assert client.show("mamba").capabilities == [] and "completion" in client.show("runs").capabilities
        assert {m.model for m in client.list().models} == {"mamba:latest", "iq2:latest", "runs:latest"}


def test_generate_and_chat_streaming_and_not(srv):
    status, whole = call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "hi", "stream": False})
    assert status == 200 and whole["response"] == srv.engine.reply and whole["done"] is True
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration", "context"):
        assert isinstance(whole[key], (int, list)), key
    assert whole["done_reason"] == "stop" and whole["eval_count"] == len(srv.engine.reply)
    status, lines = call(srv, "POST", "/api/chat", {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                                    "options": {"num_predict": 4}})
    assert status == 200 and [line["done"] for line in lines] == [False] * 4 + [True]
    assert "".join(line["message"]["content"] for line in lines) == srv.engine.reply[:4]
    assert lines[-1]["done_reason"] == "length"
    assert "<|user|>hi" in srv.engine.prompts[-1]


def test_system_template_raw_and_context_shape_the_prompt(srv):
    call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "q", "system": "S", "stream": False})
    assert srv.engine.prompts[-1].startswith("<|system|>S\n<|user|>q")
    call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "q", "system": "S", "stream": False,
                                        "template": "{{ if .System }}[{{ .System }}]{{ end }}{{ .Prompt }}!"})
    assert srv.engine.prompts[-1] == "[S]q!"
    _, first = call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "abc", "raw": True, "stream": False})
    assert srv.engine.prompts[-1] == "abc" and "context" not in first
    _, whole = call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "q", "stream": False,
                                                   "options": {"num_predict": 2}})
    call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "next", "context": whole["context"],
                                        "stream": False})
    assert srv.engine.prompts[-1].startswith("<|user|>q\n<|assistant|>He<|user|>next")


def _stream_first_line(srv, path, body):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return conn, resp


@pytest.mark.parametrize("path,body,sse", [
    ("/api/chat", {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}, False),
    ("/api/generate", {"model": "fake", "prompt": "hi"}, False),
    ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}, True),
    ("/v1/completions", {"model": "fake", "prompt": "hi", "stream": True}, True),
])
def test_lines_arrive_as_generated_not_at_the_end(store, path, body, sse):
    engine = FakeEngine(hold_after=3)
    add_fake_model(store)
    with RunningServer(engine, store) as srv:
        conn, resp = _stream_first_line(srv, path, body)
        assert resp.status == 200
        assert resp.getheader("Content-Type") == ("text/event-stream" if sse else "application/x-ndjson")
        first = resp.readline()
        # Generation is parked after 3 tokens: the line came while it was still running.
        assert engine.active == 1 and engine.finished == []
        payload = json.loads(first[len(b"data: "):] if sse else first)
        assert payload["object" if sse else "model"]
        engine.resume.set()
        rest = resp.read().decode()
        assert ("data: [DONE]" in rest) if sse else ('"done":true' in rest)
        conn.close()


def test_an_error_after_the_first_byte_is_a_final_error_line(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(fail_after=3), store) as srv:
        status, lines = call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "hi"})
        assert status == 200 and lines[-1] == {"error": "the fake engine failed on purpose"}
        assert len(lines) == 4
        status, text = call(srv, "POST", "/v1/chat/completions", {
            "model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": True})
        assert status == 200 and '"error":{"message":"the fake engine failed on purpose"' in text
        # Before the first byte it is a real status.
        srv.engine.fail_after = 0
        status, body = call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "hi"})
        assert status == 500 and body == {"error": "the fake engine failed on purpose"}
        assert call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "y" * 4000})[0] == 400


def test_ps_reports_each_models_load_time(store):
    """The first load's time was only in that request's reply: `ps` keeps it (nanoseconds,
    as Ollama's load_duration)."""
    add_fake_model(store)
    with RunningServer(FakeEngine(load_delay=0.05), store) as srv:
        _, body = call(srv, "POST", "/api/generate", {"model": "fake", "stream": False})
        (loaded,) = call(srv, "GET", "/api/ps")[1]["models"]
        assert loaded["load_duration"] == body["load_duration"] >= 50_000_000

def test_empty_prompt_loads_and_keep_alive_zero_unloads(srv):
    status, body = call(srv, "POST", "/api/generate", {"model": "fake", "stream": False})
    assert body["done_reason"] == "load" and body["response"] == ""
    (loaded,) = call(srv, "GET", "/api/ps")[1]["models"]
    assert loaded["name"] == "fake:latest" and loaded["context_length"] > 0 and loaded["expires_at"]
    _, body = call(srv, "POST", "/api/chat", {"model": "fake", "messages": [], "keep_alive": 0, "stream": False})
    assert body["done_reason"] == "unload" and body["message"]["content"] == ""
    assert call(srv, "GET", "/api/ps")[1]["models"] == []
    _, lines = call(srv, "POST", "/api/generate", {"model": "fake", "keep_alive": "1h"})
    assert lines[0]["done_reason"] == "load"


def test_embed_routes(srv):
    _, body = call(srv, "POST", "/api/embed", {"model": "fake", "input": ["a", "b"], "dimensions": 4})
    assert len(body["embeddings"]) == 2 and len(body["embeddings"][0]) == 4 and body["prompt_eval_count"] == 4
    assert abs(sum(v * v for v in body["embeddings"][0]) - 1) < 1e-6
    _, legacy = call(srv, "POST", "/api/embeddings", {"model": "fake", "prompt": "a"})
    assert len(legacy["embedding"]) == 8
    _, oa = call(srv, "POST", "/v1/embeddings", {"model": "fake", "input": "a"})
    assert oa["object"] == "list" and oa["data"][0]["embedding"] == legacy["embedding"]


def test_tool_calls_come_back_whole_native_and_openai(srv):
    srv.engine.reply = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "weather?"}]
    _, body = call(srv, "POST", "/api/chat", {"model": "fake", "messages": msgs, "tools": tools, "stream": False})
    assert body["message"]["content"] == ""
    assert body["message"]["tool_calls"] == [{"function": {"index": 0, "name": "get_weather",
                                                           "arguments": {"city": "Paris"}}}]
    _, lines = call(srv, "POST", "/api/chat", {"model": "fake", "messages": msgs, "tools": tools})
    assert [bool(line["message"].get("tool_calls")) for line in lines] == [True, False]
    _, oa = call(srv, "POST", "/v1/chat/completions", {"model": "fake", "messages": msgs, "tools": tools})
    choice = oa["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    # Without tools the same text is plain content.
    _, plain = call(srv, "POST", "/api/chat", {"model": "fake", "messages": msgs, "stream": False})
    assert plain["message"]["content"] == srv.engine.reply


def test_openai_tool_calls_have_openai_shapes_whole_and_streamed(srv):
    srv.engine.reply = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {"model": "fake", "messages": [{"role": "user", "content": "weather?"}], "tools": tools}
    _, oa = call(srv, "POST", "/v1/chat/completions", body)
    message = oa["choices"][0]["message"]
    # A whole message: content null beside the calls, and no `index` (a stream-delta field).
    assert message["content"] is None
    (tool_call,) = message["tool_calls"]
    assert set(tool_call) == {"id", "type", "function"} and tool_call["type"] == "function"
    _, text = call(srv, "POST", "/v1/chat/completions", {**body, "stream": True})
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in text.split("\n\n") if e.startswith("data: {")]
    (streamed,) = [c for d in deltas for c in d.get("tool_calls") or []]
    assert streamed["index"] == 0 and streamed["function"] == tool_call["function"]
    # Text beside no calls stays a string, empty or not.
    srv.engine.reply = "plain"
    _, oa = call(srv, "POST", "/v1/chat/completions", body)
    assert oa["choices"][0]["message"]["content"] == "plain" and "tool_calls" not in oa["choices"][0]["message"]


def test_a_chat_longer_than_num_ctx_loses_its_oldest_messages_and_says_so(srv):
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " + "q" * 90},
                    {"role": "assistant", "content": f"answer {i} " + "a" * 90}]
    msgs = [{"role": "system", "content": "You are terse."}, *history, {"role": "user", "content": "last one?"}]
    body = {"model": "fake", "messages": msgs, "options": {"num_ctx": 512, "num_predict": 4}}
    status, whole = call(srv, "POST", "/api/chat", {**body, "stream": False})
    assert status == 200 and whole["done_reason"] == "length"
    dropped = whole["truncated_messages"]
    prompt = srv.engine.prompts[-1]
    assert dropped % 2 == 0 and 0 < dropped < len(history)     # whole turns, a user message first
    assert prompt.startswith("<|system|>You are terse.\n<|user|>question ") and "last one?" in prompt
    assert f"question {dropped // 2 - 1} " not in prompt and f"question {dropped // 2} " in prompt
    assert whole["prompt_eval_count"] == len(prompt.encode()) < 512
    _, lines = call(srv, "POST", "/api/chat", body)
    assert lines[-1]["truncated_messages"] == dropped
    (logged, _) = srv.logged("/api/chat", 2)
    assert logged["truncated_messages"] == dropped
    # OpenAI clients (no num_ctx there: the model's 2048) get the same fitting; the log says so.
    longer = [msgs[0], *history * 3, msgs[-1]]
    status, oa = call(srv, "POST", "/v1/chat/completions", {"model": "fake", "messages": longer, "max_tokens": 4})
    assert status == 200 and oa["usage"]["prompt_tokens"] < 2048 < len(json.dumps(longer))
    (logged,) = srv.logged("/v1/chat/completions", 1)
    assert logged["truncated_messages"] > 0
    # `truncate: false` keeps Ollama's refusal.
    status, err = call(srv, "POST", "/api/chat", {**body, "truncate": False, "stream": False})
    assert status == 400 and "num_ctx=512" in err["error"]
    # A latest message that cannot fit on its own is a 400 that says so.
    status, err = call(srv, "POST", "/api/chat", {**body, "messages": [*msgs, {"role": "user", "content": "x" * 600}]})
    assert status == 400 and "latest message does not fit" in err["error"]


def test_openai_shapes(srv):
    msgs = [{"role": "user", "content": "hi"}]
    _, chat = call(srv, "POST", "/v1/chat/completions", {"model": "fake", "messages": msgs, "max_tokens": 3,
                                                          "seed": 1, "stop": ["zz"]})
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == "Hel"
    assert chat["choices"][0]["finish_reason"] == "length"
    assert chat["usage"]["completion_tokens"] == 3
    opts = srv.engine.options[-1]
    assert (opts.temperature, opts.top_p, opts.seed, opts.stop) == (1.0, 1.0, 1, ("zz",))
    _, text = call(srv, "POST", "/v1/chat/completions", {"model": "fake", "messages": msgs, "max_tokens": 2,
                                                          "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    assert text.endswith("data: [DONE]\n\n")
    _, comp = call(srv, "POST", "/v1/completions", {"model": "fake", "prompt": "raw", "max_tokens": 2})
    assert comp["choices"][0]["text"] == "He" and srv.engine.prompts[-1] == "raw"
    _, models = call(srv, "GET", "/v1/models")
    assert models["data"][0]["id"] == "fake:latest"
    status, err = call(srv, "GET", "/v1/models/missing")
    assert status == 404 and err["error"]["type"] == "not_found_error"
    status, err = call(srv, "POST", "/v1/chat/completions", {"model": "fake", "messages": msgs, "temperature": 5})
    assert status == 400 and "temperature" in err["error"]["message"] and err["error"]["param"] is None


def test_response_format_and_format_reach_the_engine_as_constraints(srv):
    constrain = pytest.importorskip("mlxlite.constrain.tokens")
    msgs = [{"role": "user", "content": "hi"}]
    srv.engine.reply = '{"a": 1}'
    call(srv, "POST", "/api/chat", {"model": "fake", "messages": msgs, "format": "json", "stream": False})
    assert isinstance(srv.engine.constraints[-1], constrain.TokenConstraint)
    call(srv, "POST", "/v1/chat/completions", {"model": "fake", "messages": msgs,
                                               "response_format": {"type": "json_object"}})
    assert isinstance(srv.engine.constraints[-1], constrain.TokenConstraint)
    call(srv, "POST", "/api/chat", {"model": "fake", "messages": msgs, "stream": False})
    assert srv.engine.constraints[-1] is None


def test_twenty_clients_disconnecting_mid_stream_stop_every_generation(store):
    engine = FakeEngine(reply="word " * 5000, step_delay=0.002)
    add_fake_model(store)
    with RunningServer(engine, store) as srv:
        got_lines = []

        def client(i):
            conn, resp = _stream_first_line(srv, "/api/generate", {"model": "fake", "prompt": f"client {i}"})
            got_lines.append(resp.readline())
            resp.readline()
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(got_lines) == 20 and all(b'"done":false' in line for line in got_lines)
        wait_for(lambda: len(engine.finished) == 20 and engine.active == 0, 30, "generations to stop")
        assert engine.finished == ["cancel"] * 20
        wait_for(lambda: len([r for r in srv.log_lines() if r["path"] == "/api/generate"]) == 20, 10, "logs")
        assert srv.scheduler.depth() == 0 and not srv.scheduler.busy()
        (resident,) = call(srv, "GET", "/api/ps")[1]["models"]
        assert resident["name"] == "fake:latest"
        health = call(srv, "GET", "/api/health")[1]
        assert health["status"] == "ok" and health["queue"] == 0 and health["active"] is False
        logged = [r for r in srv.log_lines() if r["path"] == "/api/generate"]
        assert all(r["status"] == 499 for r in logged)
        assert all(r["eval_tokens"] < 5000 * 5 for r in logged if "eval_tokens" in r)
        # And the server still answers.
        assert call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "x", "stream": False,
                                                   "options": {"num_predict": 1}})[1]["response"] == "w"


def test_disconnect_during_prompt_processing_cancels_prefill(store):
    engine = FakeEngine(prefill_delay=60.0, prefill_chunks=60000)
    add_fake_model(store)
    with RunningServer(engine, store) as srv:
        for stream in (True, False):
            conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
            conn.request("POST", "/api/generate", json.dumps({"model": "fake", "prompt": "p", "stream": stream}))
            wait_for(lambda: engine.in_prefill == 1, what="prefill to start")
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            wait_for(lambda: engine.active == 0, 30, "prefill to stop")
        assert engine.finished == ["cancel", "cancel"]
        wait_for(lambda: len(srv.log_lines()) == 2, what="logs")
        assert [r["status"] for r in srv.log_lines()] == [499, 499]


def test_a_full_queue_answers_503_with_a_message(store):
    engine = FakeEngine(hold_after=1)
    add_fake_model(store)
    from mlxlite.sched import Scheduler

    with RunningServer(engine, store, scheduler=Scheduler(store, engine, max_queue=1)) as srv:
        body = {"model": "fake", "prompt": "hi"}
        first, _ = _stream_first_line(srv, "/api/generate", body)
        wait_for(lambda: engine.active == 1, what="first running")
        second = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        second.request("POST", "/api/generate", json.dumps(body))
        wait_for(lambda: srv.scheduler.depth() == 1, what="second queued")
        status, err = call(srv, "POST", "/api/generate", body)
        assert status == 503 and "maximum pending requests" in err["error"]
        status, err = call(srv, "POST", "/v1/completions", {"model": "fake", "prompt": "x"})
        assert status == 503 and err["error"]["type"] == "api_error"
        engine.resume.set()
        assert second.getresponse().status == 200
        first.close()
        second.close()


def test_host_header_origin_and_api_key_checks(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(), store, api_key="s3cret", origins=["https://ui.example"]) as srv:
        auth = {"Authorization": "Bearer s3cret"}
        assert call(srv, "GET", "/api/tags")[0] == 401
        assert call(srv, "GET", "/api/tags", headers={"Authorization": "Bearer nope"})[0] == 401
        assert call(srv, "GET", "/api/tags", headers=auth)[0] == 200
        for host in ("evil.example", "attacker.com:11435", "1.2.3.4.nip.io"):
            status, body = call(srv, "GET", "/api/tags", headers={**auth, "Host": host})
            assert status == 403 and "DNS rebinding" in body["error"], host
        for host in ("localhost:11435", "127.0.0.1", "[::1]:80", "box.local", "10.0.0.5", socket.gethostname()):
            assert call(srv, "GET", "/api/tags", headers={**auth, "Host": host})[0] == 200, host
        for origin, ok in (("http://localhost:3000", True), ("https://ui.example", True),
                           ("https://evil.example", False), ("vscode-webview://abc", True)):
            req = urllib.request.Request(srv.url + "/api/version", headers={**auth, "Origin": origin})
            try:
                with urllib.request.urlopen(req) as resp:
                    assert ok and resp.headers["Access-Control-Allow-Origin"] == origin
            except urllib.error.HTTPError as exc:
                assert not ok and exc.code == 403
        # A preflight needs no key and names what is allowed.
        req = urllib.request.Request(srv.url + "/api/chat", method="OPTIONS", headers={
            "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization"})
        with urllib.request.urlopen(req) as resp:
            assert resp.status == 204 and "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert resp.headers["Access-Control-Allow-Headers"] == "content-type,authorization"


def test_non_loopback_bind_needs_an_api_key():
    from mlxlite.errors import BadRequest
    from mlxlite.server import make_server

    with pytest.raises(BadRequest, match="MLXLITE_API_KEY"):
        make_server("0.0.0.0:0", engine=FakeEngine(), api_key="")


def test_body_size_limit_is_413_and_the_connection_closes(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(), store, max_body=1000) as srv:
        status, body = call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "x" * 2000})
        assert status == 413 and "limit of 1000" in body["error"]
        assert call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "x", "stream": False})[0] == 200


def test_one_json_log_line_per_request(srv):
    call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "hi", "stream": False})
    call(srv, "POST", "/api/generate", {"model": "nope", "prompt": "hi"})
    call(srv, "GET", "/nowhere")
    # A request is logged just after its last byte is sent: wait for the third line.
    wait_for(lambda: len(srv.log_lines()) == 3, what="log lines")
    gen, missing, nowhere = srv.log_lines()
    assert gen["status"] == 200 and gen["model"] == "fake:latest" and gen["eval_tokens"] == len(srv.engine.reply)
    for key in ("id", "method", "path", "duration_ms", "client", "prompt_tokens", "load_ms", "eval_ms"):
        assert key in gen, key
    assert missing["status"] == 404 and "not found" in missing["error"] and missing["model"] == "nope:latest"
    assert nowhere["status"] == 404 and nowhere["path"] == "/nowhere"


def test_metrics_count_requests_by_route_and_status(srv):
    call(srv, "GET", "/api/tags")
    call(srv, "POST", "/api/generate", {"model": "nope"})
    wait_for(lambda: sum(srv.app.request_counts.values()) == 2, what="counts")
    _, text = call(srv, "GET", "/metrics")
    assert 'mlxlite_requests_total{route="/api/tags",status="200"} 1' in text
    assert 'mlxlite_requests_total{route="/api/generate",status="404"} 1' in text
    assert "mlxlite_queue_depth 0" in text


def test_route_table_is_data_and_extends_with_one_entry(store):
    from mlxlite.server.routes import ROUTES
    from mlxlite.server.wire import Reply

    assert ("POST", "/api/chat") in ROUTES
    routes = dict(ROUTES)
    routes[("GET", "/api/things/{digest}")] = lambda ctx: Reply({"digest": ctx.params["digest"]})
    with RunningServer(FakeEngine(), store) as srv:
        srv.app.routes = routes
        assert call(srv, "GET", "/api/things/sha256:ab")[1] == {"digest": "sha256:ab"}
        status, body = call(srv, "POST", "/api/things/sha256:ab")
        assert status == 405 and "allowed: GET" in body["error"], body


def test_server_module_does_not_import_mlx():
    code = ("import sys; import mlxlite.server, mlxlite.cli.client; "
            "bad = [m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   cwd=str(Path(__file__).resolve().parents[2]))


def test_serve_forever_stops_on_sigterm(tmp_path):
    code = ("import sys; sys.path.insert(0, '.'); from tests.fake_engine import FakeEngine; "
            "from mlxlite.server import serve_forever; sys.exit(serve_forever('127.0.0.1:0', engine=FakeEngine()))")
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, cwd=root)
    try:
        line = proc.stderr.readline()
        assert "listening on http://127.0.0.1:" in line
        url = line.split("listening on ")[1].strip()
        with urllib.request.urlopen(url + "/api/version", timeout=10) as resp:
            assert resp.status == 200
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            time.sleep(0)


def _serve(root: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "mlxlite.py", "serve", "--host", "127.0.0.1:0"], cwd=root,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    line = proc.stderr.readline()
    assert "listening on http://127.0.0.1:" in line, line
    return proc, line.split("listening on ")[1].strip()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def test_sigterm_with_a_real_model_loaded_exits_0_and_writes_the_prefix_cache(store, tiny_gguf_model, mlxlite_home):
    """`kill -TERM` of `serve` ended in SIGABRT ("terminate called without an active exception"):
    MLX freed the MLX thread's streams at thread exit, racing the interpreter's exit. Now the
    thread frees them itself, after unloading (which saves the prefix cache). Three times, since the
    abort was a race (1 to 5 runs in 10 here): later daemons also read the first one's cache back."""
    root = str(Path(__file__).resolve().parents[2])
    body = {"model": tiny_gguf_model, "prompt": "Tell me a story about a small robot who learns to paint.",
            "stream": False, "options": {"num_predict": 4, "temperature": 0}}
    for round_ in range(3):
        proc, url = _serve(root)
        try:
            reply = _post(url + "/api/generate", body)
            assert reply["done"] is True
            if round_ > 0:          # the prompt's prefix came from the file a daemon before wrote
                assert reply["prompt_cached_count"] > 0, reply
            with urllib.request.urlopen(url + "/api/ps", timeout=10) as resp:
                (ps,) = json.loads(resp.read())["models"]
            assert ps["load_duration"] > 0
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err[-2000:]
        assert "terminate called" not in err
        assert list((mlxlite_home / "cache" / "prefix").glob("*/*.safetensors")), "no prefix cache written"
        events = [json.loads(line) for line in err.splitlines() if line.startswith('{"time"') and '"event"' in line]
        (load,) = [e for e in events if e["event"] == "load"]
        assert load["model"] == "tiny-gguf:latest" and load["load_ms"] > 0
        assert [e["event"] for e in events] == ["load", "unload"]


def test_log_file_setting_receives_the_json_lines(store, tmp_path, monkeypatch):
    from mlxlite.server import make_server

    log = tmp_path / "requests.log"
    monkeypatch.setenv("MLXLITE_LOG_FILE", str(log))
    server = make_server("127.0.0.1:0", store=store, engine=FakeEngine())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(server.url + "/api/version", timeout=10) as resp:
            assert resp.status == 200
        wait_for(lambda: log.exists() and log.read_text().strip(), what="log line")
        record = json.loads(log.read_text().splitlines()[0])
        assert record["path"] == "/api/version" and record["status"] == 200
    finally:
        server.close()


def test_disconnect_is_noticed_while_tokens_flow_fast_and_nothing_is_written(store):
    # stream:false writes nothing until the end, and tokens arrive faster than the poll
    # interval: the client must still be checked, so the job stops early.
    engine = FakeEngine(reply="z" * 200000, step_delay=0.0002)
    add_fake_model(store)
    with RunningServer(engine, store) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        conn.request("POST", "/api/generate", json.dumps({"model": "fake", "prompt": "p", "stream": False}))
        wait_for(lambda: engine.active == 1, what="generation to start")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(lambda: engine.active == 0, 60, "generation to stop")
        assert engine.finished == ["cancel"]
        wait_for(lambda: srv.log_lines(), what="log")
        assert srv.log_lines()[0]["status"] == 499


def test_logprobs_native_and_openai(srv):
    _, body = call(srv, "POST", "/api/generate", {"model": "fake", "prompt": "hi", "stream": False,
                                                  "logprobs": True, "options": {"num_predict": 3}})
    assert [lp["token"] for lp in body["logprobs"]] == ["H", "e", "l"]
    assert all(lp["logprob"] == -0.1 for lp in body["logprobs"])
    _, oa = call(srv, "POST", "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}],
                                                        "max_tokens": 2, "logprobs": True, "top_logprobs": 2})
    assert [lp["token"] for lp in oa["choices"][0]["logprobs"]["content"]] == ["H", "e"]
    _, plain = call(srv, "POST", "/v1/chat/completions", {"model": "fake", "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": "x"}]})
    assert plain["choices"][0]["logprobs"] is None


def test_embed_truncate_false_refuses_overlong_input(srv):
    status, body = call(srv, "POST", "/api/embed", {"model": "fake", "input": "x" * 3000, "truncate": False})
    assert status == 400 and "truncate" in body["error"]
    _, ok = call(srv, "POST", "/api/embed", {"model": "fake", "input": "x" * 3000})
    assert ok["prompt_eval_count"] == 2048


def test_an_idle_keep_alive_connection_is_closed_after_the_header_timeout(store, monkeypatch):
    monkeypatch.setenv("MLXLITE_HEADER_TIMEOUT", "1")
    add_fake_model(store)
    with RunningServer(FakeEngine(), store) as srv:
        baseline = threading.active_count()
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        for _ in range(2):              # kept alive between requests that come in time
            conn.request("GET", "/api/version")
            assert conn.getresponse().read() and conn.sock is not None
        sock = conn.sock
        readable, _, _ = select.select([sock], [], [], 30)
        assert readable and sock.recv(1) == b"", "the idle connection was not closed"
        wait_for(lambda: threading.active_count() < baseline + 1, 30, "its thread to end")
        conn.close()
        assert call(srv, "GET", "/api/version")[0] == 200


def test_slow_generations_and_streams_outlive_the_read_timeouts(store):
    # Both timeouts at 0.2 s while each answer waits 1 s on the model mid-response.
    engine = FakeEngine(hold_after=3)
    add_fake_model(store)
    with RunningServer(engine, store, header_timeout=0.2, body_timeout=0.2) as srv:
        conn, resp = _stream_first_line(srv, "/api/generate", {"model": "fake", "prompt": "hi"})
        assert b'"done":false' in resp.readline()
        time.sleep(1.0)
        engine.resume.set()
        rest = resp.read().decode()
        assert '"done":true' in rest and '"error"' not in rest
        conn.close()
        engine.resume.clear()
        done = []
        waiter = threading.Thread(target=lambda: done.append(call(srv, "POST", "/api/generate", {
            "model": "fake", "prompt": "hi", "stream": False})))
        waiter.start()
        wait_for(lambda: engine.active == 1, what="the second generation")
        time.sleep(1.0)
        engine.resume.set()
        waiter.join(30)
        ((status, whole),) = done
        assert status == 200 and whole["response"] == engine.reply
        assert [r["status"] for r in srv.logged("/api/generate", 2)] == [200, 200]


def test_connection_limits_are_settings_with_env_vars(store, monkeypatch):
    from mlxlite import config
    from mlxlite.errors import BadRequest
    from mlxlite.server import make_server

    for env in ("MLXLITE_MAX_CONNECTIONS", "MLXLITE_HEADER_TIMEOUT", "MLXLITE_BODY_TIMEOUT"):
        assert env in config.describe()
    monkeypatch.setenv("MLXLITE_MAX_CONNECTIONS", "3")
    monkeypatch.setenv("MLXLITE_HEADER_TIMEOUT", "2.5")
    with RunningServer(FakeEngine(), store) as srv:
        assert (srv.server.gate.limit, srv.server.header_timeout, srv.server.body_timeout) == (3, 2.5, 30.0)
    monkeypatch.setenv("MLXLITE_BODY_TIMEOUT", "0")
    with pytest.raises(BadRequest, match="MLXLITE_BODY_TIMEOUT"):
        make_server("127.0.0.1:0", store=store, engine=FakeEngine())


def test_a_full_disk_from_anywhere_maps_to_507_naming_where():
    """A raw ENOSPC (one no store code wrapped) is still the user's full disk, not a 500."""
    import errno
    import os

    from mlxlite.server.errors import error_body

    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/srv/models/x")
    assert error_body(exc) == (507, {"error": "no space left on device at /srv/models/x"})
    status, body = error_body(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), openai=True)
    assert (status, body["error"]["message"], body["error"]["type"]) == (507, "disk quota exceeded", "api_error")
    assert error_body(OSError(errno.EIO, "I/O error"))[0] == 500


def _raw_status(srv, request: bytes) -> tuple[int, dict]:
    """Send bytes as they are (http.client would not send two Host headers); read to EOF."""
    with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


def test_a_second_host_header_is_refused(srv):
    for hosts in (("127.0.0.1", "evil.example"), ("evil.example", "127.0.0.1"), ("localhost", "localhost")):
        lines = b"".join(b"Host: %s\r\n" % h.encode() for h in hosts)
        status, body = _raw_status(srv, b"GET /api/tags HTTP/1.1\r\n" + lines + b"Connection: close\r\n\r\n")
        assert status == 400 and "Host" in body["error"], hosts
    assert _raw_status(srv, b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")[0] == 200


def test_names_that_cannot_be_valid_are_400_before_any_lookup(srv, monkeypatch):
    lookups = []
    real = socket.getaddrinfo

    def spy(host, *args, **kwargs):
        if host != srv.host:  # the test's own connections to the daemon are fine
            lookups.append(host)
            raise OSError("test: no lookup may happen here")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    status, body = call(srv, "POST", "/api/copy", {"source": "fake", "destination": "localhost:99999/ns/m"})
    assert status == 400 and "port 99999" in body["error"]
    for path in ("/api/push", "/api/pull"):
        status, body = call(srv, "POST", path, {"model": "localhost:99999/ns/m", "stream": False})
        assert status == 400 and "port 99999" in body["error"], path
    status, body = call(srv, "POST", "/api/pull", {"model": "http://localhost:99999/x.gguf"})
    assert status == 400 and "port" in body["error"]
    assert lookups == []
    assert [m["name"] for m in call(srv, "GET", "/api/tags")[1]["models"]] == ["fake:latest"]


def test_one_daemon_per_store_the_second_is_told_where_the_first_is(store, tmp_path):
    from mlxlite.errors import Busy
    from mlxlite.server import make_server

    root = str(Path(__file__).resolve().parents[2])
    code = ("import sys; sys.path.insert(0, '.'); from tests.fake_engine import FakeEngine; "
            "from mlxlite.server import serve_forever; sys.exit(serve_forever('127.0.0.1:0', engine=FakeEngine()))")
    first = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, cwd=root)
    try:
        url = first.stderr.readline().split("listening on ")[1].strip()
        with pytest.raises(Busy, match=f"already serving the store .* on {url} \\(pid {first.pid}\\)"):
            make_server("127.0.0.1:0", store=store, engine=FakeEngine())
        # `mlxlite serve` on another port of the same store: one error line, exit 1.
        cli = subprocess.run([sys.executable, "mlxlite.py", "serve", "--host", "127.0.0.1:0"], cwd=root, timeout=120,
                             capture_output=True, text=True)
        assert cli.returncode == 1 and cli.stderr.strip().splitlines() == [
            f"error: another mlxlite daemon is already serving the store {store.root} on {url} (pid {first.pid}); "
            "stop it first, or give this one its own MLXLITE_HOME"], cli.stderr
        first.kill()  # a killed daemon leaves no lock behind: the kernel drops it
        first.wait(timeout=20)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=20)
    with RunningServer(FakeEngine(), store) as srv:
        assert call(srv, "GET", "/api/version")[0] == 200
        with pytest.raises(Busy, match=srv.url):
            make_server("127.0.0.1:0", store=store, engine=FakeEngine())
    with RunningServer(FakeEngine(), store) as again:  # closed cleanly: the lock is free again
        assert call(again, "GET", "/api/version")[0] == 200


def test_delete_through_a_symlinked_manifest_folder_is_refused(srv, tmp_path):
    from mlxlite import names

    raw = srv.store.manifest_path(names.parse("fake")).read_bytes()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "latest").write_bytes(raw)
    (outside / "bait").write_text("must survive")
    (srv.store.manifest_dir / "registry.ollama.ai" / "library" / "evil").symlink_to(outside)
    for method, path in (("DELETE", "/api/delete"), ("POST", "/api/show")):
        status, body = call(srv, method, path, {"model": "evil"})
        assert status == 500 and "symbolic link" in body["error"], (path, body)
    assert (outside / "latest").read_bytes() == raw and (outside / "bait").read_text() == "must survive"
    assert [m["name"] for m in call(srv, "GET", "/api/tags")[1]["models"]] == ["fake:latest"]
