"""What the command line prints for people: byte sizes, ages and aligned tables.

Owns `human_bytes` (decimal units: 1 KB = 1000 B), `human_ago` and `table`, shared by the
verbs and `show`. Pure formatting of the values given: never reads the store or the daemon,
never prints.
"""

from __future__ import annotations

import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1000
    return f"{n} B"


def human_ago(ts: float, now: float | None = None) -> str:
    delta = max(0.0, (now or time.time()) - ts)
    for unit, size in (("year", 31536000), ("month", 2592000), ("week", 604800), ("day", 86400),
                       ("hour", 3600), ("minute", 60), ("second", 1)):
        if delta >= size:
            count = int(delta // size)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "just now"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["    ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
