"""Images in requests: base64 strings, data URLs and (when allowed) http(s) URLs to bytes.

Owns the checks every API shares before an image reaches the scheduler: base64 that
decodes, bytes that start like an image (PNG, JPEG, GIF, WebP, BMP), at most
`max_image_bytes` each and `max_images` per request, http(s) URLs refused unless the
`image_fetch` setting is on (then fetched with a size cap and a timeout). Every failure is a
`BadRequest` naming where in the request the image was. Pixels are decoded on the MLX thread
by the engine (mlx-vlm's extra), never here: standard library only, never imports mlx,
Pillow or the engine.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.error
import urllib.request
from collections.abc import Iterable

from mlxlite import config
from mlxlite.errors import BadRequest

FETCH_TIMEOUT = 10.0          # seconds for one http(s) image fetch
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
    if not config.get("image_fetch"):
        raise BadRequest(f"invalid {where}: image URLs are not fetched; send the image as a data URL "
                         "(data:image/png;base64,...) or set MLXLITE_IMAGE_FETCH=1")
    return _checked(_fetch(value, where), where)


def _fetch(url: str, where: str) -> bytes:
    limit = _max_bytes()
    request = urllib.request.Request(url, headers={"User-Agent": "mlxlite", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as resp:  # http(s) only: checked above
            data = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise BadRequest(f"invalid {where}: fetching the image failed: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BadRequest(f"invalid {where}: fetching the image failed: {reason}") from None
    if len(data) > limit:
        raise BadRequest(f"invalid {where}: the image is more than the limit of {limit} bytes (max_image_bytes)")
    return data


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
