"""Images in requests: base64 strings, data URLs and (when allowed) http(s) URLs to bytes.

Owns the checks every API shares before an image reaches the scheduler: base64 that
decodes, bytes that start like an image (PNG, JPEG, GIF, WebP, BMP), at most
`max_image_bytes` each and `max_images` per request, http(s) URLs refused unless the
`image_fetch` setting is on (then fetched with a size cap and a timeout). A fetch reaches
public addresses only, unless `image_fetch` is `private` (a request must not make the daemon
reach loopback, the LAN or a cloud metadata address): the host is resolved once, every
address it resolves to is checked (`address_refusal`), and the connection goes to a checked
address, with the URL's host name in the Host header and TLS SNI (no second lookup for DNS
rebinding to answer differently); each redirect hop is checked the same way. Every failure
is a `BadRequest` naming where in the request the image was. Pixels are decoded on the MLX
thread by the engine (mlx-vlm's extra), never here: standard library only, never imports
mlx, Pillow or the engine.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import re
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Iterable

from mlxlite import config
from mlxlite.errors import BadRequest

FETCH_TIMEOUT = 10.0          # seconds for one http(s) image fetch
MAX_REDIRECTS = 5
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Refusal = Callable[[IPAddress], "str | None"]   # an address -> why not to connect to it, or None
_NAT64 = ipaddress.ip_network("64:ff9b::/96")   # RFC 6052: the last 32 bits are the IPv4 address reached
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.IGNORECASE)


def sniff(data: bytes) -> str | None:
    """The image format the bytes start with, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM" and len(data) > 26:
        return "bmp"
    return None


def _max_bytes() -> int:
    return int(config.get("max_image_bytes"))


def _checked(data: bytes, where: str) -> bytes:
    if len(data) > _max_bytes():
        raise BadRequest(f"invalid {where}: the image is {len(data)} bytes, more than the limit of "
                         f"{_max_bytes()} (max_image_bytes)")
    if not data:
        raise BadRequest(f"invalid {where}: the image is empty")
    if sniff(data) is None:
        raise BadRequest(f"invalid {where}: not an image (expected PNG, JPEG, GIF, WebP or BMP bytes)")
    return data


