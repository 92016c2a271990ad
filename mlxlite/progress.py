"""Progress of pulls and pushes: Ollama's event shapes, and how a terminal shows them.

Events are the dicts `/api/pull` and `/api/push` stream, word for word:
  {"status": "pulling manifest"}
  {"status": "pulling <12 hex>", "digest": "sha256:...", "total": N, "completed": M}
  {"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}
  push: "retrieving manifest", "pushing <12 hex>" (+ digest/total/completed),
        "pushing manifest", "success".
`layer(emit, verb, digest, total)` turns byte counts into throttled layer events whose
`completed` never decreases. `Printer` renders events: on a TTY one bar per layer
(bytes, rate, ETA) redrawn in place; otherwise plain lines every few seconds.
Never imports mlx.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

Event = dict
Emit = Callable[[Event], None]


def quiet(_: Event) -> None:
    pass


def layer(emit: Emit, verb: str, digest: str, total: int, *,
          interval: float = 0.1) -> Callable[[int], None]:
    """A `progress(completed)` callback emitting `{verb} <12hex>` events, throttled, monotonic.

    The first call and the one reaching `total` always emit; others at most every `interval`.
    """
    state = {"completed": -1, "last": 0.0}
    lock = threading.Lock()
    status = f"{verb} {digest.split(':', 1)[-1][:12]}"

    def progress(completed: int) -> None:
        with lock:
            completed = min(max(completed, state["completed"], 0), total)
            now = time.monotonic()
            first = state["completed"] < 0
            if not first and completed < total and now - state["last"] < interval:
                state["completed"] = completed
                return
            if not first and completed == state["completed"] and now - state["last"] < interval:
                return
            state["completed"], state["last"] = completed, now
        emit({"status": status, "digest": digest, "total": total, "completed": completed})

    return progress


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.0f} B"


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class _Bar:
    """Rate estimate for one layer: bytes over a sliding window of recent samples."""

    def __init__(self, total: int, now: float) -> None:
        self.total = total
        self.completed = 0
        self.samples: list[tuple[float, int]] = [(now, 0)]
        self.started = now
        self.last_line = 0.0

    def update(self, completed: int, now: float) -> None:
        self.completed = max(self.completed, min(completed, self.total))
        self.samples.append((now, self.completed))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5.0:
            self.samples.pop(0)

    @property
    def rate(self) -> float:
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def text(self, status: str, width: int) -> str:
        pct = self.completed * 100 // self.total if self.total else 100
        rate = self.rate
        done = self.completed >= self.total
        tail = f"{human_bytes(self.completed)}/{human_bytes(self.total)}"
        if not done and rate > 0:
            tail += f"  {human_bytes(rate)}/s  {human_duration((self.total - self.completed) / rate)}"
        if width > 0:
            filled = pct * width // 100
            return f"{status}: {pct:3d}% ▕{'█' * filled}{' ' * (width - filled)}▏ {tail}"
        return f"{status}: {pct}% {tail}"


class Printer:
    """Renders events on `stream`: a redrawn bar per layer on a TTY, plain lines otherwise."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None,
                 interval: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self.bars: dict[str, _Bar] = {}
        self.current: str | None = None  # status of the line being redrawn (TTY)
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            self._render(event)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _end_line(self) -> None:
        if self.tty and self.current is not None:
            self._write("\n")
        self.current = None

    def _render(self, event: Event) -> None:
        status = str(event.get("status", ""))
        if "error" in event:
            self._end_line()
            self._write(f"error: {event['error']}\n")
            return
        if "total" not in event:
            self._end_line()
            self._write(status + "\n")
            return
        now = time.monotonic()
        total = int(event.get("total") or 0)
        bar = self.bars.get(status)
        if bar is None:
            bar = self.bars[status] = _Bar(total, now)
            if self.tty:
                self._end_line()
        if bar.last_line == float("inf"):
            return  # this layer's line is finished
        bar.update(int(event.get("completed") or 0), now)
        done = bar.completed >= bar.total
        if self.tty:
            if self.current not in (None, status):
                self._end_line()
            if now - bar.last_line >= self.interval or done or self.current is None:
                self._write("\r" + bar.text(status, 25) + "\x1b[K")
                bar.last_line = now
            self.current = status
            if done:
                self._end_line()
                bar.last_line = float("inf")  # finished: no more redraws for this layer
            return
        first = bar.last_line == 0.0
        if first or done or now - bar.last_line >= self.interval:
            self._write(bar.text(status, 0) + "\n")
            bar.last_line = float("inf") if done else now
