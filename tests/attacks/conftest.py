"""The attack suite's tally: each attack test adds what it tried to `tally`, and the run ends
with one table (attack, tried, faults injected, invariant checks, data lost, test): the
figures RELIABILITY.md records. `MLXLITE_ATTACK_REPORT=PATH` also writes it as JSON.
A test that found data lost fails, so a finished row always says 0."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest

_ROWS: dict[str, dict] = defaultdict(lambda: {"tried": 0, "faults": 0, "checks": 0, "tests": set()})
_FAILED: set[str] = set()


class Tally:
    def __init__(self, nodeid: str) -> None:
        self.test = nodeid.split("[")[0]

    def add(self, attack: str, *, tried: int = 0, faults: int = 0, checks: int = 0) -> None:
        row = _ROWS[attack]
        row["tried"] += tried
        row["faults"] += faults
        row["checks"] += checks
        row["tests"].add(self.test)


@pytest.fixture
def tally(request) -> Tally:
    return Tally(request.node.nodeid)


def pytest_runtest_logreport(report) -> None:
    if report.failed:
        _FAILED.add(report.nodeid.split("[")[0])


def pytest_terminal_summary(terminalreporter) -> None:
    if not _ROWS:
        return
    lines = ["| attack | tried | faults injected | invariant checks | data lost | test |",
             "|---|---:|---:|---:|---:|---|"]
    for attack, row in _ROWS.items():
        tests = ", ".join(f"`{t}`" for t in sorted(row["tests"]))
        row["lost"] = "FAILED: see above" if row["tests"] & _FAILED else 0
        lines.append(f"| {attack} | {row['tried']} | {row['faults']} | {row['checks']} | {row['lost']} | {tests} |")
    terminalreporter.write_sep("-", "attack tally")
    for line in lines:
        terminalreporter.write_line(line)
    path = os.environ.get("MLXLITE_ATTACK_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump({a: {**r, "tests": sorted(r["tests"])} for a, r in _ROWS.items()}, fh, indent=1)
