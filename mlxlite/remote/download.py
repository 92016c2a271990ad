"""Resumable, parallel, verified blob downloads into the store.

`fetch(store, digest, size, open_range)` makes blob `digest` present in the store or
raises. Partial state is durable (layout in `partial.py`): the blob's bytes at their
offsets in a sparse file, and a journal line per chunk appended only after its bytes
are written (kill-safe), with a flock held by the one process downloading. An interrupted download (error, Ctrl-C, kill -9) resumes from the journal; what a killed
process had written but not yet journaled (at most one chunk per stream) is fetched again.
Large blobs are fetched as parallel byte ranges; a hasher thread reads the file back in
order behind the contiguous frontier, so verification overlaps the download. A digest
mismatch deletes the partial and raises `IntegrityError`; only a verified file is
renamed into `blobs/sha256/`. Two pulls of one blob share one download: threads of one
process through a dict of in-flight downloads, processes through the flock.
Transient failures (connection errors, 5xx, 429, short reads, stalls: no byte for
`stall_timeout` seconds) are retried with exponential backoff; progress made resets
the retry budget. Never imports mlx.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import mmap
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxlite import config, names
from mlxlite.errors import (
    Cancelled,
    InsufficientStorage,
    IntegrityError,
    MlxliteError,
    RegistryError,
    full_disk_at,
)
from mlxlite.remote.partial import Ranges, partial_bytes, partial_dir, prune_partials, read_journal
from mlxlite.store import Store, digest_hex

# (start, end_exclusive, timeout) -> an open HTTP response (status 200 or 206).
OpenRange = Callable[[int, int, float], Any]
Progress = Callable[[int], None]  # called with the bytes completed so far (monotonic)

_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EBADF, errno.EFBIG}


@dataclass(frozen=True)
class Tuning:
    streams: int = 4             # parallel ranges per blob
    part_size: int = 0           # bytes per range; 0: size/16 clamped to [16 MiB, 1 GiB]
    stall_timeout: float = 30.0  # seconds without a byte before a range is retried
    retries: int = 6             # consecutive failures (without progress) before giving up
    backoff: float = 1.0         # first retry delay in seconds, doubled each time
    chunk: int = 1 << 20         # read/write/journal granularity
    sync_every: int = 256 << 20  # fdatasync the data this often (bytes), so a reboot loses little
    fast_stream: float = 64e6    # bytes/s per stream above which no further stream is added

    @classmethod
    def from_config(cls) -> Tuning:
        return cls(streams=max(1, config.get("pull_streams")),
                   part_size=max(0, config.get("pull_part_bytes")),
                   stall_timeout=max(0.1, config.get("pull_stall_timeout")))

    def parts(self, size: int) -> int:
        if self.part_size:
            return self.part_size
        return min(max(size // 16, 16 << 20), 1 << 30)


class _ShortRead(Exception):
    pass


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno not in _FATAL_ERRNOS
    if isinstance(exc, (http.client.HTTPException, _ShortRead)):
        return True
    return bool(getattr(exc, "transient", False))


class _Shared:
    """One in-flight download that several callers in this process wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.listeners: list[Progress] = []
        self.completed = 0

    def report(self, completed: int) -> None:
        self.completed = max(self.completed, completed)
        for listener in list(self.listeners):
            listener(self.completed)


_inflight: dict[tuple[str, str], _Shared] = {}
_inflight_lock = threading.Lock()


def check_space(store: Store, needed: int) -> None:
    """Refuse early when the blobs still to fetch cannot fit on the disk."""
    store.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store.root).free
    if needed > free:
        raise InsufficientStorage(f"not enough disk space: the pull needs {needed} more bytes, "
                                  f"{free} are free under {store.root}")


