"""OCI image manifests of models: media types, layers, canonical bytes (DESIGN.md §4).

Pure data: parsing checks the shape (schemaVersion 2, sized and digested layers, safe
`org.opencontainers.image.title` file names) and raises `IntegrityError`/`BadRequest`;
`build_manifest` writes canonical bytes so the same model always has the same digest.
No I/O, no mlx.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from mlxlite import names
from mlxlite.errors import BadRequest, IntegrityError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.mlxlite.model.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
TITLE = "org.opencontainers.image.title"

# Layer media types. Files keep Ollama's type for GGUF weights so Ollama's own
# manifests and ours read the same way; every file layer also carries its title.
MEDIA_GGUF = "application/vnd.ollama.image.model"
MEDIA_FILE = "application/vnd.mlxlite.file.v1"
MEDIA_TEMPLATE = "application/vnd.mlxlite.image.template.jinja"
MEDIA_OLLAMA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"



def digest_hex(digest: str) -> str:
    return names.parse_digest(digest).split(":", 1)[1]


def check_title(title: str) -> str:
    """A layer title is a relative file path with safe parts; nothing that escapes."""
    if not isinstance(title, str) or not title or len(title) > 512 or "\x00" in title:
        raise BadRequest(f"invalid file name {title!r} in manifest")
    parts = title.split("/")
    if title.startswith("/") or "\\" in title or any(p in ("", ".", "..") for p in parts):
        raise BadRequest(f"invalid file name {title!r} in manifest")
    return title


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def title(self) -> str | None:
        return self.annotations.get(TITLE)

    def to_json(self) -> dict:
        out = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, data: dict) -> Layer:
        if not isinstance(data, dict):
            raise IntegrityError("manifest layer is not an object")
        size = data.get("size")
        media = data.get("mediaType")
        if not isinstance(size, int) or size < 0 or not isinstance(media, str):
            raise IntegrityError("manifest layer lacks a valid size or mediaType")
        annotations = data.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise IntegrityError("manifest layer annotations are not an object")
        if TITLE in annotations:
            check_title(annotations[TITLE])
        return cls(media, names.parse_digest(data.get("digest", "")), size, dict(annotations))


@dataclass(frozen=True)
class Manifest:
    raw: bytes
    digest: str
    config: Layer
    layers: tuple[Layer, ...]

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise IntegrityError(f"manifest is not JSON: {exc}") from None
        except RecursionError:  # json's decoder recurses per nesting level
            raise IntegrityError("manifest is not JSON that can be read: nested too deeply") from None
        if not isinstance(data, dict) or data.get("schemaVersion") != 2:
            raise IntegrityError("manifest is not a schemaVersion 2 image manifest")
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise IntegrityError("manifest has no layer list")
        return cls(
            raw,
            "sha256:" + hashlib.sha256(raw).hexdigest(),
            Layer.from_json(data.get("config")),
            tuple(Layer.from_json(layer) for layer in layers),
        )

    @property
    def blobs(self) -> tuple[Layer, ...]:
        return (self.config, *self.layers)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.blobs)

    def files(self) -> dict[str, Layer]:
        """Layers that are files: titled ones, plus Ollama's untitled GGUF weights."""
        out: dict[str, Layer] = {}
        for layer in self.layers:
            if layer.title:
                out[layer.title] = layer
            elif layer.media_type == MEDIA_GGUF and "model.gguf" not in out:
                out["model.gguf"] = layer
        return out

    def layers_of(self, media_type: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type == media_type]

    def template_layer(self) -> Layer | None:
        """The model's prompt template: the last jinja or Ollama Go template layer."""
        found = [layer for layer in self.layers if layer.media_type in (MEDIA_TEMPLATE, MEDIA_OLLAMA_TEMPLATE)]
        return found[-1] if found else None


def build_manifest(config_layer: Layer, layers: list[Layer]) -> bytes:
    """Canonical OCI manifest bytes (sorted keys, so the same model -> same digest)."""
    data = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_layer.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
