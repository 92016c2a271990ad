"""Progress events and their rendering: throttled, never backwards, TTY bar vs plain lines."""

from __future__ import annotations

import io
import re

from mlxlite.progress import Printer, layer

DIGEST = "sha256:" + "ab" * 32


def test_layer_events_are_monotonic_and_end_at_total():
    events: list[dict] = []
    report = layer(events.append, "pulling", DIGEST, 1000, interval=0.0)
    for done in (0, 100, 50, 400, 300, 1000, 900):
        report(done)
    completed = [e["completed"] for e in events]
    assert completed == sorted(completed) and completed[-1] == 1000
    assert events[0] == {"status": "pulling abababababab", "digest": DIGEST, "total": 1000, "completed": 0}


def test_layer_events_are_throttled_but_never_lose_the_end():
    events: list[dict] = []
    report = layer(events.append, "pushing", DIGEST, 10_000, interval=60.0)
    for done in range(0, 10_001, 10):
        report(done)
    assert [e["completed"] for e in events] == [0, 10_000]


def test_tty_bar_redraws_in_place_and_never_goes_back():
    out = io.StringIO()
    show = Printer(out, tty=True, interval=0.0)
    show({"status": "pulling manifest"})
    for done in (0, 300, 200, 700, 1000):
        show({"status": "pulling abababababab", "digest": DIGEST, "total": 1000, "completed": done})
    show({"status": "success"})
    text = out.getvalue()
    assert text.startswith("pulling manifest\n") and text.endswith("success\n")
    percents = [int(p) for p in re.findall(r"(\d+)% ", text)]
    assert percents == sorted(percents) and percents[-1] == 100
    assert "\r" in text and "1.0 KB/1.0 KB" in text


def test_plain_lines_when_not_a_tty():
    out = io.StringIO()
    show = Printer(out, tty=False, interval=3600)
    for done in range(0, 1001, 100):
        show({"status": "pulling abababababab", "digest": DIGEST, "total": 1000, "completed": done})
    show({"status": "success"})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines == ["pulling abababababab: 0% 0 B/1.0 KB", "pulling abababababab: 100% 1.0 KB/1.0 KB", "success"]
