"""The one place an exception becomes an HTTP status and a JSON body.

`error_body(exc, openai, anthropic)`: an `MlxliteError` carries its status; a client gone is
499; a full disk from anywhere is 507; anything else is a 500 naming only the exception's
type (the traceback goes to the log, never on the wire). The body takes Ollama's, OpenAI's
or Anthropic's shape, chosen by route. Never imports mlx.
"""


from __future__ import annotations

from mlxlite.errors import (
    MlxliteError,
    full_disk,
)
from mlxlite.sched import ClientGone

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 499: "invalid_request_error", 503: "api_error"}

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def error_body(exc: BaseException, openai: bool = False, anthropic: bool = False) -> tuple[int, dict]:
    """THE mapping of an exception to (status, JSON body)."""
    exc = full_disk(exc) or exc     # a full disk is the 507 it is, wherever it came from
    if isinstance(exc, MlxliteError):
        status, message = exc.status, exc.message
    elif isinstance(exc, ClientGone):
        status, message = 499, "request canceled"
    else:
        status, message = 500, f"internal error: {type(exc).__name__}"
    if anthropic:
        kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        return status, {"type": "error", "error": {"type": kind, "message": message}}
    if openai:
        kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        return status, {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return status, {"error": message}
