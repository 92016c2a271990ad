"""What the long soak (bench/soak_attacks.py) found, each played at its moment.

A few generations a minute were answered by a closed connection and logged as 499 "client
disconnected" while their clients waited: the daemon had ~500 descriptors open, most of them
prefix-cache files restored lazily at each model load (a lazy MLX array holds its file open
until it is evaluated), so new sockets got descriptors past 1023, where `select.select`
raises, and the disconnect check read the error as a client gone. And once, a blob upload
answered 500: a prune had taken its brand-new temp file.
"""

from __future__ import annotations

import os
import socket
import types
from pathlib import Path

import pytest

needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_client_on_a_descriptor_past_1023_is_not_taken_for_gone(tally):
    from mlxlite.server.context import RequestContext

    server_side, client = socket.socketpair()
    try:
        high = os.dup2(server_side.fileno(), 1500)
    except OSError:
        pytest.skip("cannot open descriptor 1500 here (RLIMIT_NOFILE)")
    conn = socket.socket(fileno=high)
    ctx = RequestContext.__new__(RequestContext)
    ctx.handler = types.SimpleNamespace(connection=conn)
    try:
        assert ctx.gone() is False          # waiting for its answer, nothing sent: still there
        client.sendall(b"x")
        assert ctx.gone() is False          # it sent more (a pipelined request): still there
        client.close()
        conn.recv(1)
        assert ctx.gone() is True           # now it has closed
        tally.add("the soak's finds, replayed at their moment", tried=3, faults=1, checks=3)
    finally:
        conn.close()
        server_side.close()
        client.close()


@needs_proc
def test_restored_prefix_caches_hold_no_file_open(tmp_path, tally):
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlxlite.engine.batch import load_cache, save_cache

    cache = []
    for _ in range(2):
        layer = KVCache()
        layer.update_and_fetch(mx.ones((1, 2, 3, 4)), mx.zeros((1, 2, 3, 4)))
        cache.append(layer)
    paths = []
    for i in range(20):
        paths.append(tmp_path / f"{i}.safetensors")
        save_cache(str(paths[-1]), cache, [1, 2, 3])
    before = _open_fds()
    restored = [load_cache(str(p)) for p in paths]   # what a model load does with the saved caches
    assert _open_fds() - before == 0, "each restored cache keeps its file open"
    for path in paths:
        path.unlink()                    # the next unload rewrites the folder: these must not matter
    for caches, tokens in restored:
        assert tokens == [1, 2, 3] and caches[0].keys.tolist() == cache[0].keys[..., :3, :].tolist()
    tally.add("the soak's finds, replayed at their moment", tried=20, faults=20, checks=21)


@needs_proc
def test_a_blob_upload_and_a_prune_at_the_same_moment(store, monkeypatch, tally):
    """A blob upload (POST /api/blobs/:digest) was the one store writer that did not hold the
    writer lock, so a prune in another process could take its temp file between its creation
    and its flock: a 500 (BlockingIOError in the soak), or the temp deleted under the upload.
    Here the prune comes at exactly that moment, if the store lets it run then."""
    import fcntl
    import hashlib
    import http.client

    from mlxlite.store import Store
    from tests.fake_engine import FakeEngine, RunningServer

    real_flock = fcntl.flock
    pruned = []

    def prune_first(fd, operation):
        if not pruned and "/blobs/sha256/.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            pruned.append(False)
            with open(store.root / ".lock", "a+b") as probe:
                try:
                    real_flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass                     # an upload holds the writer lock: a prune waits
                else:
                    real_flock(probe.fileno(), fcntl.LOCK_UN)
                    Store(store.root).prune()    # nothing holds it: another process's prune runs now
                    pruned[0] = True
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", prune_first)
    data = b"weights uploaded for /api/create" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with RunningServer(FakeEngine(), store) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        conn.request("POST", f"/api/blobs/{digest}", data)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
    assert resp.status == 201, body
    assert store.has_blob(digest, len(data))
    assert pruned == [False], "the prune ran in the middle of the upload"
    tally.add("the soak's finds, replayed at their moment", tried=1, faults=1, checks=3)
