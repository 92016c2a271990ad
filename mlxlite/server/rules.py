"""Pure helpers of the daemon: route matching, the DNS-rebinding and CORS rules, addresses.

Contract: `match(routes, method, path)` -> (handler, pattern, params) or NotFound /
MethodNotAllowed; `host_allowed` is Ollama's Host-header rule for a loopback-bound
server; `origin_allowed` its CORS rule (localhost and app origins plus an allowlist);
`parse_host_port` reads MLXLITE_HOST-style addresses. No I/O, never imports mlx.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from mlxlite import config
from mlxlite.errors import BadRequest, MethodNotAllowed, NotFound

Handler = Callable[[Any], Any]


# ---- routing -----------------------------------------------------------------------------
def _compile(pattern: str) -> re.Pattern:
    out = []
    for part in re.split(r"(\{[a-z_]+\*?\})", pattern):
        if part.startswith("{"):
            name = part[1:-1]
            out.append(f"(?P<{name[:-1]}>.+)" if name.endswith("*") else f"(?P<{name}>[^/]+)")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out) + r"\Z")


def match(routes: dict[tuple[str, str], Handler], method: str, path: str
          ) -> tuple[Handler, str, dict[str, str]]:
    """(handler, route pattern, params), or NotFound / MethodNotAllowed."""
    handler = routes.get((method, path))
    if handler is not None:
        return handler, path, {}
    methods = set()
    for (m, pattern), h in routes.items():
        if "{" in pattern:
            found = _compile(pattern).match(path)
            if found:
                if m == method:
                    return h, pattern, {k: unquote(v) for k, v in found.groupdict().items()}
                methods.add(m)
        elif pattern == path:
            methods.add(m)
    if methods:
        raise MethodNotAllowed(f"method {method} not allowed for {path} (allowed: {', '.join(sorted(methods))})")
    raise NotFound(f"no route for {method} {path}")


# ---- security ------------------------------------------------------------------------------
_LOCAL_ORIGIN = re.compile(r"https?://(localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\])(:\d+)?\Z", re.I)
_APP_SCHEMES = ("app://", "file://", "tauri://", "vscode-webview://", "chrome-extension://",
                "moz-extension://", "safari-web-extension://")


def split_host(value: str) -> str:
    value = value.strip()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str | None) -> bool:
    """DNS-rebinding guard for a loopback-bound server (Ollama's rule)."""
    if not host_header:
        return True
    host = split_host(host_header).lower().rstrip(".")
    if host in ("localhost", socket.gethostname().lower()):
        return True
    if host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified


def origin_allowed(origin: str, extra: list[str]) -> bool:
    if _LOCAL_ORIGIN.match(origin) or origin.startswith(_APP_SCHEMES):
        return True
    return any(o == "*" or o == origin or fnmatch.fnmatchcase(origin, o) for o in extra)


def parse_host_port(text: str | None, default_port: int = 11435) -> tuple[str, int]:
    """'127.0.0.1:11435', ':8080', 'localhost', '[::1]:1', 'http://0.0.0.0:1' -> (host, port)."""
    text = (text or config.get("host") or "").strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    host = host or "127.0.0.1"
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise BadRequest(f"invalid address {text!r}: bad port") from None
    if not 0 <= port <= 65535:
        raise BadRequest(f"invalid address {text!r}: port out of range")
    return host, port
