"""One daemon per store: an flock on `daemon.lock` in the store's root. Never imports mlx."""


from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO

from mlxlite.errors import (
    Busy,
)


class DaemonLock:
    """`daemon.lock` in the store's root, flock-held for as long as a daemon serves that store.

    Two daemons on one store would each keep models resident under their own memory
    budget and keep-alive, so the second is refused and told where the first listens
    (the holder writes its URL and pid into the file). The kernel drops the lock when
    the holder dies, so a killed daemon never blocks the next one.
    """

    def __init__(self, root: Path | str) -> None:
        self.path = Path(root) / "daemon.lock"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 (held open while serving)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read(4096)
            fh.close()
            try:
                info = json.loads(holder)
                where = f" on {info['url']} (pid {info['pid']})"
            except (ValueError, TypeError, KeyError):
                where = ""  # it has not written its address yet
            raise Busy(f"another mlxlite daemon is already serving the store {self.path.parent}{where}; "
                       "stop it first, or give this one its own MLXLITE_HOME") from None
        self._fh = fh

    def announce(self, url: str) -> None:
        """Say where this daemon listens, for the message a second one gets."""
        if self._fh is not None:
            self._fh.truncate(0)
            self._fh.write(json.dumps({"url": url, "pid": os.getpid()}))
            self._fh.flush()

    def release(self) -> None:
        if self._fh is not None:
            self._fh.truncate(0)
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
