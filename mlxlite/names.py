"""Model names: `[host/][namespace/]model[:tag][@sha256:<hex>]` (DESIGN.md §5).

Pure: no I/O. `parse` accepts exactly the grammar and rejects anything that could
escape a path when the name becomes `manifests/<host>/<namespace>/<model>/<tag>`;
`ModelName.display` is the short form users see (default host and namespace dropped).
Lookup is case-insensitive: `ModelName.key` is the lowercased form the store files by.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlxlite.errors import InvalidName

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

MAX_PART = 128
MAX_HOST = 253
MAX_NAME = 600

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*(?::([0-9]+))?\Z")
MAX_PORT = 65535
_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})\Z")


def parse_digest(text: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` -> canonical `sha256:<lowercase hex>`."""
    if not isinstance(text, str):  # named by type: the repr of a deeply nested JSON value recurses
        raise InvalidName(f"invalid digest: expected sha256:<64 hex digits>, got {type(text).__name__}")
    match = _DIGEST.match(text)
    if not match:
        raise InvalidName(f"invalid digest {text!r}: expected sha256:<64 hex digits>")
    return "sha256:" + match.group(1).lower()


def _check_part(kind: str, part: str, full: str) -> str:
    if not part:
        raise InvalidName(f"invalid model name {full!r}: empty {kind}")
    if len(part) > MAX_PART:
        raise InvalidName(f"invalid model name {full!r}: {kind} longer than {MAX_PART} characters")
    if not _PART.match(part) or part in (".", ".."):
        raise InvalidName(
            f"invalid model name {full!r}: {kind} {part!r} must start with a letter or digit "
            "and hold only letters, digits, '.', '_' and '-'"
        )
    return part


@dataclass(frozen=True)
class ModelName:
    host: str = DEFAULT_HOST
    namespace: str = DEFAULT_NAMESPACE
    model: str = ""
    tag: str = DEFAULT_TAG
    digest: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Lowercased (host, namespace, model, tag): equal keys are the same model."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    @property
    def display(self) -> str:
        """Short form: `model:tag`, `ns/model:tag` or `host/ns/model:tag`."""
        host, namespace, model, tag = self.key
        # A namespace that looks like a host must keep the host, or it would re-parse as one.
        if host != DEFAULT_HOST or "." in namespace or namespace == "localhost":
            return f"{host}/{namespace}/{model}:{tag}"
        if namespace != DEFAULT_NAMESPACE:
            return f"{namespace}/{model}:{tag}"
        return f"{model}:{tag}"

    @property
    def full(self) -> str:
        host, namespace, model, tag = self.key
        return f"{host}/{namespace}/{model}:{tag}"

    @property
    def repository(self) -> str:
        """The OCI repository path on the registry: `namespace/model` (lowercase)."""
        return f"{self.namespace.lower()}/{self.model.lower()}"

    def with_tag(self, tag: str) -> ModelName:
        return ModelName(self.host, self.namespace, self.model, _check_part("tag", tag, tag))

    def __str__(self) -> str:
        return self.display


def parse(text: str) -> ModelName:
    """Parse a model name; raises `InvalidName` with the reason for anything else."""
    if not isinstance(text, str):
        raise InvalidName(f"invalid model name: expected a string, got {type(text).__name__}")
    full = text
    if text != text.strip():
        raise InvalidName(f"invalid model name {full!r}: surrounding whitespace")
    if not text:
        raise InvalidName("invalid model name: empty")
    if len(text) > MAX_NAME:
        raise InvalidName(f"invalid model name: longer than {MAX_NAME} characters")
    if "\x00" in text or "\\" in text or text.startswith("/") or "://" in text:
        raise InvalidName(f"invalid model name {full!r}")
    digest = None
    if "@" in text:
        text, _, digest_text = text.partition("@")
        digest = parse_digest(digest_text)
    parts = text.split("/")
    tag = DEFAULT_TAG
    last = parts[-1]
    if ":" in last:
        last, _, tag = last.rpartition(":")
        _check_part("tag", tag, full)
    parts[-1] = last
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 1:
        (model,) = parts
    elif len(parts) == 2:
        first, model = parts
        if "." in first or ":" in first or first.lower() == "localhost":
            host = first
        else:
            namespace = first
    elif len(parts) == 3:
        host, namespace, model = parts
    else:
        raise InvalidName(f"invalid model name {full!r}: at most host/namespace/model")
    _check_part("model", model, full)
    _check_part("namespace", namespace, full)
    check_host(host, full)
    return ModelName(host, namespace, model, tag, digest)


def check_host(host: str, full: str | None = None) -> str:
    """A registry host as names allow it: `name[:port]`, port 1..65535; else `InvalidName`.

    Registry clients call it too, so a name that can't be valid fails before any lookup.
    """
    what = f"invalid model name {full!r}" if full is not None else "invalid registry host"
    host_match = _HOST.match(host) if isinstance(host, str) else None
    if not host_match or len(host) > MAX_HOST or ".." in host:
        raise InvalidName(f"{what}: bad host {host!r}")
    port = host_match.group(1)
    # One spelling per port (no leading zeros) keeps one store key per registry.
    if port is not None and (port[0] == "0" or len(port) > 5 or int(port) > MAX_PORT):
        raise InvalidName(f"{what}: port {port} in host {host!r} "
                          f"must be a number from 1 to {MAX_PORT} without leading zeros")
    return host


def is_name(text: str) -> bool:
    try:
        parse(text)
    except InvalidName:
        return False
    return True
