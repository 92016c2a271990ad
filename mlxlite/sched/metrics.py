"""Prometheus-style metrics: thread-safe counters, gauges and histograms, text exposition.

Contract: `Registry` holds named metrics; `counter(name, help)`, `gauge(name, help)`,
`histogram(name, help, buckets)` create (or return) one. Each takes label values as keyword
arguments: `c.inc(1, route="/api/chat", status="200")`, `g.set(3)`, `h.observe(0.25)`.
`render()` writes the Prometheus text format (version 0.0.4): `# HELP`, `# TYPE`, one
sample per label set, histograms as cumulative `_bucket{le=...}`, `_sum`, `_count`.
`gauge_fn(name, help, fn)` samples a callable at render time (queue depth, loaded bytes).
Pure, no I/O; one lock per registry.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    items = [f'{k}="{_escape(v)}"' for k, v in pairs]
    return "{" + ",".join(items) + "}" if items else ""


def _num(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return str(int(v))
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_: str, lock: threading.Lock) -> None:
        self.name, self.help, self._lock = name, help_, lock
        self._values: dict[tuple[tuple[str, str], ...], float] = {}

    def _key(self, labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, str(v)) for k, v in labels.items()))

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(k)} {_num(v)}" for k, v in items]


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = value

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount


class GaugeFn(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_: str, lock: threading.Lock, fn: Callable[[], float]) -> None:
        super().__init__(name, help_, lock)
        self.fn = fn

    def samples(self) -> list[str]:
        try:
            value = self.fn()
        except Exception:       # a sampling failure must not break the whole page
            return []
        return [f"{self.name} {_num(value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, lock: threading.Lock, buckets: tuple[float, ...]) -> None:
        super().__init__(name, help_, lock)
        self.buckets = tuple(sorted(buckets))
        self._hist: dict[tuple, list] = {}      # key -> [counts per bucket..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            h = self._hist.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._hist.items())
        out = []
        for key, h in items:
            for b, count in zip(self.buckets, h, strict=False):
                out.append(f"{self.name}_bucket{_labels(key + (('le', _num(b)),))} {count}")
            out.append(f"{self.name}_bucket{_labels(key + (('le', '+Inf'),))} {h[-1]}")
            out.append(f"{self.name}_sum{_labels(key)} {_num(h[-2])}")
            out.append(f"{self.name}_count{_labels(key)} {h[-1]}")
        return out


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}

    def _get(self, name: str, make: Callable[[], _Metric]) -> _Metric:
        with self._lock:
            if name not in self._metrics:
                self._metrics[name] = make()
            return self._metrics[name]

    def counter(self, name: str, help_: str = "") -> Counter:
        return self._get(name, lambda: Counter(name, help_, threading.Lock()))  # type: ignore[return-value]

    def gauge(self, name: str, help_: str = "") -> Gauge:
        return self._get(name, lambda: Gauge(name, help_, threading.Lock()))  # type: ignore[return-value]

    def gauge_fn(self, name: str, help_: str, fn: Callable[[], float]) -> GaugeFn:
        return self._get(name, lambda: GaugeFn(name, help_, threading.Lock(), fn))  # type: ignore[return-value]

    def histogram(self, name: str, help_: str = "", buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> Histogram:
        return self._get(name, lambda: Histogram(name, help_, threading.Lock(), buckets))  # type: ignore[return-value]

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for m in metrics:
            if m.help:
                lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.samples())
        return "\n".join(lines) + "\n"
