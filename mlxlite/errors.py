"""One exception hierarchy for everything a user or client can get wrong.

Each error carries the HTTP status it maps to; `server/daemon.py` turns it into a JSON
body and `cli/verbs.py` into one `error: ...` line. Nothing here imports anything heavy.
"""

from __future__ import annotations


class MlxliteError(Exception):
    """Base of all expected failures; `status` is the HTTP status for the wire."""

    status = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class BadRequest(MlxliteError):
    status = 400


class InvalidName(BadRequest):
    """A model name or digest that does not follow the grammar (DESIGN.md §5)."""


class Unsupported(BadRequest):
    """A well-formed input that mlxlite cannot handle (architecture, tensor type, ...)."""


class Unauthorized(MlxliteError):
    status = 401


class Forbidden(MlxliteError):
    status = 403


class ModelNotFound(MlxliteError):
    status = 404


class NotFound(MlxliteError):
    status = 404


class MethodNotAllowed(MlxliteError):
    status = 405


class RequestTimeout(MlxliteError):
    """A client too slow sending its request's headers or body (`server/connections.py`)."""

    status = 408


class PayloadTooLarge(MlxliteError):
    status = 413


class Cancelled(MlxliteError):
    status = 499


class IntegrityError(MlxliteError):
    """Stored bytes that do not match their digest or size: never served, never loaded."""

    status = 500


class RegistryError(MlxliteError):
    """A remote registry or hub answered with something we cannot use."""

    status = 502


class Busy(MlxliteError):
    status = 503


class OutOfMemory(MlxliteError):
    """Loading would exceed the memory budget; refused rather than swapping."""

    status = 503
