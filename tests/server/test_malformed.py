"""A battery of malformed requests: each gets a 4xx JSON error, and the server keeps serving."""

import http.client
import json
import socket

import pytest

from tests.fake_engine import FakeEngine, RunningServer, add_fake_model

MSG = [{"role": "user", "content": "hi"}]


def _json_cases():
    """(method, path, body) where body is a dict (sent as JSON) or raw bytes."""
    cases = []
    posts = ["/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show", "/api/copy",
             "/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    for path in posts:
        for raw in (b"{", b"[1,2", b"nul", b"NaN", b'{"model": NaN}', b"\xff\xfe{}", b'"just a string"',
                    b"123", b"[]", b"null", b"", b"{" * 100000):
            cases.append(("POST", path, raw))
    gen = {"model": "fake", "prompt": "hi"}
    for field, value in [("model", 1), ("model", []), ("model", None), ("model", ""), ("model", "../etc/passwd"),
                         ("model", "a b"), ("model", "a:b:c"), ("model", "x" * 300), ("model", "missing"),
                         ("prompt", 1), ("prompt", ["a"]), ("stream", "yes"), ("raw", 1), ("system", 5),
                         ("template", 5), ("template", "{{ .Bogus"), ("template", "{{ if .System }}x"),
                         ("template", "{{ nosuch .Prompt }}"), ("template", "{{ .Messages.Bogus }}"),
                         ("suffix", 3), ("options", []), ("options", "x"),
                         ("options", {"temperature": "hot"}), ("options", {"temperature": -1}),
                         ("options", {"num_predict": 1e30}), ("options", {"top_k": 1.5}),
                         ("options", {"stop": 5}), ("options", {"num_ctx": 2}),  # (unknown names and
                         ("options", {"seed": True}), ("options", {"top_p": 2}),  # nulls: ignored, as Ollama does)
                         ("options", {"stop": [""]}), ("keep_alive", "forever"), ("keep_alive", True),
                         ("keep_alive", []), ("keep_alive", "5x"), ("keep_alive", 1e300), ("format", 5),
                         ("format", "xml"), ("format", []), ("context", ["a"]), ("context", [-1]),
                         ("context", "1,2"), ("images", ["abc"]), ("images", "abc"), ("think", True),
                         ("think", "sometimes"), ("top_logprobs", 50), ("logprobs", "yes"), ("truncate", "no")]:
        cases.append(("POST", "/api/generate", {**gen, field: value}))
    cases.append(("POST", "/api/generate", {**gen, "raw": True, "system": "s"}))
    cases.append(("POST", "/api/generate", {"model": "fake", "prompt": "hi", "suffix": "end"}))
    chat = {"model": "fake", "messages": MSG}
    for field, value in [("messages", "x"), ("messages", [1]), ("messages", [{"role": "robot", "content": "x"}]),
                         ("messages", [{"role": "user", "content": 5}]), ("messages", [{"content": "x"}]),
                         ("messages", [{"role": "user", "content": "x", "images": ["aGk="]}]),
                         ("messages", [{"role": "assistant", "content": "", "tool_calls": "x"}]),
                         ("tools", "x"), ("tools", [{}]), ("tools", [{"function": {}}]),
                         ("tools", [{"type": "function", "function": {"name": "f"}}]),  # template lacks tools? ok
                         ]:
        cases.append(("POST", "/api/chat", {**chat, field: value}))
    cases.pop()  # the last one is valid with the fake template (it supports tools)
    for body in ({"model": "fake", "input": 5}, {"model": "fake", "input": [1]},
                 {"model": "fake", "input": "a", "dimensions": -1}, {"model": "fake", "input": "a", "dimensions": "3"},
                 {"model": "fake", "input": "a", "truncate": "yes"}, {"input": "a"}):
        cases.append(("POST", "/api/embed", body))
    cases += [("POST", "/api/embeddings", {"model": "fake", "prompt": 5}),
              ("POST", "/api/show", {}), ("POST", "/api/show", {"model": "missing"}),
              ("POST", "/api/show", {"model": "fake", "verbose": "yes"}),
              ("POST", "/api/copy", {"source": "fake"}), ("POST", "/api/copy", {"source": "fake", "destination": "a b"}),
              ("POST", "/api/copy", {"source": "missing", "destination": "b"}),
              ("DELETE", "/api/delete", {}), ("DELETE", "/api/delete", {"model": "missing"}),
              ("DELETE", "/api/delete", b"{")]
    oa = {"model": "fake", "messages": MSG}
    for field, value in [("messages", None), ("messages", []), ("temperature", 3), ("top_p", 2),
                         ("max_tokens", 0), ("max_tokens", "5"), ("n", 2), ("stop", 5), ("stop", [1]),
                         ("response_format", "json"), ("response_format", {"type": "xml"}),
                         ("response_format", {"type": "json_schema", "json_schema": {}}),
                         ("stream_options", "x"), ("stream", "true"), ("seed", 1.5),
                         ("frequency_penalty", 9), ("presence_penalty", "x"),
                         ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                         ("messages", [{"role": "user", "content": [{"type": "weird"}]}]),
                         ("messages", [{"role": "user", "content": 5}]),
                         ("messages", [{"role": "assistant", "tool_calls": [{"function": {"name": "f",
                                                                                         "arguments": "{x"}}]}]),
                         ("messages", [{"role": "assistant", "tool_calls": [{"function": {"name": "f",
                                                                                         "arguments": "[" * 5000}}]}]),
                         ("model", "missing")]:
        cases.append(("POST", "/v1/chat/completions", {**oa, field: value}))
    for body in ({"model": "fake", "prompt": 5}, {"model": "fake", "prompt": ["a", "b"]},
                 {"model": "fake", "prompt": "x", "best_of": 2}, {"model": "fake", "prompt": "x", "echo": True},
                 {"model": "fake", "prompt": "x", "max_tokens": -1}, {"model": "fake", "prompt": "x", "suffix": 1}):
        cases.append(("POST", "/v1/completions", body))
    for body in ({"model": "fake", "input": 5}, {"model": "fake", "input": []}, {"model": "fake", "input": [[1, 2]]},
                 {"model": "fake", "input": "a", "encoding_format": "hex"},
                 {"model": "fake", "input": "a", "dimensions": 0}):
        cases.append(("POST", "/v1/embeddings", body))
    cases += [("GET", "/api/nope", None), ("GET", "/api/chat", None), ("PUT", "/api/tags", None),
              ("POST", "/api/ps", {}), ("GET", "/v1/models/a%20b", None), ("GET", "/v1/models/missing", None),
              ("PATCH", "/api/generate", gen), ("DELETE", "/api/tags", None), ("GET", "/v1/nope", None)]
    return cases


RAW_CASES = [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"X-Many: y\r\n" * 200 + b"\r\n",
    b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n",
    b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n",
    b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1e3\r\n\r\n",
    b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 999999999999\r\n\r\n",
    b"POST /api/generate HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"b" * 70000 + b"\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\n\r\n",
]


def _raw(srv, data: bytes) -> tuple[int, bytes]:
    with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()


def _send(srv, method, path, body) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type", "")
    finally:
        conn.close()


@pytest.fixture
def srv(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(), store, max_body=1 << 20) as s:
        yield s


def test_battery_of_malformed_requests_each_get_a_4xx_json_error(srv):
    cases = _json_cases()
    assert len(cases) + len(RAW_CASES) >= 100
    failures = []
    for method, path, body in cases:
        status, payload, ctype = _send(srv, method, path, body)
        ok = 400 <= status < 500 and ctype.startswith("application/json") and "error" in json.loads(payload)
        if not ok:
            failures.append((method, path, str(body)[:80], status, payload[:200]))
    for data in RAW_CASES:
        status, payload = _raw(srv, data)
        if not (400 <= status < 500 and "error" in json.loads(payload)):
            failures.append(("RAW", data[:60], status, payload[:200]))
    assert failures == []
    # Nothing reached the engine, and the server still answers normally.
    assert srv.engine.started == 0
    status, payload, _ = _send(srv, "POST", "/api/generate", {"model": "fake", "prompt": "hi", "stream": False})
    assert status == 200 and json.loads(payload)["response"] == srv.engine.reply
    assert all("traceback" not in r for r in srv.log_lines())


def test_openai_routes_use_openai_error_shape(srv):
    status, payload, _ = _send(srv, "POST", "/v1/chat/completions", b"{")
    err = json.loads(payload)["error"]
    assert status == 400 and err["type"] == "invalid_request_error" and "invalid JSON" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


LONE = "a\ud800b\udc00c"      # json.dumps writes each as a \\uXXXX escape: lone surrogates on the wire
FIXED = "a\ufffdb\ufffdc"     # what Go's encoding/json (so Ollama) decodes them to


@pytest.mark.parametrize(("path", "body", "seen"), [
    ("/api/generate", {"prompt": LONE}, FIXED),
    ("/api/generate", {"prompt": "hi", "system": LONE}, FIXED),
    ("/api/generate", {"prompt": LONE, "raw": True}, FIXED),
    ("/api/generate", {"prompt": LONE, "template": "{{ .Prompt }}!"}, FIXED + "!"),
    ("/api/chat", {"messages": [{"role": "system", "content": LONE}, *MSG]}, FIXED),
    ("/api/chat", {"messages": [{"role": "user", "content": LONE}]}, FIXED),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, FIXED),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]}, FIXED),
    ("/v1/completions", {"prompt": LONE}, FIXED),
])
def test_lone_surrogates_in_prompts_read_as_replacement_characters(srv, path, body, seen):
    stream = {"stream": False} if path.startswith("/api/") else {}
    status, payload, _ = _send(srv, "POST", path, {"model": "fake", **body, **stream})
    assert status == 200, payload
    assert seen in srv.engine.prompts[-1] and "\ud800" not in srv.engine.prompts[-1]


