"""The bounds on one jinja chat-template render, as a Go template's execution has them.

A template from a Modelfile or a pulled model must not spin a server thread forever nor
fill its memory: `bounded(render)` runs jinja's generate counting the template's own lines
(`MAX_STEPS`) and the characters written (`MAX_OUTPUT`), and `sandbox()` is jinja's
immutable sandbox with `*` and `**` refused where the value built in one go would break
those limits. Going past one raises `OverBudget`; `templates.py` turns it into the
`BadRequest` that names the template. Never renders a template itself, never imports
jinja2 before the first template is built; no I/O.
"""

from __future__ import annotations

import sys
from typing import Any

MAX_STEPS = 5_000_000      # template lines one render may execute
MAX_OUTPUT = 64 << 20      # characters one render may write


class OverBudget(Exception):
    pass


def bounded(render: Any) -> str:
    """Run `render()` (jinja's generate) counting the template's own lines as it runs:
    jinja compiles a template to Python, so a line-level trace on its frames alone sees every
    loop iteration, empty ones included (about 3x the time of a plain render: ~1 ms)."""
    left = [MAX_STEPS]

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        left[0] -= 1
        if left[0] < 0:
            raise OverBudget(f"it ran more than {MAX_STEPS:,} steps")
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        out, size = [], 0
        for chunk in render():
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise OverBudget(f"it wrote more than {MAX_OUTPUT:,} characters")
            out.append(chunk)
        return "".join(out)
    finally:
        sys.settrace(previous)


def _binop_guard(operator: str, left: Any, right: Any) -> None:
    """Refuse a `*` or `**` whose result alone would break the budget (it is built in one go)."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_OUTPUT:
                raise OverBudget(f"a value of {len(seq) * times:,} items is more than {MAX_OUTPUT:,}")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 4096:
        raise OverBudget(f"{left} ** {right} is too large a number")


_ENV: Any = None


def sandbox() -> Any:
    """jinja's immutable sandbox with `*` and `**` checked (made once, on first use: jinja2 is
    imported lazily, as everywhere in `templates`)."""
    global _ENV
    if _ENV is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # lazy, as jinja2 everywhere in templates

        class Bounded(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset({"*", "**"})

            def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
                _binop_guard(operator, left, right)
                return super().call_binop(context, operator, left, right)

        _ENV = Bounded
    return _ENV
