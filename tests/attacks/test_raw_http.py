"""Malformed HTTP at the socket level, byte for byte, against a real daemon (fake engine):
request lines (extra words, bad and unsupported versions, HTTP/0.9, unknown and lowercase
methods, absolute-form targets, NUL, CR, non-UTF-8 bytes, empty lines first), headers (too
many, too long, a line with no colon, space before the colon, obs-fold, bare LF, bare CR
trying to inject a response header), body framing (conflicting Content-Length headers,
Content-Length with Transfer-Encoding, a signed length, a body shorter or longer than its
length, malformed chunked encodings of a blob upload, an unknown transfer coding) and
pipelined requests. Each case names the statuses it must get, in order: a 4xx, or the 5xx
RFC 9110 names (501 for an unknown method or transfer coding, 505 for HTTP/2.0 on an HTTP/1
server), always a JSON error body; and the server keeps serving.

Cases marked `found` failed before the fix in the same commit (what they got is said).
"""

from __future__ import annotations

import http.client
import io
import json
import socket

import pytest

from tests.fake_engine import FakeEngine, RunningServer, add_fake_model

BOUND = 30.0
H = b"Host: 127.0.0.1\r\n"
BLOB = b"POST /api/blobs/sha256:" + b"0" * 64 + b" HTTP/1.1\r\n" + H
GEN = b'{"model":"fake","prompt":"hi","stream":false}'