@pytest.mark.parametrize(("path", "key", "value", "vectors"), [
    ("/api/embed", "input", LONE, lambda r: r["embeddings"]),
    ("/api/embed", "input", [LONE, "x"], lambda r: r["embeddings"]),
    ("/api/embeddings", "prompt", LONE, lambda r: [r["embedding"]]),
    ("/v1/embeddings", "input", LONE, lambda r: [d["embedding"] for d in r["data"]]),
])
def test_lone_surrogates_in_embedding_inputs_embed_as_replacement_characters(srv, path, key, value, vectors):
    status, payload, _ = _send(srv, "POST", path, {"model": "fake", key: value})
    assert status == 200, payload
    fixed = [FIXED if v == LONE else v for v in value] if isinstance(value, list) else FIXED
    status, same, _ = _send(srv, "POST", path, {"model": "fake", key: fixed})
    assert vectors(json.loads(payload)) == vectors(json.loads(same))


def test_lone_surrogates_reach_no_real_tokenizer(store, tiny_gguf_model):
    """The real tokenizer raised TypeError on a lone surrogate: a 500 before the fix."""
    with RunningServer(None, store) as real:
        opts = {"options": {"num_predict": 2, "temperature": 0}, "stream": False}
        for path, body in [("/api/generate", {"prompt": LONE}),
                           ("/api/chat", {"messages": [{"role": "user", "content": LONE}]}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}], "max_tokens": 2}),
                           ("/api/embed", {"input": [LONE]})]:
            extra = opts if path.startswith("/api/") and "embed" not in path else {}
            status, payload, _ = _send(real, "POST", path, {"model": tiny_gguf_model, **body, **extra})
            assert status == 200, (path, payload)


