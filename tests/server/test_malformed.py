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
                         ("template", 5), ("template", "{{ .Bogus }}"), ("template", "{{ if .System }}x"),
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
