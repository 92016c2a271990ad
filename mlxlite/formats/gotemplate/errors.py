"""The one error of the Go-template package: what failed, at line:column."""

from __future__ import annotations

from mlxlite.errors import BadRequest


class TemplateError(BadRequest):
    """A template that does not parse or does not execute, at `line`:`column` (1-based)."""

    def __init__(self, reason: str, line: int = 0, column: int = 0) -> None:
        where = f"{line}:{column}: " if line else ""
        super().__init__(f"template: {where}{reason}")
        self.reason, self.line, self.column = reason, line, column