def from_base64(value: object, where: str) -> bytes:
    """An image sent as base64 (Ollama's `images`, Anthropic's `source.data`); a data URL
    is taken too, as some clients send one there."""
    if not isinstance(value, str):
        raise BadRequest(f"invalid {where}: expected a base64 string")
    if _DATA_URL.match(value):
        return from_url(value, where)
    text = "".join(value.split())
    if len(text) * 3 // 4 > _max_bytes() + 3:       # refused before decoding it
        raise BadRequest(f"invalid {where}: the image is more than the limit of {_max_bytes()} bytes "
                         "(max_image_bytes)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"invalid {where}: not valid base64") from None
    return _checked(data, where)


def from_url(value: object, where: str) -> bytes:
    """An image named by URL (OpenAI's `image_url`, Responses' `input_image`, Anthropic's
    `url` source): a data URL, or http(s) when `image_fetch` is on."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"invalid {where}: expected a URL string")
    m = _DATA_URL.match(value)
    if m:
        payload = value[m.end():]
        if not m.group(3):
            raise BadRequest(f"invalid {where}: a data URL of an image must be base64 (';base64,')")
        return from_base64(payload, where)
    scheme = value.split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise BadRequest(f"invalid {where}: expected a data URL or an http(s) URL")
    allowed = config.get("image_fetch")
    if allowed == "off":
        raise BadRequest(f"invalid {where}: image URLs are not fetched; send the image as a data URL "
                         "(data:image/png;base64,...) or set MLXLITE_IMAGE_FETCH=1")
    return _checked(fetch(value, where, None if allowed == "private" else address_refusal), where)


# ---- fetching, from public addresses only -----------------------------------------------------
def address_refusal(ip: IPAddress) -> str | None:
    """Why an image fetch must not connect to `ip` ("a loopback address", ...), or None for a
    globally routable unicast address. An IPv6 address that reaches an IPv4 one (mapped, or
    NAT64's 64:ff9b::/96) is judged as that one; a 6to4 address is refused when its IPv4 is."""
    if isinstance(ip, ipaddress.IPv6Address):
        reached = ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        inner = reached or ip.sixtofour
        if inner is not None and (why := address_refusal(inner)):
            return f"{why} ({inner})"
        if reached is not None:
            return None
        if ip.is_site_local:
            return "a site-local address"
    for refused, why in ((ip.is_unspecified, "an unspecified address"), (ip.is_loopback, "a loopback address"),
                         (ip.is_link_local, "a link-local address"), (ip.is_multicast, "a multicast address"),
                         (ip.is_reserved, "a reserved address"), (ip.is_private, "a private address"),
                         (not ip.is_global, "an address that is not globally routable")):
        if refused:
            return why
    return None


def fetch(url: str, where: str, refuse: Refusal | None = address_refusal) -> bytes:
    """The body of an http(s) URL, following redirects; every hop's addresses pass `refuse`
    (None: any address) before anything connects to them."""
    limit = _max_bytes()
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        except ValueError:      # a port that is not a number, or out of range
            raise BadRequest(f"invalid {where}: bad image URL {url!r}") from None
        if scheme not in ("http", "https") or not host:
            raise BadRequest(f"invalid {where}: an image URL must be http(s) with a host, not {url!r}")
        addresses = _resolve(host, port, url, where, refuse)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            status, location, data = _get(scheme, host, port, addresses, target, limit)
        except (OSError, http.client.HTTPException) as exc:    # ssl.SSLError and timeouts are OSErrors
            raise BadRequest(f"invalid {where}: fetching the image failed: {exc}") from None
        if status in (301, 302, 303, 307, 308) and location:
            url = urllib.parse.urljoin(url, location)
            continue
        if status != 200:
            raise BadRequest(f"invalid {where}: fetching the image failed: HTTP {status}")
        if len(data) > limit:
            raise BadRequest(f"invalid {where}: the image is more than the limit of {limit} bytes "
                             "(max_image_bytes)")
        return data
    raise BadRequest(f"invalid {where}: fetching the image failed: more than {MAX_REDIRECTS} redirects")


def _resolve(host: str, port: int, url: str, where: str, refuse: Refusal | None) -> list[tuple]:
    """`host`'s addresses (one lookup), each checked: one refused refuses the URL."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise BadRequest(f"invalid {where}: fetching the image failed: cannot resolve {host}: {exc}") from None
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0])
        why = refuse(ip) if refuse is not None else None
        if why:
            named = f"{host} is {why}" if host == str(ip) else f"{host} resolves to {ip}, {why}"
            raise BadRequest(f"invalid {where}: not fetching {url}: {named}; image URLs may name public "
                             "addresses only (MLXLITE_IMAGE_FETCH=private allows the rest)")
    return infos


def _connect(addresses: list[tuple], timeout: float) -> socket.socket:
    error: OSError = OSError("no address to connect to")
    for family, kind, proto, _, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


class _Pinned(http.client.HTTPConnection):
    """HTTP to the addresses already checked; the Host header still names the URL's host."""

    def __init__(self, host: str, port: int, addresses: list[tuple]) -> None:
        super().__init__(host, port, timeout=FETCH_TIMEOUT)
        self.addresses = addresses

    def connect(self) -> None:
        self.sock = _connect(self.addresses, FETCH_TIMEOUT)


class _PinnedTLS(http.client.HTTPSConnection):
    """HTTPS to the addresses already checked; SNI and the certificate check use the URL's host."""

    def __init__(self, host: str, port: int, addresses: list[tuple]) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=FETCH_TIMEOUT, context=self.tls)
        self.addresses = addresses

    def connect(self) -> None:
        self.sock = self.tls.wrap_socket(_connect(self.addresses, FETCH_TIMEOUT), server_hostname=self.host)


def _get(scheme: str, host: str, port: int, addresses: list[tuple], target: str,
         limit: int) -> tuple[int, str | None, bytes]:
    """(status, Location, at most `limit` + 1 body bytes) of one GET."""
    conn = (_PinnedTLS if scheme == "https" else _Pinned)(host, port, addresses)
    try:
        conn.request("GET", target, headers={"User-Agent": "mlxlite", "Accept": "image/*", "Connection": "close"})
        resp = conn.getresponse()
        data = resp.read(limit + 1) if resp.status == 200 else b""
        return resp.status, resp.getheader("Location"), data
    finally:
        conn.close()


def check_count(messages: Iterable[dict], extra: int = 0) -> None:
    """At most `max_images` images in one request (across its messages)."""
    total = extra + sum(len(m.get("images") or ()) for m in messages)
    limit = int(config.get("max_images"))
    if total > limit:
        raise BadRequest(f"too many images: the request has {total}, the limit is {limit} (max_images)")


# ---- each API's image part -------------------------------------------------------------------
def openai_image(part: dict, where: str) -> bytes:
    """Chat completions' `{"type": "image_url", "image_url": {"url": ...}}` (a bare string URL too)."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    return from_url(url, f"{where}.image_url.url")


def anthropic_image(block: dict, where: str) -> bytes:
    """Messages' `{"type": "image", "source": {"type": "base64", "media_type", "data"}}` or a `url` source."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        return from_base64(source.get("data"), f"{where}.source.data")
    if kind == "url":
        return from_url(source.get("url"), f"{where}.source.url")
    raise BadRequest(f"invalid {where}.source: expected a base64 or url image source")


def responses_image(part: dict, where: str) -> bytes:
    """Responses' `{"type": "input_image", "image_url": ...}`; a `file_id` names a stored file,
    and nothing is stored here."""
    if part.get("image_url") is None and part.get("file_id") is not None:
        raise BadRequest(f"invalid {where}.file_id: files are not stored here; send the image as image_url "
                         "(a data URL)")
    return from_url(part.get("image_url"), f"{where}.image_url")
