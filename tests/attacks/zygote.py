"""A fork server that runs the real CLI (`mlxlite.cli.main`, what `python mlxlite.py` calls)
in a child process and SIGKILLs it at a chosen moment, without paying Python's start-up for
every kill (on a loaded 2-core machine a `python mlxlite.py` costs ~0.7 s before any work).

Run as a script; one JSON request per stdin line, one JSON answer per stdout line:
  {"argv": [...], "home": MLXLITE_HOME, "cwd": DIR, "kill_at": K | null, "kill_after": S | null}
  -> {"status": "killed" | "exit", "code": N, "events": E, "seconds": T, "out": ..., "err": ...}
`kill_at` K: the child SIGKILLs itself just before its K-th operation that changes the disk,
seen through CPython's audit hooks (an open for writing, rename/replace, unlink, link,
symlink, mkdir, rmdir, truncate); `events` is how many the child saw (a clean run's
count says how many kill points a verb has). `kill_after` S: the server SIGKILLs the child
S seconds after forking it, wherever it is (mid-copy, mid-hash, mid-fsync).
The server itself imports mlxlite once, never opens a store and runs no threads, so each
fork is a clean process that differs from `python mlxlite.py` only in skipping start-up.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What changes the disk: a kill just before one of these leaves a state no other kill point
# leaves. Reading opens, flocks (the kernel drops them with the process: the disk looks the
# same as a kill before the next operation), a mkdir of a folder that exists and the append-
# open of a lock file that exists change nothing, so they are not kill points.
_MUTATING = {"os.rename", "os.remove", "os.link", "os.symlink", "os.mkdir", "os.rmdir", "os.truncate",
             "os.chmod", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _exists(path: object, dir_fd: object) -> bool:
    if dir_fd not in (None, -1):
        return False                    # relative to a folder fd: count it, to be safe
    try:
        return os.path.lexists(os.fsdecode(path))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _is_kill_point(event: str, args: tuple) -> bool:
    if event == "open":
        path, mode, flags = args
        if isinstance(mode, str):
            writes = any(c in mode for c in "wax+")
            return writes and not ("a" in mode and _exists(path, None))
        return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
    if event == "os.mkdir":
        return not _exists(args[0], args[2])
    return event in _MUTATING


def _child(request: dict, out: int, err: int) -> None:
    """In the forked child: run the CLI, dying at the `kill_at`-th kill point."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)   # the requests are the server's, not the CLI's
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.environ["MLXLITE_HOME"] = request["home"]
    os.environ.update(request.get("env") or {})
    os.chdir(request["cwd"])
    state = {"seen": 0, "kill_at": request.get("kill_at")}

    def hook(event: str, args: tuple) -> None:
        if state["kill_at"] is None and state["seen"] < 0:
            return                          # the CLI is done: the count file's own open is not one
        if not _is_kill_point(event, args):
            return
        state["seen"] += 1
        if state["seen"] == state["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    from mlxlite.cli import main

    try:
        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    seen, state["seen"], state["kill_at"] = state["seen"], -1, None
    with open(request["count_file"], "w") as fh:
        fh.write(str(seen))
    os._exit(code)


def serve() -> None:
    sys.path.insert(0, str(ROOT))
    # Import what the verbs import lazily, once, so the children start their work at once.
    import mlxlite.cli  # noqa: F401
    import mlxlite.cli.modelfile  # noqa: F401
    import mlxlite.remote.partial  # noqa: F401
    import mlxlite.store.importers  # noqa: F401
    import mlxlite.store.layout  # noqa: F401

    scratch = Path(tempfile.mkdtemp(prefix="zygote-"))
    for line in sys.stdin:
        request = json.loads(line)
        paths = [scratch / name for name in ("out", "err", "count")]
        for path in paths:
            path.write_bytes(b"")
        request["count_file"] = str(paths[2])
        out = os.open(paths[0], os.O_WRONLY | os.O_TRUNC)
        err = os.open(paths[1], os.O_WRONLY | os.O_TRUNC)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                _child(request, out, err)
            finally:
                os._exit(98)
        os.close(out)
        os.close(err)
        if request.get("kill_after") is not None:
            time.sleep(request["kill_after"])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        seconds = time.monotonic() - start
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        counted = paths[2].read_text()
        answer = {"status": "killed" if killed else "exit",
                  "code": -signal.SIGKILL if killed else os.WEXITSTATUS(status),
                  "events": int(counted) if counted else None, "seconds": seconds,
                  "out": paths[0].read_text(errors="replace"), "err": paths[1].read_text(errors="replace")}
        print(json.dumps(answer), flush=True)


class Zygote:
    """The test side: `run(argv, home, cwd, kill_at=None, kill_after=None) -> dict`."""

    def __init__(self) -> None:
        import subprocess

        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)

    def run(self, argv: list[str], home: Path, cwd: Path, *, kill_at: int | None = None,
            kill_after: float | None = None, env: dict | None = None) -> dict:
        request = {"argv": argv, "home": str(home), "cwd": str(cwd), "kill_at": kill_at,
                   "kill_after": kill_after, "env": env or {}}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the fork server died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    serve()
