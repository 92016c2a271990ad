"""The store wing: content-addressed blobs and OCI manifests under `$MLXLITE_HOME/models`.

Owns (DESIGN.md §4): `Store` (blobs hashed while written, fsynced, renamed; a manifest
written last; views, prune, the writer lock), verify and repair (`repair`: `BadBlob`), the
manifest vocabulary (media types, `Layer`, `Manifest`), the manifest tree on disk, never
through a symlink (`manifest_tree`), blob I/O (`blobio`), the record of where imported blobs
came from (`sources`, `models/sources.json`), the memo of blobs hashed sound and the
load-time check that trusts it (`verified`, `models/verified.json`), and the verbs that
bring models already on disk in or out: `importers` (GGUF files, model directories, the
Hugging Face cache, an Ollama store), `layout` and `pack` (OCI image layouts). Those verbs
are imported as modules (`from mlxlite.store import importers`) so that `list` does not pay
for tarfile.
Imports only `formats/` and the ground floor; never imports mlx, a network client, or any
wing above it.
"""

from mlxlite.store.blobio import TMP_PREFIX
from mlxlite.store.manifest import (
    CONFIG_MEDIA_TYPE,
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MEDIA_ADAPTER,
    MEDIA_FILE,
    MEDIA_GGUF,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_OLLAMA_TEMPLATE,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    OCI_MANIFEST,
    TITLE,
    Layer,
    Manifest,
    build_manifest,
    check_title,
    digest_hex,
)
from mlxlite.store.repair import BadBlob
from mlxlite.store.store import ModelEntry, Store

__all__ = [
    "Store", "ModelEntry", "BadBlob", "Layer", "Manifest", "build_manifest", "check_title", "digest_hex",
    "CONFIG_MEDIA_TYPE", "DOCKER_CONFIG", "DOCKER_MANIFEST", "OCI_MANIFEST", "TITLE", "MEDIA_ADAPTER",
    "MEDIA_FILE", "MEDIA_GGUF", "MEDIA_LICENSE", "MEDIA_MESSAGES", "MEDIA_OLLAMA_TEMPLATE", "MEDIA_PARAMS",
    "MEDIA_PROJECTOR", "MEDIA_SYSTEM", "MEDIA_TEMPLATE", "TMP_PREFIX",
]