def fetch(store: Store, digest: str, size: int, open_range: OpenRange, *,
          progress: Progress | None = None, tuning: Tuning | None = None,
          cancel: threading.Event | None = None) -> None:
    """Make blob `digest` (`size` bytes) present and verified in the store."""
    digest = names.parse_digest(digest)
    if store.has_blob(digest, size):
        if progress:
            progress(size)
        return
    key = (str(store.root.resolve()), digest)
    with _inflight_lock:
        shared = _inflight.get(key)
        owner = shared is None
        if owner:
            shared = _inflight[key] = _Shared()
        if progress:
            shared.listeners.append(progress)
    if not owner:
        while not shared.done.wait(0.2):
            if cancel is not None and cancel.is_set():
                raise Cancelled("pull cancelled")
        if shared.error is not None:
            raise RegistryError(f"the shared download of {digest} failed: {shared.error}")
        if progress:
            progress(size)
        return
    try:
        _fetch_locked(store, digest, size, open_range, shared.report, tuning or Tuning.from_config(),
                      cancel)
    except BaseException as exc:
        shared.error = exc
        raise
    finally:
        with _inflight_lock:
            _inflight.pop(key, None)
        shared.done.set()


def _fetch_locked(store: Store, digest: str, size: int, open_range: OpenRange, report: Progress,
                  tuning: Tuning, cancel: threading.Event | None) -> None:
    directory = partial_dir(store)
    directory.mkdir(parents=True, exist_ok=True)
    hexd = digest_hex(digest)
    with open(directory / f"{hexd}.lock", "a+b") as lock:
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # Another process is downloading this blob: follow its journal until it is done.
                if store.has_blob(digest, size):
                    report(size)
                    return
                if cancel is not None and cancel.is_set():
                    raise Cancelled("pull cancelled") from None
                report(partial_bytes(store, digest, size))
                time.sleep(0.2)
        try:
            if store.has_blob(digest, size):
                report(size)
                return
            with full_disk_at(directory):  # pwrite/fsync errors name no file
                _Download(store, digest, size, open_range, report, tuning, cancel).run()
            # Safe to remove once the blob exists: any later holder of a stale lock
            # checks for the blob first and finds it.
            with contextlib.suppress(FileNotFoundError):
                (directory / f"{hexd}.lock").unlink()
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class _Download:
    def __init__(self, store: Store, digest: str, size: int, open_range: OpenRange,
                 report: Progress, tuning: Tuning, cancel: threading.Event | None) -> None:
        self.store, self.digest, self.size = store, digest, size
        self.open_range, self.report, self.tuning = open_range, report, tuning
        hexd = digest_hex(digest)
        self.data_path = partial_dir(store) / hexd
        self.journal_path = partial_dir(store) / f"{hexd}.json"
        self.ranges = Ranges()
        self.cond = threading.Condition()
        self.failed = cancel or threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.actual: str | None = None
        self.unsynced = 0

    # ---- state on disk --------------------------------------------------------------
    def _open_state(self) -> None:
        ranges = read_journal(self.journal_path, self.digest, self.size)
        try:
            ok = ranges is not None and self.data_path.stat().st_size == self.size
        except FileNotFoundError:
            ok = False
        if not ok:
            ranges = Ranges()
            with open(self.data_path, "wb") as fh:
                fh.truncate(self.size)  # sparse: ranges land at their offsets
        self.ranges = ranges
        # Rewrite the journal compactly (merged ranges), then append to it.
        tmp = self.journal_path.with_suffix(".json.tmp")
        lines = [json.dumps({"digest": self.digest, "size": self.size})]
        lines += [json.dumps(span) for span in ranges.spans]
        with open(tmp, "w") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.journal_path)
        self.fd = os.open(self.data_path, os.O_RDWR)
        self.jfd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)

    def _record(self, start: int, end: int) -> None:
        # One write() per chunk: a kill leaves whole lines or one torn last line.
        os.write(self.jfd, f"[{start},{end}]\n".encode())
        with self.cond:
            before = self.ranges.frontier()
            self.ranges.add(start, end)
            completed = self.ranges.total
            if self.ranges.frontier() != before:
                self.cond.notify_all()
            self.unsynced += end - start
            sync = self.unsynced >= self.tuning.sync_every
            if sync:
                self.unsynced = 0
        if sync:
            os.fdatasync(self.fd)
        self.report(completed)

    def _discard(self) -> None:
        for path in (self.data_path, self.journal_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ---- the download ---------------------------------------------------------------
    def run(self) -> None:
        self._open_state()
        try:
            self.report(self.ranges.total)
            units: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
            part = self.tuning.parts(self.size)
            count = 0
            for i, (start, end) in enumerate(self.ranges.gaps(self.size)):
                # The first ranges start small and double, so the hasher (which follows
                # the contiguous prefix) starts at once instead of idling for a whole part.
                step = min(part, 4 * self.tuning.chunk) if i == 0 else part
                s = start
                while s < end:
                    units.put((s, min(end, s + step)))
                    count += 1
                    s += step
                    step = min(part, step * 2)
            hasher = threading.Thread(target=self._hash, name="mlxlite-hash", daemon=True)
            hasher.start()
            self._run_workers(units, count)
            if self.error is None and not self.failed.is_set():
                self._join([hasher])
            else:
                self.stop.set()
                with self.cond:
                    self.cond.notify_all()
            if self.error is not None:
                raise self.error
            if self.failed.is_set():
                raise Cancelled("pull cancelled; the partial download is kept and resumes next time")
            if self.actual != self.digest:
                self._discard()
                raise IntegrityError(
                    f"digest mismatch for {self.digest}: the downloaded bytes hash to {self.actual}; "
                    "the download was discarded, pull again")
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            os.close(self.jfd)
        final = self.store.blob_path(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.data_path, final)
        with contextlib.suppress(OSError):
            dfd = os.open(final.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()
        self.store.record_verified(self.digest)     # hashed as it came: the first load need not
        self.report(self.size)

    def _run_workers(self, units: queue.SimpleQueue, count: int) -> None:
        """Start with two streams; add one (up to `streams`) while each is slow.

        Parallel ranges pay on links where one connection is slow; on fast ones (LAN,
        loopback) extra streams only take CPU from the hasher, which then becomes the limit.
        """
        workers: list[threading.Thread] = []

        def add() -> None:
            worker = threading.Thread(target=self._work, args=(units,), daemon=True,
                                      name=f"mlxlite-range-{len(workers)}")
            workers.append(worker)
            worker.start()

        limit = min(self.tuning.streams, count)
        for _ in range(min(2, limit)):
            add()
        last_time, last_bytes = time.monotonic(), self.ranges.total
        try:
            while any(w.is_alive() for w in workers):
                for worker in workers:
                    worker.join(0.25)  # short joins keep Ctrl-C responsive
                now, done = time.monotonic(), self.ranges.total
                if now - last_time >= 0.5:
                    per_stream = (done - last_bytes) / (now - last_time) / max(1, len(workers))
                    if per_stream < self.tuning.fast_stream and len(workers) < limit and not self._halted():
                        add()
                    last_time, last_bytes = now, done
        except BaseException:
            self.stop.set()
            with self.cond:
                self.cond.notify_all()
            raise

    def _join(self, threads: list[threading.Thread]) -> None:
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)  # short joins keep Ctrl-C responsive
        except BaseException:
            self.stop.set()
            with self.cond:
                self.cond.notify_all()
            raise

    def _halted(self) -> bool:
        return self.stop.is_set() or self.failed.is_set()

    def _work(self, units: queue.SimpleQueue) -> None:
        buf = bytearray(self.tuning.chunk)
        view = memoryview(buf)
        while not self._halted():
            try:
                start, end = units.get_nowait()
            except queue.Empty:
                return
            try:
                self._fetch_range(start, end, view)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                if self.error is None:
                    self.error = exc
                self.stop.set()
                with self.cond:
                    self.cond.notify_all()
                return

    def _fetch_range(self, start: int, end: int, view: memoryview) -> None:
        pos, attempt = start, 0
        while pos < end and not self._halted():
            before = pos
            try:
                with self.open_range(pos, end, self.tuning.stall_timeout) as resp:
                    if resp.status == 200 and pos > 0:
                        self._skip(resp, pos, view)  # the server ignored Range
                    while pos < end and not self._halted():
                        n = resp.readinto(view[:min(len(view), end - pos)])
                        if not n:
                            raise _ShortRead(f"connection closed at byte {pos} of {self.size}")
                        os.pwrite(self.fd, view[:n], pos)
                        self._record(pos, pos + n)
                        pos += n
            except MlxliteError as exc:
                if not is_transient(exc):
                    raise
                error: BaseException = exc
            except (OSError, http.client.HTTPException, _ShortRead) as exc:
                if not is_transient(exc):
                    raise
                error = exc
            else:
                continue
            attempt = 1 if pos > before else attempt + 1
            if attempt > self.tuning.retries:
                raise RegistryError(f"download of {self.digest} failed after {self.tuning.retries} "
                                    f"retries: {error}")
            delay = self.tuning.backoff * 2 ** (attempt - 1)
            self.stop.wait(delay)

    @staticmethod
    def _skip(resp: Any, count: int, view: memoryview) -> None:
        while count:
            n = resp.readinto(view[:min(len(view), count)])
            if not n:
                raise _ShortRead("connection closed while skipping to the range start")
            count -= n

    def _hash(self) -> None:
        """Hash the file in order, following the contiguous downloaded prefix.

        Reads through short-lived mmap windows: sha256 reads the page cache directly
        (no copy), and unmapping each window keeps the process's RSS flat.
        """
        digest = hashlib.sha256()
        window = 16 << 20
        pos = 0
        while pos < self.size:
            with self.cond:
                while self.ranges.frontier() <= pos and not self._halted():
                    self.cond.wait(0.5)
                if self._halted():
                    return
                limit = self.ranges.frontier()
            while pos < limit:
                base = pos - pos % mmap.ALLOCATIONGRANULARITY
                end = min(limit, base + window)
                with mmap.mmap(self.fd, end - base, offset=base, access=mmap.ACCESS_READ) as mm, \
                        memoryview(mm) as view:
                    part = view[pos - base:]
                    try:
                        digest.update(part)
                    finally:
                        part.release()
                pos = end
        self.actual = "sha256:" + digest.hexdigest()


def fetch_unknown(store: Store, size: int, open_range: OpenRange, *, progress: Progress | None = None,
                  tuning: Tuning | None = None, cancel: threading.Event | None = None) -> str:
    """Download `size` bytes of unknown digest into the store; returns the digest.

    Without a digest there is no name for durable partial state, so this resumes only
    within the process (ranged retries into one hashing writer).
    """
    tuning = tuning or Tuning.from_config()
    buf = bytearray(tuning.chunk)
    view = memoryview(buf)
    with store.blob_writer() as writer:
        attempt = 0
        while writer.size < size:
            if cancel is not None and cancel.is_set():
                raise Cancelled("pull cancelled")
            before = writer.size
            try:
                with open_range(writer.size, size, tuning.stall_timeout) as resp:
                    if resp.status == 200 and writer.size:
                        _Download._skip(resp, writer.size, view)
                    while writer.size < size:
                        n = resp.readinto(view[:min(len(view), size - writer.size)])
                        if not n:
                            raise _ShortRead(f"connection closed at byte {writer.size} of {size}")
                        writer.write(view[:n])
                        if progress:
                            progress(writer.size)
            except (MlxliteError, OSError, http.client.HTTPException, _ShortRead) as exc:
                if not is_transient(exc):
                    raise
                attempt = 1 if writer.size > before else attempt + 1
                if attempt > tuning.retries:
                    raise RegistryError(f"download failed after {tuning.retries} retries: {exc}") from None
                time.sleep(tuning.backoff * 2 ** (attempt - 1))
        return writer.commit()


# Partial-state helpers are re-exported: callers think of them as part of downloading.
__all__ = ["Tuning", "fetch", "fetch_unknown", "is_transient", "partial_bytes", "partial_dir",
           "prune_partials", "OpenRange", "Progress"]
