"""OCI distribution client (urllib only): auth, manifests, blobs, uploads.

Owns the wire protocol of `/v2/` registries (Docker Distribution, Ollama's registry,
Harbor, GHCR, zot): manifests fetched with OCI and Docker v2 Accept headers, blob GETs
that follow redirects by hand (a CDN on another host never sees our credentials),
bearer-token auth from a `WWW-Authenticate` challenge (anonymous, or with credentials
from config `registry_auth` or a docker-style `config.json`), basic auth, and
`insecure` for plain-HTTP registries; uploads: HEAD, cross-repository mount,
monolithic and chunked PUT/PATCH, manifest PUT. Orchestration (what to fetch, the
store, progress) lives in `transfer.py`; the resumable ranged download in `download.py`.
Every failure is a typed `MlxliteError`. Never imports mlx.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mlxlite import config, names
from mlxlite.errors import (
    BadRequest,
    MlxliteError,
    ModelNotFound,
    NotFound,
    RegistryError,
    Unauthorized,
    Unsupported,
)
from mlxlite.store import DOCKER_MANIFEST, OCI_MANIFEST

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
USER_AGENT = "mlxlite"
MAX_MANIFEST = 4 << 20
Body = bytes | Callable[[], BinaryIO] | None


class HTTPStatusError(RegistryError):
    """An unexpected HTTP status; `transient` says whether retrying may help."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code

    @property
    def transient(self) -> bool:
        return self.code >= 500 or self.code in (408, 425, 429)


class NetworkError(RegistryError):
    """The connection failed or broke (refused, reset, timed out): worth a retry."""

    transient = True


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are followed by `Registry.request`, which drops credentials across hosts."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


_OPENER = urllib.request.build_opener(_NoRedirect())


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


def _docker_config_auth(host: str) -> tuple[str, str] | None:
    """user/password for `host` from `$DOCKER_CONFIG/config.json` or ~/.docker/config.json."""
    directory = config.get("docker_config") or str(Path.home() / ".docker")
    path = Path(directory).expanduser() / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, value in auths.items():
        # Keys appear as "host", "https://host" or "https://host/v1/".
        bare = re.sub(r"^[a-z]+://", "", str(key)).split("/", 1)[0].lower()
        if bare != host.lower() or not isinstance(value, dict):
            continue
        if value.get("username") and value.get("password"):
            return str(value["username"]), str(value["password"])
        if value.get("auth"):
            try:
                user, _, password = base64.b64decode(value["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise BadRequest(f"{path}: auths.{key}.auth is not base64 user:password") from None
            return user, password
    return None


def credentials(host: str) -> tuple[str, str] | str | None:
    """(user, password), a bearer token, or None for `host`: config first, then docker's."""
    entries = config.get("registry_auth") or {}
    entry = entries.get(host) or entries.get(host.lower())
    if isinstance(entry, dict):
        if entry.get("token"):
            return str(entry["token"])
        if "username" in entry:
            return str(entry["username"]), str(entry.get("password", ""))
    elif entry is not None:
        raise BadRequest(f"registry_auth.{host} must be an object with username/password or token")
    return _docker_config_auth(host)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The registry's own message (`{"errors":[{"code","message"}]}`) when it sent one."""
    try:
        body = exc.read(65536)
        data = json.loads(body)
        errors = data.get("errors") or []
        parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)]
        if parts:
            return "; ".join(parts)
        if isinstance(data.get("error"), str):
            return data["error"]
    except Exception:  # an HTML error page or nothing: the status says enough
        pass
    return f"HTTP {exc.code} {exc.reason}"


