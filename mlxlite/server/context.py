"""What every request's handler sees: the app's shared state (`App`: store, scheduler, keys,
origins, routes, log) and the request itself (`RequestContext`: its JSON body, params,
log fields, and whether its client went away). Never imports mlx.
"""


from __future__ import annotations

import itertools
import json
import select
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from mlxlite.errors import (
    BadRequest,
    PayloadTooLarge,
)
from mlxlite.sched import Scheduler
from mlxlite.server.wire import replace_lone_surrogates


class App:
    def __init__(self, store: Any, scheduler: Scheduler, *, api_key: str = "", origins: list[str] | None = None,
                 max_body: int = 32 << 20, check_host: bool = True, log_stream: TextIO | None = None,
                 routes: dict) -> None:
        self.store = store
        self.scheduler = scheduler
        self.api_key = api_key
        self.origins = list(origins or [])
        self.max_body = max_body
        self.check_host = check_host
        self.routes = routes
        self.log_stream = log_stream
        self.log_lock = threading.Lock()
        self.request_counts: Counter = Counter()
        self.started = time.time()
        self.ids = itertools.count(1)

    def log(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        with self.log_lock:
            stream = self.log_stream or sys.stderr
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass


class RequestContext:
    """What a handler sees of one request."""

    def __init__(self, handler: BaseHTTPRequestHandler, app: App, rid: str) -> None:
        self.handler = handler
        self.app = app
        self.id = rid
        self.method = handler.command
        url = urlsplit(handler.path)
        self.path = url.path
        self.query = parse_qs(url.query)
        self.headers = handler.headers
        self.params: dict[str, str] = {}
        self.log: dict[str, Any] = {}
        self.openai = self.path.startswith("/v1/")
        self.anthropic = is_anthropic(self.path)
        self.body_pending = self._length() > 0 or "Transfer-Encoding" in self.headers
        self._body: Any = None
        self._read = False

    def _length(self) -> int:
        values = self.headers.get_all("Content-Length") or []
        if len({v.strip() for v in values}) > 1 or (values and "Transfer-Encoding" in self.headers):
            # Two framings: which one a proxy in front used is a guess (request smuggling), RFC 9112 §6.3.
            self.handler.close_connection = True
            raise BadRequest("conflicting Content-Length / Transfer-Encoding headers")
        value = self.headers.get("Content-Length")
        if value is None:
            return 0
        try:
            n = int(value.strip())
        except ValueError:
            n = -1
        if n < 0 or not value.strip().isdigit():
            self.handler.close_connection = True
            raise BadRequest("invalid Content-Length header")
        return n

    def body(self) -> bytes:
        """The raw body (at most `max_body_bytes`)."""
        if self._read:
            return self._body
        if "Transfer-Encoding" in self.headers:
            self.handler.close_connection = True
            raise BadRequest("chunked request bodies are not supported: send Content-Length")
        n = self._length()
        if n > self.app.max_body:
            self.handler.close_connection = True
            raise PayloadTooLarge(f"request body is {n} bytes, more than the limit of {self.app.max_body} "
                                  "(MLXLITE_MAX_BODY_BYTES)")
        data = self.handler.rfile.read(n) if n else b""
        if len(data) != n:  # the client shut its side: it may still read why
            self.handler.close_connection = True
            raise BadRequest(f"request body ended after {len(data)} of {n} bytes (Content-Length)")
        self._read, self._body, self.body_pending = True, data, False
        return data

    def json(self) -> Any:
        """The body as JSON (None when empty); 400 on anything that isn't JSON."""
        data = self.body()
        if not data.strip():
            return None
        try:
            value = json.loads(data, parse_constant=_no_constant)
        except RecursionError:
            raise BadRequest("invalid JSON: nested too deeply") from None
        except ValueError as exc:
            raise BadRequest(f"invalid JSON: {exc}") from None
        return replace_lone_surrogates(value, data)

    def gone(self) -> bool:
        """True when the client has closed its connection (polled while we wait)."""
        sock = self.handler.connection
        try:
            poller = select.poll()  # not select.select: a descriptor past 1023 raised, read as "gone"
            poller.register(sock, select.POLLIN)
            if not poller.poll(0):
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


def is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith(("/v1/messages/", "/v1/messages?"))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
