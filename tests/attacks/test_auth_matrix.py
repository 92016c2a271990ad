"""The auth matrix, over a real socket: with MLXLITE_API_KEY set, every route of the daemon's
ROUTES table (native, OpenAI, Responses, Anthropic, pull/push, create/blobs) x seven ways of
sending (or not) the key x {loopback Host, a foreign Host (DNS rebinding)} x {no Origin, an
allowed Origin, a foreign Origin}, plus a CORS preflight of every route x Host x Origin.

Expected, for each probe: a foreign Host is 403 whatever else is sent; then a foreign Origin
is 403; then a missing or wrong key is 401 with `WWW-Authenticate: Bearer`, in the route's
own error shape (OpenAI's or Anthropic's on theirs); a right key gets exactly what the same
request gets from the daemon with no key set. An allowed Origin is echoed in
Access-Control-Allow-Origin on every answer, refusals included (a browser app must be able
to read why). A preflight needs no key. Nothing a refused probe sent reaches a handler.
"""

from __future__ import annotations

import http.client
import json

import pytest

from mlxlite.server.routes import ROUTES
from tests.fake_engine import FakeEngine, RunningServer, add_fake_model

KEY = "s3cret-key"
ALLOWED = "https://ui.example"       # in MLXLITE_ORIGINS
AUTH = {                             # name: (headers, accepted)
    "no key": ({}, False),
    "wrong bearer": ({"Authorization": "Bearer nope"}, False),
    "right bearer": ({"Authorization": f"Bearer {KEY}"}, True),
    "right bearer, lowercase scheme": ({"Authorization": f"bearer {KEY}"}, True),
    "key as Basic credentials": ({"Authorization": f"Basic {KEY}"}, False),
    "right x-api-key": ({"x-api-key": KEY}, True),
    "wrong x-api-key": ({"x-api-key": KEY + "x"}, False),
    "wrong bearer, right x-api-key": ({"Authorization": "Bearer nope", "x-api-key": KEY}, True),
    "key prefix only": ({"Authorization": f"Bearer {KEY[:-1]}"}, False),
}
HOSTS = {"loopback": None, "foreign": "evil.example:11435"}
ORIGINS = {"none": None, "localhost": "http://localhost:5173", "allowed": ALLOWED, "foreign": "https://evil.example"}


def _path(pattern: str) -> str:
    return pattern.replace("{model*}", "fake").replace("{digest}", "sha256:" + "0" * 64)


class Prober:
    """One keep-alive connection, reopened whenever the server closes it."""

    def __init__(self, srv: RunningServer) -> None:
        self.srv = srv
        self.conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        self.count = 0

    def __call__(self, method: str, path: str, headers: dict) -> tuple[int, dict, bytes]:
        self.count += 1
        for attempt in range(2):
            try:
                self.conn.request(method, path, headers=headers)
                resp = self.conn.getresponse()
                body = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _error_shape(path: str, body: bytes, status: int) -> str | None:
    """What is wrong with an error body for `path` (None when it is the route's shape)."""
    data = json.loads(body)
    if path.startswith("/v1/messages"):
        want = {401: "authentication_error", 403: "permission_error"}[status]
        ok = data.get("type") == "error" and data["error"]["type"] == want and data["error"]["message"]
    elif path.startswith("/v1/"):
        want = {401: "authentication_error", 403: "permission_error"}[status]
        ok = data["error"]["type"] == want and data["error"]["message"]
    else:
        ok = isinstance(data.get("error"), str) and data["error"]
    return None if ok else f"{path}: {status} body {data}"


@pytest.fixture
def srv(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(), store, api_key=KEY, origins=[ALLOWED]) as s:
        yield s