def check_url(url: str) -> str:
    """An http(s) URL with a host and, if given, a port in 1..65535; else `BadRequest`."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # urllib's own "Port out of range" / "Port could not be cast"
        port = 0
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise BadRequest(f"invalid URL {url!r}: expected http(s)://host[:port]/... with a port from 1 to 65535")
    return url


class Registry:
    """One registry host. Thread-safe enough for parallel blob GETs: tokens are per scope."""

    def __init__(self, host: str, *, insecure: bool = False, timeout: float = 60.0,
                 base: str | None = None, auth_header: str | None = None) -> None:
        # A host or URL that can't be valid fails here, before any DNS lookup.
        if base is None:
            names.check_host(host)
        else:
            check_url(base)
        self.host = host
        self.insecure = insecure
        # `base` and `auth_header` let hub.py reuse this plumbing for a plain HTTP API.
        self.base = (base or f"{'http' if insecure else 'https'}://{host}").rstrip("/")
        self.auth_header = auth_header
        self.timeout = timeout
        self._auth: dict[str, str] = {}  # scope -> Authorization header value
        self._redirects: dict[str, str] = {}  # blob URL -> resolved (CDN) URL
        self._resolving = threading.Lock()

    # ---- plumbing --------------------------------------------------------------------
    def url(self, path: str) -> str:
        return self.base + path

    def _token(self, params: dict[str, str], scope: str) -> str:
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"{self.host}: auth challenge without a realm")
        # Token servers take one `scope` parameter per scope; a mount needs two.
        scopes = dict.fromkeys((params.get("scope", "") + " " + scope).split())
        query = [("service", params.get("service", ""))] + [("scope", s) for s in scopes]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        creds = credentials(self.host)
        if isinstance(creds, tuple):
            req.add_header("Authorization", _basic(*creds))
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                who = f"as {creds[0]!r}" if isinstance(creds, tuple) else "anonymously"
                raise Unauthorized(f"{self.host}: access denied {who} ({_error_text(exc)}); "
                                   "set credentials in registry_auth or docker's config.json") from None
            raise RegistryError(f"{self.host}: token server answered {_error_text(exc)}") from None
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{self.host}: cannot get a token from {realm}: {exc}") from None
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not token:
            raise RegistryError(f"{self.host}: token server sent no token")
        return "Bearer " + token

    def _authorize(self, challenge: str, scope: str) -> str:
        scheme, params = _parse_challenge(challenge)
        creds = credentials(self.host)
        if scheme == "bearer":
            if isinstance(creds, str):
                return "Bearer " + creds
            return self._token(params, scope)
        if scheme == "basic" and isinstance(creds, tuple):
            return _basic(*creds)
        raise Unauthorized(f"{self.host} requires authentication ({scheme or 'unknown'} scheme); "
                           "set credentials in registry_auth or docker's config.json")

    def request(self, method: str, url: str, *, scope: str = "", headers: dict | None = None,
                body: Body = None, ok: tuple[int, ...] = (200,), timeout: float | None = None,
                follow: bool = True) -> http.client.HTTPResponse:
        """Send one request, answering one auth challenge and following redirects.

        Returns the open response when its status is in `ok`; raises otherwise.
        """
        if not url.startswith(("http://", "https://")):
            url = self.url(url)
        retried_auth = False
        for _ in range(8):
            hdrs = {"User-Agent": USER_AGENT, **(headers or {})}
            same_host = urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(self.base).netloc
            if same_host and scope in self._auth:
                hdrs["Authorization"] = self._auth[scope]
            elif same_host and self.auth_header:
                hdrs["Authorization"] = self.auth_header
            data = body() if callable(body) else body
            req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
            try:
                resp = _OPENER.open(req, timeout=timeout or self.timeout)
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and same_host and not retried_auth:
                    retried_auth = True
                    value = self._authorize(exc.headers.get("WWW-Authenticate", ""), scope)
                    self._auth[scope] = value
                    exc.close()
                    continue
                if exc.code in (301, 302, 303, 307, 308) and follow and exc.headers.get("Location"):
                    url = urllib.parse.urljoin(url, exc.headers["Location"])
                    if exc.code == 303:
                        method, body = "GET", None
                    exc.close()
                    continue
                if exc.code in ok:
                    return exc  # type: ignore[return-value]
                raise self._http_error(exc, method, url) from None
            except urllib.error.URLError as exc:
                raise self._url_error(exc) from None
            except (http.client.HTTPException, OSError) as exc:
                raise NetworkError(f"{self.host}: {method} failed: {exc!r}") from None
            if resp.status not in ok:
                resp.close()
                raise HTTPStatusError(f"{self.host}: {method} {urllib.parse.urlsplit(url).path} "
                                      f"answered {resp.status}", code=resp.status)
            return resp
        raise RegistryError(f"{self.host}: too many redirects")

    def _http_error(self, exc: urllib.error.HTTPError, method: str, url: str) -> MlxliteError:
        text = _error_text(exc)
        path = urllib.parse.urlsplit(url).path
        if exc.code == 401:
            return Unauthorized(f"{self.host}: unauthorized ({text})")
        if exc.code == 403:
            return Unauthorized(f"{self.host}: access denied to {path} ({text})", status=403)
        if exc.code == 404:
            return NotFound(f"{self.host}: {path} not found ({text})")
        return HTTPStatusError(f"{self.host}: {method} {path} failed: {text}", code=exc.code)

    def _url_error(self, exc: urllib.error.URLError) -> MlxliteError:
        reason = exc.reason
        if isinstance(reason, ssl.SSLError):
            hint = "" if self.insecure else "; if it is a plain-HTTP registry, use --insecure"
            return RegistryError(f"cannot reach registry {self.host}: {reason}{hint}")
        return NetworkError(f"cannot reach registry {self.host}: {reason}")

    # ---- manifests -----------------------------------------------------------------
    @staticmethod
    def scope(repository: str, actions: str = "pull") -> str:
        return f"repository:{repository}:{actions}"

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str]:
        """(raw bytes, media type) of a manifest; a 404 is `ModelNotFound`."""
        try:
            resp = self.request("GET", f"/v2/{repository}/manifests/{reference}",
                                scope=self.scope(repository), headers={"Accept": MANIFEST_ACCEPT})
        except NotFound:
            raise ModelNotFound(f"pull model manifest: {self.host}/{repository}:{reference} "
                                "does not exist") from None
        with resp:
            raw = resp.read(MAX_MANIFEST + 1)
            media = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        if len(raw) > MAX_MANIFEST:
            raise RegistryError(f"{self.host}: manifest larger than {MAX_MANIFEST} bytes")
        try:
            declared = json.loads(raw).get("mediaType") or media
        except (ValueError, AttributeError):
            raise RegistryError(f"{self.host}: manifest of {repository}:{reference} is not JSON") from None
        if declared in (OCI_INDEX, DOCKER_LIST):
            raise Unsupported(f"{repository}:{reference} is an image index (several platforms), "
                              "not a model manifest")
        return raw, declared

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> str:
        resp = self.request("PUT", f"/v2/{repository}/manifests/{reference}",
                            scope=self.scope(repository, "pull,push"),
                            headers={"Content-Type": media_type}, body=raw, ok=(201, 200, 202))
        with resp:
            return resp.headers.get("Docker-Content-Digest", "")

    # ---- blobs ---------------------------------------------------------------------
    def blob_url(self, repository: str, digest: str) -> str:
        return self.url(f"/v2/{repository}/blobs/{digest}")

    def has_blob(self, repository: str, digest: str, actions: str = "pull") -> int | None:
        """The blob's size if the registry has it in `repository`, else None."""
        try:
            resp = self.request("HEAD", self.blob_url(repository, digest),
                                scope=self.scope(repository, actions))
        except NotFound:
            return None
        with resp:
            length = resp.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else 0

    def _first_get(self, url: str, repository: str, headers: dict, timeout: float
                   ) -> http.client.HTTPResponse:
        """The first GET of a blob: learns (once) whether it redirects, e.g. to a CDN.

        A redirect's target is remembered and requested directly, so later ranges skip
        the registry and no credentials travel to another host.
        """
        redirects = (301, 302, 303, 307, 308)
        with self._resolving:  # parallel ranges of one blob resolve it once
            target = self._redirects.get(url)
            if target is None:
                resp = self.request("GET", url, scope=self.scope(repository), headers=headers,
                                    follow=False, ok=(200, 206, *redirects), timeout=timeout)
                if resp.status not in redirects:
                    self._redirects[url] = url
                    return resp
                with resp:
                    target = urllib.parse.urljoin(url, resp.headers.get("Location") or url)
                self._redirects[url] = target
        return self.request("GET", target, scope=self.scope(repository), headers=headers,
                            ok=(200, 206), timeout=timeout)

    def open_blob(self, repository: str, digest: str, start: int = 0, end: int | None = None,
                  timeout: float | None = None) -> http.client.HTTPResponse:
        """A response streaming bytes [start, end] (inclusive) of a blob; status 200 or 206."""
        timeout = timeout or self.timeout
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        url = self.blob_url(repository, digest)
        for attempt in range(2):
            try:
                resp = self._first_get(url, repository, headers, timeout)
            except Unauthorized:
                # A signed CDN URL may have expired: resolve it again, once.
                redirected = self._redirects.pop(url, url) != url
                if attempt or not redirected:
                    raise
                continue
            except NotFound:
                raise NotFound(f"{self.host}: blob {digest} not found in {repository}") from None
            if resp.status == 206 and not (resp.headers.get("Content-Range") or "").startswith(f"bytes {start}-"):
                resp.close()
                raise HTTPStatusError(f"{self.host}: asked for bytes from {start} of {digest}, got "
                                      f"{resp.headers.get('Content-Range')!r}", code=502)
            return resp
        raise AssertionError("unreachable")

    # ---- uploads -------------------------------------------------------------------
    def mount(self, repository: str, digest: str, source: str) -> str | None:
        """Cross-repository mount; None when mounted, else the upload URL the registry opened."""
        query = urllib.parse.urlencode({"mount": digest, "from": source})
        scope = f"{self.scope(repository, 'pull,push')} {self.scope(source, 'pull')}"
        resp = self.request("POST", f"/v2/{repository}/blobs/uploads/?{query}", scope=scope,
                            body=b"", ok=(201, 202))
        with resp:
            if resp.status == 201:
                return None
            return urllib.parse.urljoin(self.url("/"), resp.headers["Location"])

    def start_upload(self, repository: str) -> str:
        resp = self.request("POST", f"/v2/{repository}/blobs/uploads/",
                            scope=self.scope(repository, "pull,push"), body=b"", ok=(202,))
        with resp:
            return urllib.parse.urljoin(self.url("/"), resp.headers["Location"])

    @staticmethod
    def _with_query(url: str, **params: str) -> str:
        return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(params)

    def upload(self, repository: str, location: str, path: Path, digest: str, size: int, *,
               chunk_size: int, progress: Callable[[int], None] | None = None) -> None:
        """Send a file to an open upload: one PUT when it fits `chunk_size`, else PATCHes + PUT."""
        scope = self.scope(repository, "pull,push")
        if size <= chunk_size:
            def body() -> BinaryIO:
                return _Reader(path, 0, size, progress)
            resp = self.request("PUT", self._with_query(location, digest=digest), scope=scope,
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": str(size)},
                                body=body, ok=(201, 204))
            resp.close()
            return
        offset = 0
        while offset < size:
            n = min(chunk_size, size - offset)
            start = offset

            def part(start: int = start, n: int = n) -> BinaryIO:
                return _Reader(path, start, n, progress)
            resp = self.request("PATCH", location, scope=scope, body=part, ok=(202, 204),
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": str(n),
                                         "Content-Range": f"{start}-{start + n - 1}"})
            with resp:
                location = urllib.parse.urljoin(self.url("/"), resp.headers.get("Location") or location)
            offset += n
        resp = self.request("PUT", self._with_query(location, digest=digest), scope=scope,
                            headers={"Content-Length": "0"}, body=b"", ok=(201, 204))
        resp.close()


class _Reader:
    """A file slice as a request body: read() in large blocks, reporting bytes sent."""

    def __init__(self, path: Path, start: int, length: int,
                 progress: Callable[[int], None] | None) -> None:
        self._fh = open(path, "rb")
        self._fh.seek(start)
        self._left = length
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            self._fh.close()
            return b""
        # http.client asks for 8 KiB blocks; bigger reads keep pushes near disk speed.
        n = self._left if n is None or n < 0 else max(n, 1 << 20)
        data = self._fh.read(min(n, self._left))
        self._left -= len(data)
        if not data:
            self._left = 0
        if self._progress and data:
            self._progress(len(data))
        return data

    def close(self) -> None:
        self._fh.close()


__all__ = ["Registry", "HTTPStatusError", "NetworkError", "credentials", "MANIFEST_ACCEPT"]