# name: (bytes sent, statuses expected in order, half-close after sending)
CASES: dict[str, tuple[bytes, list[int], bool]] = {
    # ---- request lines
    "three words and more": (b"GET /api/tags HTTP/1.1 extra\r\n" + H + b"\r\n", [400], True),
    "HTTP/2.0 on an HTTP/1 server": (b"GET /api/tags HTTP/2.0\r\n" + H + b"\r\n", [505], True),
    "version HTTP/1": (b"GET /api/tags HTTP/1\r\n" + H + b"\r\n", [400], True),
    "version HTTP/x.y": (b"GET /api/tags HTTP/x.y\r\n" + H + b"\r\n", [400], True),
    "lowercase method": (b"get /api/tags HTTP/1.1\r\n" + H + b"\r\n", [501], True),
    "unknown method": (b"BREW /api/tags HTTP/1.1\r\n" + H + b"\r\n", [501], True),
    "a 5000-byte method": (b"A" * 5000 + b" / HTTP/1.1\r\n" + H + b"\r\n", [501], True),
    "a 70000-byte target": (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n" + H + b"\r\n", [414], True),
    "target without a slash": (b"GET api/tags HTTP/1.1\r\n" + H + b"\r\n", [404], True),
    "NUL in the target": (b"GET /api/tags\x00 HTTP/1.1\r\n" + H + b"\r\n", [404], True),
    "bytes that are not UTF-8": (b"GET /api/\xff\xfe HTTP/1.1\r\n" + H + b"\r\n", [404], True),
    "CR inside the request line": (b"GET /api/t\rags HTTP/1.1\r\n" + H + b"\r\n", [400], True),
    # found: 200 (the target's own host was never checked against DNS rebinding)
    "absolute-form target, foreign host": (b"GET http://evil.example/api/tags HTTP/1.1\r\n" + H + b"\r\n",
                                           [403], True),
    # found: the connection closed without an answer
    "an empty line before the request line": (b"\r\nGET /api/tags HTTP/1.1\r\n" + H + b"\r\n", [200], True),
    # found: a bare JSON body, no status line (and no Host check)
    "HTTP/0.9 GET": (b"GET /api/tags\r\n", [400], True),
    "HTTP/0.9 GET, the client waiting": (b"GET /api/tags\r\n", [400], False),
    "HTTP/0.9 POST": (b"POST /api/generate\r\n", [400], True),
    # ---- headers
    "101 headers": (b"GET /api/tags HTTP/1.1\r\n" + H + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n",
                    [431], True),
    "a 70000-byte header": (b"GET /api/tags HTTP/1.1\r\n" + H + b"X-Long: " + b"b" * 70000 + b"\r\n\r\n", [431], True),
    # found: 200 (the line, and every header after it, silently dropped: Host included)
    "a header line with no colon": (b"GET /api/tags HTTP/1.1\r\nNoColonHere\r\nHost: evil.example\r\n\r\n", [400], True),
    "space before the colon": (b"GET /api/tags HTTP/1.1\r\nHost : evil.example\r\n\r\n", [400], True),
    "two Host headers": (b"GET /api/tags HTTP/1.1\r\n" + H + b"Host: evil.example\r\n\r\n", [400], True),
    "bare CR smuggling a second Host": (b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\rHost: evil.example\r\n\r\n",
                                        [400], True),
    # ---- body framing
    # found: 200 (the first length read, the second ignored: request smuggling)
    "two different Content-Lengths": (b"POST /api/show HTTP/1.1\r\n" + H + b"Content-Length: 16\r\nContent-Length: 2\r\n"
                                      b'\r\n{"model":"fake"}', [400], True),
    "Content-Length and Transfer-Encoding": (b"POST /api/show HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n"
                                             b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", [400], True),
    "a signed Content-Length": (b"POST /api/show HTTP/1.1\r\n" + H + b"Content-Length: +2\r\n\r\n{}", [400], True),
    "Content-Length in hex": (b"POST /api/show HTTP/1.1\r\n" + H + b"Content-Length: 0x2\r\n\r\n{}", [400], True),
    # found: no answer (the short body was taken for a client gone)
    "a body shorter than its length": (b"POST /api/show HTTP/1.1\r\n" + H + b"Content-Length: 20\r\n\r\n{}", [400], True),
    "a body longer than its length": (b"POST /api/show HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\n{}GARBAGE\r\n\r\n",
                                      [400, 400], True),
    "a chunked body where JSON is read": (b"POST /api/generate HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                                          b"2\r\n{}\r\n0\r\n\r\n", [400], True),
    "blob upload, chunk size not hex": (BLOB + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", [400], True),
    # found: 500 (int("-5", 16) is -5, and a read of -5 bytes is an error)
    "blob upload, negative chunk size": (BLOB + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nabcde\r\n0\r\n\r\n",
                                         [400], True),
    "blob upload, chunk size 0x5": (BLOB + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nabcde\r\n0\r\n\r\n", [400], True),
    "blob upload, chunk longer than its size": (BLOB + b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcdeXX\r\n0\r\n\r\n",
                                                [400], True),
    "blob upload, a 2^72 chunk": (BLOB + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n", [400], True),
    "blob upload, a chunk cut short": (BLOB + b"Transfer-Encoding: chunked\r\n\r\nff\r\nabc", [400], True),
    # found: 400 "digest mismatch" (gzip ignored, the bytes taken as they came)
    "blob upload, Transfer-Encoding gzip": (BLOB + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n",
                                            [501], True),
    # ---- pipelining
    "two requests in one packet": (b"GET /api/version HTTP/1.1\r\n" + H + b"\r\nGET /api/tags HTTP/1.1\r\n" + H + b"\r\n",
                                   [200, 200], True),
    "fifty requests in one packet": ((b"GET /api/version HTTP/1.1\r\n" + H + b"\r\n") * 50, [200] * 50, True),
    "a good request, garbage, a good one": (b"GET /api/version HTTP/1.1\r\n" + H + b"\r\nGARBAGE\r\n\r\n"
                                            b"GET /api/tags HTTP/1.1\r\n" + H + b"\r\n", [200, 400], True),
    "a generation then a GET": (b"POST /api/generate HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(GEN) + GEN
                                + b"GET /api/version HTTP/1.1\r\n" + H + b"\r\n", [200, 200], True),
}

# Well-formed oddities the server may accept: each must be served (2xx), never a 5xx or silence.
ACCEPTED = {
    "HTTP/1.2 (a later minor version)": b"GET /api/tags HTTP/1.2\r\n" + H + b"\r\n",
    "absolute-form target, loopback host": b"GET http://127.0.0.1/api/tags HTTP/1.1\r\n" + H + b"\r\n",
    "a leading double slash": b"GET //api/tags HTTP/1.1\r\n" + H + b"\r\n",
    "obs-fold continuation line": b"GET /api/tags HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n",
    "bare LF line ends": b"GET /api/tags HTTP/1.1\n" + H.replace(b"\r", b"") + b"\n",
    # Header injection: a bare CR in a value the server echoes (the preflight's asked headers,
    # the Origin) must not become a header of the response.
    "bare CR in the preflight's asked headers": b"OPTIONS /api/tags HTTP/1.1\r\n" + H + b"Origin: http://localhost:3000"
                                                b"\r\nAccess-Control-Request-Headers: content-type\rX-Injected: yes\r\n\r\n",
    "bare CR in the Origin": b"GET /api/tags HTTP/1.1\r\n" + H + b"Origin: app://x\rX-Injected: yes\r\n\r\n",
}


class _Kept(io.BytesIO):
    def close(self) -> None:
        pass                    # HTTPResponse closes its file after a `Connection: close` answer


class _Bytes:
    """Enough of a socket for http.client.HTTPResponse to parse bytes already received."""

    def __init__(self, data: bytes) -> None:
        self.file = _Kept(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self.file


def exchange(srv: RunningServer, data: bytes, half_close: bool = True) -> list[tuple[int, dict, bytes]]:
    """Send `data` as it is, then read every response until the server closes."""
    with socket.create_connection((srv.host, srv.port), timeout=BOUND) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    fake = _Bytes(received)
    out = []
    while fake.file.tell() < len(received):
        resp = http.client.HTTPResponse(fake)   # type: ignore[arg-type]
        try:
            resp.begin()
        except http.client.HTTPException:       # not an HTTP response: status 0, the bytes as its body
            out.append((0, {}, received))
            break
        out.append((resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()))
    return out


@pytest.fixture
def srv(store, monkeypatch):
    monkeypatch.setenv("MLXLITE_HEADER_TIMEOUT", "2")
    monkeypatch.setenv("MLXLITE_BODY_TIMEOUT", "2")
    add_fake_model(store)
    with RunningServer(FakeEngine(), store) as s:
        yield s


def test_malformed_requests_get_their_status_and_the_server_keeps_serving(srv, tally):
    wrong, requests = [], 0
    for name, (data, want, half_close) in CASES.items():
        answers = exchange(srv, data, half_close)
        requests += len(want)
        got = [status for status, _, _ in answers]
        if got != want:
            wrong.append(f"{name}: got {got}, expected {want}")
            continue
        for status, head, body in answers:
            if status >= 400 and not (head.get("content-type", "").startswith("application/json")
                                      and json.loads(body).get("error")):
                wrong.append(f"{name}: {status} without a JSON error: {head} {body[:100]!r}")
    for name, data in ACCEPTED.items():
        answers = exchange(srv, data)
        requests += 1
        if [status // 100 for status, _, _ in answers] != [2]:
            wrong.append(f"{name}: got {[s for s, _, _ in answers]}, expected one 2xx")
        elif any("x-injected" in head for _, head, _ in answers):
            wrong.append(f"{name}: a request's bare CR became a response header")
    assert not wrong, "\n".join(wrong)
    # Still serving, nothing left running, nothing logged as a crash.
    assert exchange(srv, b"GET /api/tags HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n", False)[0][0] == 200
    assert srv.engine.active == 0 and srv.engine.started == 1      # the pipelined generation only
    assert not [r for r in srv.log_lines() if "traceback" in r]
    tally.add("malformed HTTP at the socket level", tried=requests, faults=requests - len(ACCEPTED),
              checks=requests + 3)


def test_responses_are_sent_with_nagle_off(srv, monkeypatch, tally):
    """found by the auth matrix's keep-alive prober: a response's head and body are two
    writes, and with Nagle's algorithm on, the body waited for the client's delayed ACK:
    ~40 ms per request on a kept-alive connection (and per streamed chunk)."""
    from mlxlite.server.daemon import RequestHandler

    seen: list[int] = []
    real = RequestHandler.setup

    def spy(self) -> None:
        real(self)
        seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(RequestHandler, "setup", spy)
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=BOUND)
    for _ in range(3):
        conn.request("GET", "/api/version")
        assert conn.getresponse().read()
    conn.close()
    assert seen and all(seen), f"TCP_NODELAY per connection: {seen}"
    tally.add("malformed HTTP at the socket level", tried=3, checks=1)


def test_a_request_that_arrived_in_time_is_read_even_when_the_server_is_late(tally):
    """found by the soak (bench/soak_attacks.py): on a loaded machine a handler thread could
    make its first read after the header deadline; the request, sent at once and waiting in
    the socket, counted as never sent, and the connection closed without an answer."""
    import time

    from mlxlite.errors import RequestTimeout
    from mlxlite.server.connections import ReadClock

    server_side, client = socket.socketpair()
    with server_side, client:
        clock = ReadClock(server_side)
        clock.headers(0.01)
        client.sendall(b"GET /api/tags HTTP/1.1\r\n\r\n")
        time.sleep(0.05)                     # the server is the slow one: past its own deadline
        buffer = bytearray(100)
        n = clock.readinto(buffer)
        assert bytes(buffer[:n]) == b"GET /api/tags HTTP/1.1\r\n\r\n"
        with pytest.raises(RequestTimeout, match="MLXLITE_HEADER_TIMEOUT"):
            clock.readinto(buffer)           # nothing more came: now the client is the slow one
    tally.add("malformed HTTP at the socket level", tried=1, checks=2)
