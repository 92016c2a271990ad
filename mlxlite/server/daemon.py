"""The daemon: HTTP on `http.server.ThreadingHTTPServer`, one request's life, the process's.

Contract:
  - `RequestHandler` serves one connection: reads a request within the read clock, checks
    it (Host, CORS, key, size), finds its handler in `routes.ROUTES`, writes the `wire.Reply`
    or `wire.Stream` it returns (NDJSON or SSE, events named by their item's type when
    `named_events`; chunked, flushed per item, so lines reach the client as generated) and
    maps any exception through `errors.error_body`: before the first byte a real status,
    after it a final error line/event. Never a traceback on the wire (it goes to the log).
  - Security: Host-header check against DNS rebinding when bound to loopback; CORS for
    localhost origins plus `origins`; `api_key` on every request when set, as a bearer
    token or Anthropic's `x-api-key` (and required to bind a non-loopback address);
    bodies over `max_body_bytes` -> 413; a request with two Host headers, two framings
    (Content-Lengths that differ, or one with Transfer-Encoding), an unreadable header line or
    no HTTP version (0.9) -> 400; TCP_NODELAY on every connection.
  - Slow and many clients (`connections`): a request's line and headers must arrive within
    `header_timeout` (an idle keep-alive connection is closed after it), a body may stall
    at most `body_timeout` (408), a response has only a long write timeout; past
    `max_connections` open connections a new one gets a 503 from the accept loop.
  - One daemon per store: `make_server` holds `lock.DaemonLock` until `server_close`.
  - One JSON log line per request (id, method, path, model, status, tokens, durations,
    client) to stderr or `log_file`; `serve_forever` adds one per model load (with its load
    time) and unload.
  - A client that disconnects (seen by polling its socket while waiting, or by a failed
    write) cancels its job. Entry points: `make_server(host_port)` and `serve_forever`.
This module never imports mlx: the scheduler imports the runner on its own thread.
"""

from __future__ import annotations

import hmac
import io
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO
from urllib.parse import urlsplit

from mlxlite import __version__, config
from mlxlite.errors import (
    BadRequest,
    Busy,
    Forbidden,
    MlxliteError,
    RequestTimeout,
    Unauthorized,
)
from mlxlite.sched import ClientGone, Scheduler
from mlxlite.server.connections import Gate, ReadClock, minimal_response
from mlxlite.server.context import App, RequestContext, is_anthropic
from mlxlite.server.errors import error_body
from mlxlite.server.lock import DaemonLock
from mlxlite.server.routes import ROUTES
from mlxlite.server.rules import host_allowed, is_loopback, match, origin_allowed, parse_host_port
from mlxlite.server.wire import Reply, Stream
from mlxlite.store import Store

__all__ = ["MlxliteServer", "RequestHandler", "make_server", "serve_forever"]

