"""The daemon's side of a group: start it, watch every rank, call rank 0, lose it cleanly.

Owns the group's life as rank 0's daemon sees it. `start(daemon_url)` launches the ranks
(`launch.command`, in a session of their own so one signal ends them all), accepts each
rank's heartbeat connection and rank 0's command connection (checked against the group's
secret), and waits until every rank has joined. `call(op, *args)` sends one engine call to
rank 0 and waits for its answer. A rank whose connection closes or whose heartbeat stops
(`dist_beat_timeout`), or a call unanswered within `dist_step_timeout`, loses the group:
the waiting call and every later one raise `RankLost` ("rank 1 of 2 lost: ...") until
`restart()` launches a new generation; the daemon, its store and its HTTP server stay up.
`health()` is what `/api/health` shows. Never imports mlx.
"""

from __future__ import annotations

import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from mlxlite import config, errors
from mlxlite.dist import launch, wire
from mlxlite.errors import BadRequest, MlxliteError, RankLost


def _error(name: str, message: str, status: int) -> MlxliteError:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, MlxliteError):
        try:
            return cls(message)
        except TypeError:
            pass
    return MlxliteError(message, status=status)


def _say(line: str) -> None:
    """A line for the daemon's operator; a closed stderr must not fail a restart or a loss."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class Group:
    def __init__(self, *, ranks: int | None = None, hostfile: str | None = None, backend: str = "ring") -> None:
        if (ranks is None) == (hostfile is None):
            raise BadRequest("give either --ranks N or --hostfile FILE")
        self.ranks, self.hostfile, self.backend = ranks, hostfile, backend
        self.size = len(launch.read_hostfile(hostfile)) if hostfile else int(ranks or 0)
        launch.command(ranks=ranks, hostfile=hostfile, backend=backend, env={})   # refuses bad arguments now
        self.state = "stopped"
        self.detail = ""
        self.generation = 0
        self.daemon_url = ""
        self._lock = threading.Lock()           # state changes
        self._call_lock = threading.Lock()      # one call on the command connection at a time
        self._proc: subprocess.Popen | None = None
        self._listener: socket.socket | None = None
        self._cmd: socket.socket | None = None
        self._beats: dict[int, socket.socket] = {}
        self._ranks: dict[int, dict] = {}
        self._pending_free: list[tuple[int, int]] = []
        self._started_at = 0.0

    # ---- life ---------------------------------------------------------------------------------
    def start(self, daemon_url: str | None = None) -> None:
        """Launch a new generation of the group and wait until every rank has joined."""
        if daemon_url is not None:
            self.daemon_url = daemon_url
        with self._lock:
            self.generation += 1
            self.state, self.detail = "starting", ""
            self._ranks, self._beats, self._cmd = {}, {}, None
        gen = self.generation
        host = launch.control_host(self.hostfile)
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(self.size + 2)
        self._listener = listener
        secret = secrets.token_hex(16)
        env = launch.rank_env({
            "MLXLITE_DIST_CONTROL": f"{host}:{listener.getsockname()[1]}", "MLXLITE_DIST_SECRET": secret,
            "MLXLITE_DIST_BACKEND": self.backend, "MLXLITE_DIST_DAEMON": self.daemon_url,
        })
        if self.hostfile is None and "OPENBLAS_NUM_THREADS" not in os.environ:
            # Local ranks share this host's cores: BLAS threads of their own would oversubscribe them.
            env["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.size))
        argv = launch.command(ranks=self.ranks, hostfile=self.hostfile, backend=self.backend, env=env)
        self._started_at = time.monotonic()
        # A session of its own: one killpg ends the launcher and every local rank it started.
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                      env={**os.environ, **env})
        deadline = time.monotonic() + float(config.get("dist_start_timeout"))
        accepting = selectors.DefaultSelector()     # epoll: no FD_SETSIZE limit in a busy daemon
        accepting.register(listener, selectors.EVENT_READ)
        try:
            while len(self._beats) < self.size or self._cmd is None:
                if self._proc.poll() is not None:
                    raise RankLost(f"the group did not start: the launcher exited with status {self._proc.returncode}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RankLost(f"the group did not start within {config.get('dist_start_timeout')} s "
                                   f"({len(self._beats)} of {self.size} ranks joined)")
                if not accepting.select(min(left, 0.5)):
                    continue
                conn, _ = listener.accept()
                conn.settimeout(10)
                try:
                    info = wire.check_hello(conn, secret)
                except (wire.ChannelClosed, TimeoutError, OSError):
                    conn.close()
                    continue
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rank = int(info["rank"])
                if info.get("role") == "cmd" and rank == 0:
                    self._cmd = conn
                else:
                    self._beats[rank] = conn
                    self._ranks[rank] = {"rank": rank, "host": info.get("host"), "pid": info.get("pid"),
                                         "budget": int(info.get("budget") or 0), "rss": 0, "weights": 0,
                                         "beat": time.monotonic()}
        except BaseException as exc:
            accepting.close()
            self._kill()
            with self._lock:
                self.state = "lost"
                self.detail = str(exc) if isinstance(exc, MlxliteError) else f"the group did not start: {exc}"
            raise
        accepting.close()
        with self._lock:
            self.state = "ready"
        threading.Thread(target=self._watch, args=(gen,), name="mlxlite-dist-watch", daemon=True).start()
        seconds = time.monotonic() - self._started_at
        _say(f"mlxlite: group of {self.size} ranks ready ({self.backend}, {seconds:.1f} s)")

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        """Ask the ranks to exit, then end whatever is left of the group."""
        with self._lock:
            ready = self.state == "ready"
            self.state, self.detail = "stopped", "stopped"
        cmd = self._cmd
        if ready and cmd is not None and self._call_lock.acquire(timeout=5):
            try:
                self._wake()
                wire.send(cmd, ("stop", (), []))
            except MlxliteError:
                pass
            finally:
                self._call_lock.release()
            if self._proc is not None:
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        self._kill()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for sock in [self._cmd, self._listener, *self._beats.values()]:
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def lose(self, reason: str, gen: int | None = None) -> None:
        """The group can't serve: record why, end every rank, wake a waiting call."""
        with self._lock:
            if self.state != "ready" or (gen is not None and gen != self.generation):
                return
            self.state, self.detail = "lost", reason
        _say(f"mlxlite: {reason}; in-flight requests failed, POST /api/dist/restart starts the group again")
        self._kill()

    def _watch(self, gen: int) -> None:
        """Heartbeats: a closed connection or a silent rank loses the group."""
        beat_timeout = float(config.get("dist_beat_timeout"))
        beats = selectors.DefaultSelector()
        for rank, sock in self._beats.items():
            beats.register(sock, selectors.EVENT_READ, rank)
        try:
            self._beat_loop(gen, beats, beat_timeout)
        finally:
            beats.close()

    def _beat_loop(self, gen: int, beats: selectors.BaseSelector, beat_timeout: float) -> None:
        while self.generation == gen and self.state == "ready":
            try:
                readable = beats.select(0.25)
            except (OSError, ValueError):
                return
            for key, _ in readable:
                sock, rank = key.fileobj, key.data
                try:
                    beat = wire.recv(sock)
                except (MlxliteError, OSError) as exc:
                    self.lose(f"rank {rank} of {self.size} lost: {self._why(rank, exc)}", gen)
                    return
                info = self._ranks[rank]
                info.update(rss=int(beat.get("rss", 0)), weights=int(beat.get("weights", 0)), beat=time.monotonic())
            now = time.monotonic()
            for rank, info in self._ranks.items():
                if now - info["beat"] > beat_timeout:
                    self.lose(f"rank {rank} of {self.size} lost: no heartbeat for {now - info['beat']:.1f} s "
                              "(hung or stopped)", gen)
                    return

    def _why(self, rank: int, exc: BaseException) -> str:
        pid = self._ranks.get(rank, {}).get("pid")
        gone = False
        if pid and self.hostfile is None:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                gone = True
            except PermissionError:
                pass
        return f"its process {pid} is gone" if gone else f"its connection closed ({exc})"

    # ---- calls ----------------------------------------------------------------------------
    def free(self, gen: int, ident: int) -> None:
        """A kept cache nobody refers to any more: freed on the ranks with the next call."""
        self._pending_free.append((gen, ident))

    def call(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        with self._call_lock:
            if self.state != "ready" or self._cmd is None:
                raise RankLost(self.detail or f"the group is {self.state}")
            gen = self.generation
            pending, self._pending_free = self._pending_free, []
            free = [i for g, i in pending if g == gen]
            cmd = self._cmd
            try:
                cmd.settimeout(timeout if timeout is not None else float(config.get("dist_step_timeout")))
                if op not in wire.LOCAL:
                    self._wake()
                wire.send(cmd, (op, args, free))
                reply = wire.recv(cmd)
            except TimeoutError:
                self.lose(f"rank 0 of {self.size} lost: no answer to {op} within "
                          f"{config.get('dist_step_timeout')} s (a rank hung)", gen)
                raise RankLost(self.detail) from None
            except MlxliteError as exc:
                # The watcher names the rank that went first; give it a moment to.
                deadline = time.monotonic() + 1.0
                while self.state == "ready" and time.monotonic() < deadline:
                    time.sleep(0.02)
                self.lose(f"rank 0 of {self.size} lost: {exc}", gen)
                raise RankLost(self.detail) from None
        if reply[0] == "ok":
            return reply[1]
        _, name, message, status = reply
        raise _error(name, message, status)

    def memory_budget(self) -> int:
        """What the ranks may hold together: the sum of each rank's own budget (0: not started)."""
        return sum(int(i.get("budget", 0)) for i in dict(self._ranks).values())

    def _wake(self) -> None:
        """Ranks 1..N-1 join the broadcast that follows (see `rank.main`)."""
        for rank, sock in list(self._beats.items()):
            if rank:
                try:
                    sock.sendall(wire.GO)
                except OSError as exc:
                    raise wire.ChannelClosed(f"rank {rank}: {exc.strerror or exc}") from None

    def health(self) -> dict:
        now = time.monotonic()
        return {
            "state": self.state, "ranks": self.size, "backend": self.backend, "generation": self.generation,
            **({"detail": self.detail} if self.detail else {}),
            "per_rank": [{"rank": r, "host": i.get("host"), "pid": i.get("pid"), "budget_bytes": i.get("budget", 0),
                          "rss_bytes": i.get("rss", 0),
                          "weights_bytes": i.get("weights", 0), "last_beat_s": round(now - i["beat"], 3)}
                         for r, i in sorted(dict(self._ranks).items())],    # a copy: start() refills it
        }
