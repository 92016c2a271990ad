"""A urllib client of our own daemon's API, for the CLI (and tests).

Contract: `connect_if_running()` returns a `Client` when a daemon answers on
`MLXLITE_HOST` (quickly, so the CLI can fall back to the store), else None. Methods map
one-to-one onto routes; an error reply becomes the `MlxliteError` subclass of its status
with the server's message (404 -> ModelNotFound, 503 -> Busy, ...); `stream()` yields
each NDJSON object as it arrives and raises on a final `{"error": ...}` line. Proxies
from the environment are ignored (the daemon is local). Never imports mlx.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

from mlxlite import config, errors
from mlxlite.errors import MlxliteError

_BY_STATUS = {400: errors.BadRequest, 401: errors.Unauthorized, 403: errors.Forbidden,
              404: errors.ModelNotFound, 405: errors.MethodNotAllowed, 413: errors.PayloadTooLarge,
              499: errors.Cancelled, 503: errors.Busy}


def base_url(host: str | None = None) -> str:
    """The URL the CLI talks to: MLXLITE_HOST, with a wildcard bind mapped to loopback."""
    text = (host or config.get("host")).strip()
    if "://" not in text:
        text = "http://" + text
    scheme, rest = text.split("://", 1)
    rest = rest.rstrip("/")
    if rest.startswith("0.0.0.0"):
        rest = "127.0.0.1" + rest[len("0.0.0.0"):]
    elif rest.startswith("[::]"):
        rest = "[::1]" + rest[len("[::]"):]
    if rest.startswith(":"):
        rest = "127.0.0.1" + rest
    if rest.count(":") == 0 or (rest.startswith("[") and rest.endswith("]")):
        rest += ":11435"
    return f"{scheme}://{rest}"


def _error(status: int, raw: bytes) -> MlxliteError:
    message = raw.decode("utf-8", "replace").strip() or f"HTTP {status}"
    try:
        data = json.loads(raw)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            err = err.get("message")
        if isinstance(err, str):
            message = err
    except ValueError:
        pass
    cls = _BY_STATUS.get(status, MlxliteError)
    return cls(message, status=status)


class Client:
    def __init__(self, host: str | None = None, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url = base_url(host)
        self.api_key = config.get("api_key") if api_key is None else api_key
        self.timeout = timeout
        import urllib.request  # here, not at import: `list` with no daemon never needs it

        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _open(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return self._opener.open(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise _error(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MlxliteError(f"cannot reach the mlxlite daemon at {self.url}: {reason}") from None

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """One whole JSON reply (None for an empty body)."""
        with self._open(method, path, body, timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def stream(self, method: str, path: str, body: Any = None) -> Iterator[dict]:
        """Each NDJSON object as it arrives; closing the iterator closes the connection."""
        resp = self._open(method, path, body)
        try:
            while True:
                line = resp.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                item = json.loads(line)
                if isinstance(item, dict) and "error" in item:
                    raise _error(500, line)
                yield item
        finally:
            resp.close()

    # ---- routes ---------------------------------------------------------------------------
    def is_running(self, timeout: float = 0.5) -> bool:
        try:
            with self._open("GET", "/", timeout=timeout) as resp:
                return resp.status == 200
        except MlxliteError:
            return False

    def version(self) -> str:
        return self.request("GET", "/api/version")["version"]

    def health(self) -> dict:
        return self.request("GET", "/api/health")

    def tags(self) -> list[dict]:
        return self.request("GET", "/api/tags")["models"]

    def show(self, model: str, verbose: bool = False) -> dict:
        return self.request("POST", "/api/show", {"model": model, "verbose": verbose})

    def delete(self, model: str) -> None:
        self.request("DELETE", "/api/delete", {"model": model})

    def copy(self, source: str, destination: str) -> None:
        self.request("POST", "/api/copy", {"source": source, "destination": destination})

    def ps(self) -> list[dict]:
        return self.request("GET", "/api/ps")["models"]

    def stop(self, model: str) -> dict:
        """Unload a model now (Ollama's `stop`: an empty generate with keep_alive 0)."""
        return self.request("POST", "/api/generate", {"model": model, "keep_alive": 0, "stream": False})

    def load(self, model: str, keep_alive: Any = None) -> dict:
        body: dict[str, Any] = {"model": model, "stream": False}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        return self.request("POST", "/api/generate", body)

    def generate(self, model: str, prompt: str, *, stream: bool = True, **fields: Any) -> Any:
        """Streaming: an iterator of chunks; else the whole response object."""
        body = {"model": model, "prompt": prompt, "stream": stream, **fields}
        return self.stream("POST", "/api/generate", body) if stream else self.request("POST", "/api/generate", body)

    def chat(self, model: str, messages: list[dict], *, stream: bool = True, **fields: Any) -> Any:
        body = {"model": model, "messages": messages, "stream": stream, **fields}
        return self.stream("POST", "/api/chat", body) if stream else self.request("POST", "/api/chat", body)

    def embed(self, model: str, input: str | list[str], **fields: Any) -> dict:
        return self.request("POST", "/api/embed", {"model": model, "input": input, **fields})


def is_running(host: str | None = None) -> bool:
    return Client(host).is_running()


def connect_if_running(host: str | None = None) -> Client | None:
    """A client when a daemon answers on MLXLITE_HOST, else None (fast: 0.5 s at most)."""
    try:
        url = urllib.parse.urlsplit(base_url(host))
        # A refused connect answers "no daemon" in microseconds, before any HTTP machinery loads.
        socket.create_connection((url.hostname, url.port or 80), timeout=0.5).close()
        client = Client(host)
    except (MlxliteError, OSError, ValueError):
        return None
    return client if client.is_running() else None