def test_lone_surrogates_are_replaced_in_keys_and_at_any_depth():
    from mlxlite.server.wire import replace_lone_surrogates

    raw = ('{"k\\udfff": ' + '[' * 950 + '"\\ud83d\\ude00 \\ud800"' + ']' * 950 + "}").encode()
    value = replace_lone_surrogates(json.loads(raw), raw)
    ((key, inner),) = value.items()
    for _ in range(950):
        (inner,) = inner
    assert (key, inner) == ("k\ufffd", "\U0001f600 \ufffd")   # a valid pair stays one character
    clean = b'{"k": "\\\\ud800"}'                              # an escaped backslash, not a surrogate
    assert replace_lone_surrogates(json.loads(clean), clean) == {"k": "\\ud800"}


def _deep_schema(objects: int) -> bytes:
    """JSON text of an object schema nested `objects` deep (two JSON levels each), written
    without json.dumps, which cannot write what it cannot nest."""
    return (b'{"type":"object","properties":{"a":' * objects + b'{"type":"string"}' + b"}}" * objects)


@pytest.mark.parametrize("objects", [70, 150, 225, 450])
@pytest.mark.parametrize("route", ["native", "openai"])
def test_deeply_nested_schemas_are_a_400_naming_the_limit(srv, route, objects):
    """300-450 levels deep (150-225 objects) compiling raised RecursionError: a 500. Past the
    limit (128 levels: 63 nested objects fit) every depth is a 400 that names it."""
    from mlxlite.constrain.schema import MAX_SCHEMA_DEPTH

    schema = _deep_schema(objects)
    if route == "native":
        path, body = "/api/generate", b'{"model":"fake","prompt":"x","stream":false,"format":' + schema + b"}"
    else:
        path = "/v1/chat/completions"
        body = (b'{"model":"fake","messages":[{"role":"user","content":"x"}],'
                b'"response_format":{"type":"json_schema","json_schema":{"name":"s","schema":' + schema + b"}}}")
    status, payload, ctype = _send(srv, "POST", path, body)
    error = json.loads(payload)["error"]
    message = error["message"] if route == "openai" else error
    assert status == 400 and ctype.startswith("application/json")
    assert f"at most {MAX_SCHEMA_DEPTH} levels" in message
    ok = _deep_schema(MAX_SCHEMA_DEPTH // 2 - 1)
    status, payload, _ = _send(srv, "POST", "/api/generate",
                               b'{"model":"fake","prompt":"x","stream":false,"format":' + ok + b"}")
    assert status == 200, payload