def test_every_route_times_every_key_host_and_origin(srv, tally):
    probe = Prober(srv)
    loopback = f"127.0.0.1:{srv.port}"
    routes = sorted(ROUTES)
    # What each request gets with no key configured: a right key must get exactly that.
    srv.app.api_key = ""
    reference = {(m, p): probe(m, _path(p), {"Host": loopback})[0] for m, p in routes}
    srv.app.api_key = KEY
    before = [(e.name.display, e.digest) for e in srv.store.list()]
    wrong: list[str] = []
    for method, pattern in routes:
        path = _path(pattern)
        for auth, (auth_headers, accepted) in AUTH.items():
            for host_kind, host in HOSTS.items():
                for origin_kind, origin in ORIGINS.items():
                    headers = {"Host": host or loopback, **auth_headers}
                    if origin:
                        headers["Origin"] = origin
                    status, head, body = probe(method, path, headers)
                    where = f"{method} {path} [{auth}, {host_kind} Host, {origin_kind} Origin]"
                    if host_kind == "foreign" or origin_kind == "foreign":
                        want = 403
                    elif not accepted:
                        want = 401
                    else:
                        want = reference[(method, pattern)]
                    if status != want:
                        wrong.append(f"{where}: {status}, expected {want}: {body[:200]!r}")
                        continue
                    if status in (401, 403) and method != "HEAD":
                        problem = _error_shape(path, body, status)
                        if problem:
                            wrong.append(f"{where}: {problem}")
                        if status == 403 and host_kind == "foreign" and "DNS rebinding" not in body.decode():
                            wrong.append(f"{where}: a foreign Host's 403 does not say why")
                    if status == 401 and head.get("www-authenticate") != "Bearer":
                        wrong.append(f"{where}: 401 without WWW-Authenticate: Bearer")
                    if origin_kind in ("localhost", "allowed") and host_kind == "loopback":
                        if head.get("access-control-allow-origin") != origin:
                            wrong.append(f"{where}: the allowed Origin is not echoed ({head})")
                    elif "access-control-allow-origin" in head:
                        wrong.append(f"{where}: CORS allowed for {origin_kind} Origin")
    assert not wrong, f"{len(wrong)} of {probe.count} probes answered wrong:\n" + "\n".join(wrong[:30])
    # Refused or not, nothing ran and nothing changed (the accepted probes had no body: 4xx too).
    assert srv.engine.started == 0
    assert [(e.name.display, e.digest) for e in srv.store.list()] == before
    assert not [r for r in srv.log_lines() if "traceback" in r]
    tally.add("auth matrix (routes x key x Host x Origin)", tried=probe.count, faults=probe.count - len(routes),
              checks=probe.count)


def test_a_cors_preflight_of_every_route_needs_no_key_and_names_what_is_allowed(srv, tally):
    probe = Prober(srv)
    loopback = f"127.0.0.1:{srv.port}"
    wrong = []
    for path in sorted({_path(p) for _, p in ROUTES}):
        for host_kind, host in HOSTS.items():
            for origin_kind, origin in ORIGINS.items():
                headers = {"Host": host or loopback, "Access-Control-Request-Method": "POST",
                           "Access-Control-Request-Headers": "authorization,content-type"}
                if origin:
                    headers["Origin"] = origin
                status, head, _ = probe("OPTIONS", path, headers)
                where = f"OPTIONS {path} [{host_kind} Host, {origin_kind} Origin]"
                if host_kind == "foreign" or origin_kind == "foreign":
                    if status != 403:
                        wrong.append(f"{where}: {status}, expected 403")
                    continue
                if status != 204:
                    wrong.append(f"{where}: {status}, expected 204")
                elif "POST" not in head.get("access-control-allow-methods", "") or \
                        head.get("access-control-allow-headers") != "authorization,content-type":
                    wrong.append(f"{where}: does not name what is allowed: {head}")
                elif origin and head.get("access-control-allow-origin") != origin:
                    wrong.append(f"{where}: the Origin is not echoed")
    assert not wrong, "\n".join(wrong[:30])
    tally.add("auth matrix: CORS preflights", tried=probe.count, faults=probe.count, checks=probe.count)
