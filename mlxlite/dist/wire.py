"""The control channel between the daemon and its ranks: length-prefixed pickled frames.

Owns framing (`send`, `recv`), the hello each rank opens with (`hello`, `check_hello`:
the group's secret, so only ranks this daemon launched may talk to it), which calls rank 0
answers alone (`LOCAL`) and the one-byte wake-up (`GO`) that sends ranks 1..N-1 into the
next broadcast. Tensors never travel
here: a step's work goes from the daemon to rank 0 on this channel and from rank 0 to the
other ranks over `mx.distributed` (`engine/distributed.py`). Never imports mlx.
"""

from __future__ import annotations

import hmac
import pickle
import socket
import struct
from typing import Any

from mlxlite.errors import RankLost

_LEN = struct.Struct("<Q")
LOCAL = frozenset({"tokenize", "detokenize", "token_bytes", "ping"})   # rank 0 answers alone: no collective
GO = b"\x01"   # the daemon to ranks 1..N-1: a broadcast follows (they wait on a socket, not a spinning collective)
MAX_FRAME = 1 << 31


class ChannelClosed(RankLost):
    """The other end went away (its process died, or it closed the connection)."""


def send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        sock.sendall(_LEN.pack(len(data)) + data)
    except OSError as exc:
        raise ChannelClosed(f"connection lost ({exc.strerror or exc})") from None


def read_exact(sock: socket.socket, n: int) -> bytes:
    return _read(sock, n)


def _read(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except TimeoutError:
            raise
        except OSError as exc:
            raise ChannelClosed(f"connection lost ({exc.strerror or exc})") from None
        if not chunk:
            raise ChannelClosed("connection closed")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def recv(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(_read(sock, _LEN.size))
    if n > MAX_FRAME:
        raise ChannelClosed(f"frame of {n} bytes refused")
    return pickle.loads(_read(sock, n))


def hello(sock: socket.socket, secret: str, rank: int, role: str, info: dict) -> None:
    """A rank's first frame: raw bytes (not pickle) for the secret, then its details."""
    token = secret.encode()
    sock.sendall(_LEN.pack(len(token)) + token)
    send(sock, {"rank": rank, "role": role, **info})


def check_hello(sock: socket.socket, secret: str) -> dict:
    """The daemon's side: the secret must match before anything is unpickled."""
    (n,) = _LEN.unpack(_read(sock, _LEN.size))
    if n > 256:
        raise ChannelClosed("bad hello")
    if not hmac.compare_digest(_read(sock, n), secret.encode()):
        raise ChannelClosed("bad secret")
    info = recv(sock)
    if not isinstance(info, dict):
        raise ChannelClosed("bad hello")
    return info
