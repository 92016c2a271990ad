"""One exception hierarchy for everything a user or client can get wrong.

Each error carries the HTTP status it maps to; `server/daemon.py` turns it into a JSON
body and `cli/verbs.py` into one `error: ...` line. `full_disk`/`full_disk_at` turn a
full disk (an OSError) into `InsufficientStorage` naming where. Nothing here imports
anything heavy.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


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


class InsufficientStorage(MlxliteError):
    """The disk (or quota) being written is full: WebDAV's 507 Insufficient Storage."""

    status = 507


class Busy(MlxliteError):
    status = 503


class OutOfMemory(MlxliteError):
    """Loading would exceed the memory budget; refused rather than swapping."""

    status = 503


class RankLost(MlxliteError):
    """A rank of a distributed group died or hung (`serve --ranks/--hostfile`): the group
    serves nothing until it is started again."""

    status = 503


def full_disk(exc: BaseException, path: object = None) -> InsufficientStorage | None:
    """A full disk or quota (ENOSPC, EDQUOT) as `InsufficientStorage` naming `path`, else the
    file the error names; None for every other error."""
    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = path if path is not None else exc.filename
    what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
    return InsufficientStorage(f"{what} at {where}" if where is not None else what)


@contextlib.contextmanager
def full_disk_at(path: object) -> Iterator[None]:
    """Inside, a full disk or quota raises `InsufficientStorage` naming `path`: a write()
    or fsync() error names no file, and "at PATH" is what the user can act on."""
    try:
        yield
    except OSError as exc:
        full = full_disk(exc, path)
        if full is None:
            raise
        raise full from exc