SHUTDOWN_SECONDS = 60.0     # for the MLX thread to finish its step, unload and save caches


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"mlxlite/{__version__}"
    sys_version = ""
    timeout = None                     # the read clock times each phase instead
    # TCP_NODELAY: a response's head and body (and each streamed chunk) are separate writes;
    # under Nagle's algorithm each waited for the client's delayed ACK, ~40 ms per keep-alive request.
    disable_nagle_algorithm = True
    server: MlxliteServer

    def log_message(self, format: str, *args: Any) -> None:
        pass                           # replaced by one JSON line per request

    def setup(self) -> None:
        super().setup()
        self.rfile.close()             # the socket's own reader, replaced by the clock's
        self.clock = ReadClock(self.connection)
        self.rfile = io.BufferedReader(self.clock)

    def handle_one_request(self) -> None:
        self.requestline, self.command, self.request_version = "", "", "HTTP/0.9"  # for a 408 before parsing
        self.clock.headers(self.server.header_timeout)
        try:
            super().handle_one_request()
        except RequestTimeout as exc:  # only the header phase gets here: _dispatch answers the body's
            self.close_connection = True
            if self.clock.partial:     # half a request: say why; an idle keep-alive just closes
                self.send_error(408, str(exc))
                self.server.app.log({"time": round(time.time(), 3), "method": self.command or "-",
                                     "status": 408, "error": str(exc), "client": self.client_address[0]})

    def parse_request(self) -> bool:
        """http.server's parser without three leniencies: empty lines before the request line
        are skipped (RFC 9112 §2.2; it closed the connection without a word), HTTP/0.9 (no
        version) is a 400 (it got a bare body back, no status line), and a header line the
        parser cannot read is a 400 (it silently dropped that line and every header after it)."""
        for _ in range(8):
            if self.raw_requestline not in (b"\r\n", b"\n"):
                break
            self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline.split()) == 2:
            self.send_error(400, "HTTP/0.9 requests are not supported: send HTTP/1.1")
            return False
        if not super().parse_request():
            return False
        if self.headers.defects:
            self.send_error(400, "malformed header line (no colon, or space before the colon)")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors http.server finds itself (bad request line, headers): JSON too."""
        self.close_connection = True
        self.clock.respond()
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"   # answer garbage with a real status line
        body = json.dumps({"error": message or self.responses.get(code, ("error",))[0]}).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # ---- one request ------------------------------------------------------------------------
    def _dispatch(self) -> None:
        app = self.server.app
        start = time.perf_counter()
        ctx = RequestContext.__new__(RequestContext)
        ctx.log, ctx.openai, ctx.path = {}, self.path.startswith("/v1/"), self.path
        ctx.anthropic = is_anthropic(self.path)
        status, route, error = 500, None, None
        self._cors: list[tuple[str, str]] = []
        self._sent = False
        self._rid = ""
        self.clock.body(self.server.body_timeout)
        try:
            self._rid = f"{next(app.ids):x}"
            ctx.__init__(self, app, self._rid)
            self._guard(ctx)
            if self.command == "OPTIONS":
                status = self._preflight()
                return
            handler, route, ctx.params = match(app.routes, self.command, ctx.path)
            result = handler(ctx)
            status = self._send(ctx, result)
        except ClientGone:
            status, error = 499, "client disconnected"
            self.close_connection = True
        except Exception as exc:
            status, body = error_body(exc, ctx.openai, ctx.anthropic)
            if not isinstance(exc, MlxliteError):
                ctx.log["traceback"] = traceback.format_exc()
            error = str(body["error"]["message"] if ctx.openai else body["error"])
            if getattr(ctx, "body_pending", False):
                self.close_connection = True    # announced: the unread body ends this connection
            if not self._sent:
                extra = [("WWW-Authenticate", "Bearer")] if status == 401 else []
                try:
                    self._write_whole(status, json.dumps(body).encode(), "application/json; charset=utf-8",
                                      extra)
                except OSError:         # the client left before its error could be sent
                    self.close_connection = True
            else:
                self.close_connection = True
        finally:
            if getattr(ctx, "body_pending", False):
                self.close_connection = True    # unread body bytes would poison keep-alive
            with app.log_lock:      # `+=` on a Counter is not atomic across threads
                app.request_counts[(route or "unmatched", status)] += 1
            record = {"time": round(time.time(), 3), "id": getattr(ctx, "id", "-"), "method": self.command,
                      "path": ctx.path.split("?")[0], "status": status,
                      "duration_ms": round((time.perf_counter() - start) * 1e3, 2),
                      "client": self.client_address[0] if self.client_address else ""}
            record.update(ctx.log)
            if error:
                record["error"] = error
            app.log(record)

    def _guard(self, ctx: RequestContext) -> None:
        app = self.server.app
        if len(self.headers.get_all("Host") or ()) > 1:
            # Which one counts would be a guess (a proxy may read the other): RFC 9112 says 400.
            raise BadRequest("more than one Host header")
        # An absolute-form target's own host is the one that counts (RFC 9112 §3.2.2).
        host = urlsplit(self.path).netloc or self.headers.get("Host")
        if app.check_host and not host_allowed(host):
            raise Forbidden(f"host {host!r} is not allowed (DNS rebinding protection)")
        origin = self.headers.get("Origin")
        if origin:
            if not origin_allowed(origin, app.origins):
                raise Forbidden(f"origin {origin!r} is not allowed (set MLXLITE_ORIGINS)")
            self._cors = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        if app.api_key and self.command != "OPTIONS":
            auth = self.headers.get("Authorization") or ""
            scheme, _, token = auth.partition(" ")
            # Anthropic's clients send the key as x-api-key; either header may carry it.
            keys = [token.strip() if scheme.lower() == "bearer" else "", (self.headers.get("x-api-key") or "").strip()]
            if not any(k and hmac.compare_digest(k.encode(), app.api_key.encode()) for k in keys):
                raise Unauthorized("missing or wrong API key (Authorization: Bearer ... or x-api-key)")

    def _preflight(self) -> int:
        asked = self.headers.get("Access-Control-Request-Headers")
        allow = asked or "Authorization, Content-Type, User-Agent, Accept, X-Requested-With"
        extra = [("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"),
                 ("Access-Control-Allow-Headers", allow), ("Access-Control-Max-Age", "43200")]
        self._write_whole(204, b"", None, extra)
        return 204

    def _write_whole(self, status: int, body: bytes, content_type: str | None,
                     extra: list[tuple[str, str]] | tuple = ()) -> None:
        self.clock.respond()
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in [*self._cors, *extra]:
            self.send_header(key, value)
        if getattr(self, "_rid", None):
            self.send_header("X-Request-Id", self._rid)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._sent = True
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send(self, ctx: RequestContext, result: Reply | Stream) -> int:
        if isinstance(result, Reply):
            body, ctype = result.body, result.content_type
            if body is None:
                data = b""
            elif isinstance(body, (bytes, memoryview)):   # a memoryview: a mapped blob (server/dist.py)
                data = body
            elif isinstance(body, str):
                data = body.encode()
                ctype = ctype or "text/plain; charset=utf-8"
            else:
                data = json.dumps(body, separators=(",", ":")).encode()
                ctype = ctype or "application/json; charset=utf-8"
            self._write_whole(result.status, data, ctype, list(result.headers))
            return result.status
        return self._stream(ctx, result)

    def _stream(self, ctx: RequestContext, stream: Stream) -> int:
        items = stream.items
        close = getattr(items, "close", None)
        try:
            # Pull the first item before any header: errors until then get a real status.
            try:
                first = next(items)
            except StopIteration:
                first = None
            self.clock.respond()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream" if stream.sse else "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Request-Id", ctx.id)
            for key, value in self._cors:
                self.send_header(key, value)
            self.end_headers()
            self._sent = True
            status = 200
            try:
                if first is not None:
                    self._chunk(self._frame(first, stream.sse, stream.named_events))
                    for item in items:
                        self._chunk(self._frame(item, stream.sse, stream.named_events))
            except (ClientGone, BrokenPipeError, ConnectionResetError):
                raise ClientGone() from None
            except Exception as exc:  # after the first byte: a final error line, status stays 200
                status, body = error_body(exc, ctx.openai, ctx.anthropic)
                ctx.log["error"] = str(body["error"]["message"] if ctx.openai else body["error"])
                if not isinstance(exc, MlxliteError):
                    ctx.log["traceback"] = traceback.format_exc()
                self._chunk(self._frame(body, stream.sse, stream.named_events))
            if stream.done_marker:
                self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            return status
        except (BrokenPipeError, ConnectionResetError):
            raise ClientGone() from None
        finally:
            if close is not None:
                close()       # cancels the job if it is still running

    @staticmethod
    def _frame(item: Any, sse: bool, named: bool = False) -> bytes:
        data = json.dumps(item, separators=(",", ":")).encode()
        if sse and named:   # Anthropic's and OpenAI Responses' streams: named by type; an error frame by "error"
            kind = item.get("type") if isinstance(item, dict) else None
            return b"event: " + str(kind or "error").encode() + b"\ndata: " + data + b"\n\n"
        return b"data: " + data + b"\n\n" if sse else data + b"\n"

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


class MlxliteServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: App, family: int = socket.AF_INET, *,
                 header_timeout: float = 5.0, body_timeout: float = 30.0, max_connections: int = 256,
                 lock: DaemonLock | None = None) -> None:
        self.address_family = family
        self.app = app
        self.lock = lock
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.gate = Gate(max_connections)
        busy = Busy(f"server busy: {max_connections} connections open, the most allowed (MLXLITE_MAX_CONNECTIONS)")
        self._busy = str(error_body(busy)[1]["error"])
        self._refusal = minimal_response(503, "Service Unavailable", json.dumps(error_body(busy)[1]).encode(),
                                         (("Retry-After", "1"),))
        super().__init__(address, RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection up to `max_connections`; past it a 503 from this loop."""
        if not self.gate.enter():
            self.gate.refuse(request, self._refusal)
            with self.app.log_lock:
                self.app.request_counts[("refused", 503)] += 1
            self.app.log({"time": round(time.time(), 3), "status": 503, "error": self._busy,
                          "client": client_address[0] if client_address else ""})
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.gate.leave()          # no thread started: the connection is closed by the caller
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.gate.leave()

    def service_actions(self) -> None:
        self.gate.sweep()              # refused connections lingering past their moment

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that breaks outside a request is routine; anything else is logged
        as one JSON line (never printed as a bare traceback)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        self.app.log({"time": round(time.time(), 3), "client": client_address[0] if client_address else "",
                      "error": f"unhandled {type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def close(self) -> None:
        self.shutdown_safe()
        self.app.scheduler.close()
        self.server_close()

    def server_close(self) -> None:
        super().server_close()
        self.gate.close()
        if self.lock is not None:
            self.lock.release()

    def shutdown_safe(self) -> None:
        if getattr(self, "_serving", False):
            self.shutdown()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving = False


def make_server(host_port: str | None = None, *, store: Any = None, scheduler: Scheduler | None = None,
                engine: Any = None, api_key: str | None = None, origins: list[str] | None = None,
                max_body: int | None = None, log_stream: TextIO | None = None,
                header_timeout: float | None = None, body_timeout: float | None = None,
                max_connections: int | None = None) -> MlxliteServer:
    """A bound (not yet serving) server; `server.url` says where. Settings from config.py
    unless given. Refuses a non-loopback address without an API key."""
    host, port = parse_host_port(host_port)
    given = {"header_timeout": header_timeout, "body_timeout": body_timeout, "max_connections": max_connections}
    limits = {key: config.get(key) if value is None else value for key, value in given.items()}
    for key, value in limits.items():
        if not value > 0:
            raise BadRequest(f"{key} (MLXLITE_{key.upper()}) must be positive, got {value!r}")
    api_key = config.get("api_key") if api_key is None else api_key
    loopback = is_loopback(host)
    if not loopback and not api_key:
        raise BadRequest(f"refusing to listen on {host}: a non-loopback address needs an API key "
                         "(set MLXLITE_API_KEY)")
    store = store or Store()
    scheduler = scheduler or Scheduler(store, engine)
    log_stream = log_stream
    if log_stream is None and config.get("log_file"):
        log_stream = open(config.get("log_file"), "a", buffering=1)  # noqa: SIM115 (lives as long as the server)
    app = App(store, scheduler, api_key=api_key,
              origins=config.get("origins") if origins is None else origins,
              max_body=int(config.get("max_body_bytes")) if max_body is None else max_body,
              check_host=loopback, log_stream=log_stream, routes=ROUTES)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if host == "localhost":
        host = "127.0.0.1"
    lock = DaemonLock(store.root)
    lock.acquire()  # before the scheduler starts: a refused daemon loads nothing
    try:
        server = MlxliteServer((host, port), app, family, **limits, lock=lock)
    except OSError as exc:
        lock.release()
        raise MlxliteError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    lock.announce(server.url)
    scheduler.start()
    return server


def serve_forever(host_port: str | None = None, **kwargs: Any) -> int:
    """Run the daemon until SIGINT/SIGTERM, then stop cleanly: what runs is cancelled, every
    model unloaded (prefix caches saved), the MLX thread ended before the interpreter exits.
    Returns an exit status for the CLI: 0, or 1 when the MLX thread did not stop in time."""
    server = make_server(host_port, **kwargs)
    scheduler = server.app.scheduler
    engine = kwargs.get("engine")
    if hasattr(engine, "attach"):   # a distributed group starts once the daemon's address is known
        try:
            engine.attach(server.url)
        except BaseException:
            scheduler.close(timeout=SHUTDOWN_SECONDS)
            server.server_close()
            raise
    if getattr(scheduler, "on_event", False) is None:
        scheduler.on_event = server.app.log     # model loads (with their load time) and unloads
    print(f"mlxlite {__version__} listening on {server.url}", file=sys.stderr, flush=True)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stopped = scheduler.close(timeout=SHUTDOWN_SECONDS)
        if hasattr(engine, "shutdown"):
            engine.shutdown()
        server.server_close()
    if stopped is False:
        # Exiting the interpreter under a thread still inside MLX aborts the process: leave at once.
        print(f"error: the MLX thread did not stop within {SHUTDOWN_SECONDS:.0f} s; exiting without it",
              file=sys.stderr, flush=True)
        os._exit(1)
    return 0
