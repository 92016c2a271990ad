"""Connection limits: how long a client may take to send a request, and how many may be open.

Owns `ReadClock`, a connection's raw reader with a clock per phase of a request:
  - headers: one deadline (`header_timeout`) for the request line and headers, counted
    from when the server starts waiting (a new connection, or a kept-alive one after its
    last response), so a client dribbling a byte at a time cannot stretch it;
  - body: at most `body_timeout` seconds without a byte (a slow upload that keeps
    moving is fine; one that stalls is a 408);
  - respond: a long write timeout only, so a slow generation never cuts a stream (no
    socket call waits while the model works).
and `Gate`, the cap on open connections: past it the accept loop answers a minimal
response itself, shuts the connection for writing and lets it linger a moment (so a
client that sends its request first still reads the answer, rather than a reset) before
closing it; no thread is ever spent on a refused connection.
Never parses or routes requests (`daemon` does) and never imports anything above the
ground floor.
"""

from __future__ import annotations

import collections
import io
import socket
import threading
import time

from mlxlite.errors import RequestTimeout

__all__ = ["WRITE_TIMEOUT", "Gate", "ReadClock", "minimal_response"]

# A client that reads nothing for this long while its response waits in a full socket
# buffer is gone; generation time never counts, no socket call waits on the model.
WRITE_TIMEOUT = 600.0


class ReadClock(io.RawIOBase):
    """The socket as a raw reader (wrap it in `io.BufferedReader`), timed per phase."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.received = 0               # bytes read from the socket, all phases
        self._phase = "respond"
        self._limit = 0.0
        self._deadline: float | None = None
        self._mark = 0

    def headers(self, timeout: float) -> None:
        """Start waiting for a request: the line and headers must be in within `timeout`."""
        self._phase, self._limit, self._mark = "headers", timeout, self.received
        self._deadline = time.monotonic() + timeout

    def body(self, timeout: float) -> None:
        """Headers are in: the body may take as long as it needs, `timeout` per byte."""
        self._phase, self._limit, self._deadline = "body", timeout, None
        self.sock.settimeout(timeout)

    def respond(self) -> None:
        """A response is going out: only the long write timeout from now on."""
        self._phase, self._deadline = "respond", None
        self.sock.settimeout(WRITE_TIMEOUT)

    @property
    def partial(self) -> bool:
        """True when some of a request arrived in this header phase (an idle keep-alive
        connection that times out is closed quietly; a half-sent request gets a 408)."""
        return self.received > self._mark

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._deadline is not None:
            # Past the deadline, what has already arrived still counts: on a loaded machine the
            # server can be the slow one (a request sent at once was closed unanswered).
            self.sock.settimeout(max(0.0, self._deadline - time.monotonic()))
        try:
            n = self.sock.recv_into(buffer)
        except (TimeoutError, BlockingIOError):
            raise self._expired() from None
        self.received += n
        return n

    def _expired(self) -> RequestTimeout:
        if self._phase == "headers":
            return RequestTimeout(f"request headers not received within {self._limit:g}s "
                                  "(MLXLITE_HEADER_TIMEOUT)")
        if self._phase == "body":
            return RequestTimeout(f"request body stalled: no byte for {self._limit:g}s (MLXLITE_BODY_TIMEOUT)")
        return RequestTimeout(f"read timed out after {WRITE_TIMEOUT:g}s")


def minimal_response(status: int, reason: str, body: bytes,
                     headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, as bytes to send in one call."""
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json; charset=utf-8",
             f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Gate:
    """At most `limit` connections open; `refuse` answers the rest from the accept loop."""

    def __init__(self, limit: int, *, linger: float = 1.0, max_lingering: int = 64) -> None:
        self.limit = limit
        self.linger = linger
        self.max_lingering = max_lingering
        self.open = 0
        self._lock = threading.Lock()   # `enter` runs on the accept loop, `leave` on handler threads
        self._lingering: collections.deque[tuple[float, socket.socket]] = collections.deque()

    def enter(self) -> bool:
        """Count a new connection in; False (counting nothing) when `limit` are open."""
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.open -= 1

    def refuse(self, sock: socket.socket, response: bytes) -> None:
        """Send `response` without blocking (it fits the new socket's empty send buffer),
        shut the socket for writing and keep it a moment: closing it at once would reset a
        client still sending its request, and the reset can beat the answer."""
        try:
            sock.setblocking(False)
            sock.send(response)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            _close(sock)
            return
        self._lingering.append((time.monotonic() + self.linger, sock))
        self.sweep()

    def sweep(self) -> None:
        """Close refused connections whose moment is over (the oldest first past `max_lingering`)."""
        now = time.monotonic()
        while self._lingering and (self._lingering[0][0] <= now or len(self._lingering) > self.max_lingering):
            _close(self._lingering.popleft()[1])

    def close(self) -> None:
        while self._lingering:
            _close(self._lingering.popleft()[1])


def _close(sock: socket.socket) -> None:
    """Close after reading what the client sent: unread bytes would turn the close into a reset."""
    try:
        for _ in range(16):             # bounded: a client streaming a body gets its reset
            if not sock.recv(65536):
                break
    except OSError:
        pass
    sock.close()
