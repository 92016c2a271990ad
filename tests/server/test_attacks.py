"""Hostile clients against a real daemon on loopback (fake engine): slowloris headers, stalled
and dribbled bodies, idle sockets past the connection cap, more generate requests than the
queue holds. Each attack is bounded (short timeouts set through the settings' environment
variables, generous waits), and each ends by showing the server still serves."""

import http.client
import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.fake_engine import FakeEngine, RunningServer, add_fake_model, wait_for

BOUND = 30.0   # the most any attack may take to be answered: generous, never a threshold


def read_until_closed(sock: socket.socket, bound: float = BOUND) -> bytes:
    """Everything the server sends until it closes the connection; fails past `bound`."""
    sock.settimeout(bound)
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open past {bound}s; got {data!r}") from None
        if not piece:
            return data
        data += piece


def response_parts(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def still_serves(srv: RunningServer) -> None:
    with urllib.request.urlopen(srv.url + "/api/tags", timeout=BOUND) as resp:
        assert resp.status == 200 and json.loads(resp.read())["models"]


@pytest.fixture
def srv(store, monkeypatch):
    monkeypatch.setenv("MLXLITE_HEADER_TIMEOUT", "1")
    monkeypatch.setenv("MLXLITE_BODY_TIMEOUT", "1")
    add_fake_model(store)
    with RunningServer(FakeEngine(), store) as s:
        yield s


def test_slowloris_headers_get_408_within_the_header_timeout_however_steady_the_drip(srv):
    # A byte of one header every 0.1 s: each read waits far less than the 1 s timeout, the
    # line stays far under any length limit, so only one deadline for the headers stops it.
    sock = socket.create_connection((srv.host, srv.port), timeout=BOUND)
    sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
    deadline, sent = time.monotonic() + BOUND, 0
    while not select.select([sock], [], [], 0.1)[0]:
        assert time.monotonic() < deadline, f"still reading headers after {sent} dribbled bytes"
        try:
            sock.sendall(b"a")
        except OSError:         # closed under us: what it said is still to be read
            break
        sent += 1
    status, headers, body = response_parts(read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close"
    assert "MLXLITE_HEADER_TIMEOUT" in body["error"]
    sock.close()
    wait_for(lambda: any(r.get("status") == 408 for r in srv.log_lines()), what="the 408 log line")
    still_serves(srv)


def test_a_request_line_that_never_ends_gets_408_and_silence_gets_a_close(srv):
    half = socket.create_connection((srv.host, srv.port), timeout=BOUND)
    half.sendall(b"POST /api/gen")
    silent = socket.create_connection((srv.host, srv.port), timeout=BOUND)
    status, _, body = response_parts(read_until_closed(half))
    assert status == 408 and "MLXLITE_HEADER_TIMEOUT" in body["error"]
    assert read_until_closed(silent) == b""     # nothing asked, nothing answered: just closed
    half.close()
    silent.close()
    still_serves(srv)


@pytest.mark.parametrize("path,head,sent,openai", [
    ("/api/show", b"Content-Length: 100\r\n", b'{"model": "fa', False),
    ("/v1/chat/completions", b"Content-Length: 100\r\n", b'{"model": "fa', True),
    ("/api/blobs/sha256:" + "0" * 64, b"Transfer-Encoding: chunked\r\n", b"a\r\n0123456789\r\n", False),
])
def test_a_stalled_body_gets_408_and_the_connection_closes(srv, path, head, sent, openai):
    sock = socket.create_connection((srv.host, srv.port), timeout=BOUND)
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\n" + sent)
    status, headers, body = response_parts(read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close"
    message = body["error"]["message"] if openai else body["error"]
    assert "MLXLITE_BODY_TIMEOUT" in message
    if openai:
        assert body["error"]["type"] == "invalid_request_error"
    sock.close()
    wait_for(lambda: [r["status"] for r in srv.log_lines() if r.get("path") == path] == [408], what="log line")
    assert not list(srv.store.blob_dir.glob(".tmp-*"))     # the stalled upload left nothing behind
    still_serves(srv)


def test_a_slow_body_that_keeps_moving_is_served(store, monkeypatch):
    # The body timeout is per stall, not a total: 25 pieces 0.1 s apart against 2 s.
    monkeypatch.setenv("MLXLITE_BODY_TIMEOUT", "2")
    add_fake_model(store)
    with RunningServer(FakeEngine(), store) as srv:
        body = json.dumps({"model": "fake", "prompt": "hi", "stream": False, "pad": "x" * 200}).encode()
        sock = socket.create_connection((srv.host, srv.port), timeout=BOUND)
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        step = -(-len(body) // 25)
        for i in range(0, len(body), step):
            sock.sendall(body[i:i + step])
            time.sleep(0.1)
        status, _, reply = response_parts(read_until_closed(sock))
        assert status == 200 and reply["response"] == srv.engine.reply
        sock.close()


def test_idle_sockets_past_the_cap_get_503_and_never_pile_up_threads(store, monkeypatch):
    monkeypatch.setenv("MLXLITE_MAX_CONNECTIONS", "8")
    monkeypatch.setenv("MLXLITE_HEADER_TIMEOUT", "5")
    add_fake_model(store)
    with RunningServer(FakeEngine(), store) as srv:
        baseline = threading.active_count()
        held = [socket.create_connection((srv.host, srv.port), timeout=BOUND) for _ in range(8)]
        wait_for(lambda: threading.active_count() >= baseline + 8, what="a thread per held connection")
        flood = [socket.create_connection((srv.host, srv.port), timeout=BOUND) for _ in range(200)]
        for sock in flood:
            status, headers, body = response_parts(read_until_closed(sock))
            assert status == 503 and headers["connection"] == "close" and headers["retry-after"] == "1"
            assert "MLXLITE_MAX_CONNECTIONS" in body["error"]
            sock.close()
        assert threading.active_count() <= baseline + 8
        # A real client that sends its request first still reads the answer.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(srv.url + "/api/generate", data=b"{}"), timeout=BOUND)
        assert refused.value.code == 503 and "server busy" in json.loads(refused.value.read())["error"]
        # The held ones sent nothing: closed after the header timeout, their threads gone.
        assert all(read_until_closed(sock) == b"" for sock in held)
        wait_for(lambda: threading.active_count() <= baseline, BOUND, "the held connections' threads to end")
        refusals = [r for r in srv.log_lines() if r.get("status") == 503]
        assert len(refusals) == 201 and all("MLXLITE_MAX_CONNECTIONS" in r["error"] for r in refusals)
        metrics = urllib.request.urlopen(srv.url + "/metrics", timeout=BOUND).read().decode()
        assert 'mlxlite_requests_total{route="refused",status="503"} 201' in metrics
        for sock in held:
            sock.close()


def test_more_generate_requests_than_the_queue_holds_get_503_never_a_hang_or_500(store):
    from mlxlite.sched import Scheduler

    engine = FakeEngine(reply="abc", hold_after=1)
    add_fake_model(store)
    scheduler = Scheduler(store, engine, max_queue=2, num_parallel=2)
    with RunningServer(engine, store, scheduler=scheduler) as srv:
        answers: list[tuple[int, dict]] = []

        def client(i: int) -> None:
            conn = http.client.HTTPConnection(srv.host, srv.port, timeout=BOUND * 2)
            conn.request("POST", "/api/generate", json.dumps({"model": "fake", "prompt": f"p{i}", "stream": False}))
            resp = conn.getresponse()
            answers.append((resp.status, json.loads(resp.read())))
            conn.close()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(24)]
        for t in threads:
            t.start()
        # At most 2 decoding and 2 waiting: the other 20 or more are refused while they hold.
        wait_for(lambda: len(answers) >= 20, BOUND, "the refusals")
        assert all(status == 503 and "maximum pending requests" in body["error"] for status, body in answers)
        engine.resume.set()
        for t in threads:
            t.join(BOUND)
        assert not any(t.is_alive() for t in threads), "a request hung"
        statuses = sorted(status for status, _ in answers)
        assert len(statuses) == 24 and set(statuses) == {200, 503}
        assert all(body["response"] == "abc" for status, body in answers if status == 200)
        assert srv.scheduler.depth() == 0
        still_serves(srv)
        with urllib.request.urlopen(urllib.request.Request(
                srv.url + "/api/generate", json.dumps({"model": "fake", "prompt": "after", "stream": False}).encode()),
                timeout=BOUND) as resp:
            assert json.loads(resp.read())["response"] == "abc"
