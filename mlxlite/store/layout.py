"""Model packages: OCI image layouts (a directory, or the same as a tar file).

A layout holds `oci-layout`, `index.json` (one manifest descriptor per model, its name in
the `org.opencontainers.image.ref.name` annotation) and `blobs/sha256/<hex>` for every
manifest, config and layer: the format `skopeo`, `oras` and other OCI tools read and write.

`pack` writes one: a directory gets its blobs hardlinked from the store (copied across
file systems), index.json last; a `.tar` path gets a tar streamed blob by blob through
bounded buffers into a temp file renamed into place, each blob hashed on the way out.

`import_layout` reads one, with a registry pull's guarantees: every blob is verified
against its digest while it is read, blobs already in the store are skipped, the
manifest is committed last (byte for byte, so the digest is kept), all under
`store.writing()`. A bad package (flipped byte, truncated tar, missing blob, unsafe
member) raises a typed error and no model appears; blobs verified before the failure may
stay, unreferenced, until `prune`. Nothing is ever extracted: tar members are only read
into the store's blob writer, so no member name can write outside the store. A layout
directory on the store's file system costs no copy: each blob is hashed, then hardlinked
(so the package and the store share those files, as with the other importers).
The writing side is `pack.py`; the format and the safe readers `oci_layout.py`.
Never imports mlx.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from mlxlite import names
from mlxlite.errors import BadRequest, IntegrityError, MlxliteError, Unsupported
from mlxlite.names import ModelName
from mlxlite.progress import Printer
from mlxlite.store.blobio import CHUNK, hash_file
from mlxlite.store.imported import ImportResult, default_name, staged
from mlxlite.store.manifest import CONFIG_MEDIA_TYPE, DOCKER_MANIFEST, OCI_MANIFEST, Layer, Manifest
from mlxlite.store.oci_layout import (
    DOCKER_LIST,
    INDEX_FILE,
    LAYOUT_FILE,
    MAX_MEMBERS,
    OCI_INDEX,
    REF_NAME,
    DirSource,
    Progress,
    TarSource,
    blob_rel,
    blob_ticker,
    normalize,
    read_small,
    ref_of,
)
from mlxlite.store.pack import PackResult, pack
from mlxlite.store.store import ModelEntry, Store

__all__ = ["REF_NAME", "PackResult", "pack", "import_layout", "import_layout_result", "pull",
           "parse_source", "is_source", "is_layout", "plain_progress"]

SOURCE_PREFIX = "oci-layout:"

# Layer types that make a manifest a model even without our config (Ollama's models).
_MODEL_MEDIA_PREFIXES = ("application/vnd.ollama.image.", "application/vnd.mlxlite.")


def _quiet(_: dict) -> None:
    pass


class _SayStream:
    """A text stream whose complete lines go to `say` (the importers' logging hook)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say, self.buffer = say, ""

    def write(self, text: str) -> None:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.say(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def plain_progress(say: Callable[[str], None]) -> Progress:
    """Progress events rendered as a registry pull renders them in a pipe, through `say`."""
    return Printer(_SayStream(say), tty=False)  # type: ignore[arg-type]


# ---- sources: "oci-layout:PATH[:REF]" and detection -------------------------------------
def is_source(text: str) -> bool:
    return isinstance(text, str) and text.startswith(SOURCE_PREFIX)


def parse_source(text: str) -> tuple[Path, str | None]:
    """`oci-layout:PATH[:REF]` -> (path, ref). PATH may hold colons: the longest existing
    prefix wins, so `oci-layout:/x/m.tar:tiny:latest` means ref `tiny:latest`."""
    body = text[len(SOURCE_PREFIX):] if is_source(text) else text
    if not body:
        raise BadRequest("oci-layout: needs a path, e.g. oci-layout:./model.tar[:REF]")
    if Path(body).expanduser().exists():
        return Path(body).expanduser(), None
    cut = len(body)
    while (cut := body.rfind(":", 0, cut)) > 0:
        path = Path(body[:cut]).expanduser()
        if path.exists():
            return path, body[cut + 1:] or None
    raise BadRequest(f"{body.split(':', 1)[0]}: no such OCI layout (file or directory)")


def is_layout(path: Path) -> bool:
    """A directory with an `oci-layout` file, or a tar file with such a member."""
    path = Path(path)
    if path.is_dir():
        return (path / LAYOUT_FILE).is_file()
    if not path.is_file():
        return False
    try:
        with tarfile.open(path, "r:*") as tar:
            for i, member in enumerate(tar):
                if normalize(member.name) == LAYOUT_FILE:
                    return True
                if i > MAX_MEMBERS:
                    return False
    except (tarfile.TarError, OSError, EOFError):
        return False
    return False


# ---- import ----------------------------------------------------------------------------
def _same_name(a: str, b: str) -> bool:
    try:
        return names.parse(a).key == names.parse(b).key
    except MlxliteError:
        return False


def _pick(descriptors: list[dict], ref: str | None, label: str) -> dict:
    if not descriptors:
        raise BadRequest(f"{label}: the index lists no manifests")
    refs = [ref_of(d) or d.get("digest", "?") for d in descriptors]
    if ref is None:
        if len(descriptors) == 1:
            return descriptors[0]
        raise BadRequest(f"{label} holds {len(descriptors)} models ({', '.join(map(str, refs))}); "
                         f"pick one: mlxlite pull oci-layout:{label}:REF")
    for match in (lambda d: ref_of(d) == ref,
                  lambda d: d.get("digest") == ref,
                  lambda d: ref_of(d) is not None and _same_name(ref_of(d), ref)):
        found = [d for d in descriptors if match(d)]
        if found:
            return found[-1]  # several with one ref: the last written wins, as OCI tools do
    raise BadRequest(f"{label} has no model {ref!r}; it holds: {', '.join(map(str, refs))}")


def _model_name(ref_name: str | None, path: Path) -> ModelName:
    """ref.name `model:tag` (ours) names the model; a bare tag (skopeo's `oci:DIR:tag`)
    is the tag of a model named after the layout; none -> the layout's name."""
    stem = path.name
    for suffix in (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    base = default_name(path.with_name(stem or "model"))
    if ref_name:
        with contextlib.suppress(MlxliteError):
            if ":" in ref_name or "/" in ref_name:
                return names.parse(ref_name)
            return names.parse(f"{base.model}:{ref_name}")
    return base


def _check_is_model(manifest: Manifest, label: str) -> None:
    if manifest.config.media_type == CONFIG_MEDIA_TYPE:
        return
    if any(layer.media_type.startswith(_MODEL_MEDIA_PREFIXES) for layer in manifest.layers):
        return  # Ollama's models: Docker config, model/template/params layers
    kinds = sorted({layer.media_type for layer in manifest.layers})
    raise Unsupported(f"{label} is not an mlxlite model: its config is {manifest.config.media_type} "
                      f"and its layers are {', '.join(kinds) or 'none'} (a container image?); mlxlite "
                      "imports models packed by `mlxlite pack` or pushed by mlxlite or Ollama")


def import_layout(store: Store, path: str | Path, name: str | ModelName | None = None,
                  ref: str | None = None, progress: Progress = _quiet) -> ModelEntry:
    """Import one model from a layout directory or tar; returns the stored entry."""
    return import_layout_result(store, path, name, ref, progress).entry


def import_layout_result(store: Store, path: str | Path, name: str | ModelName | None = None,
                         ref: str | None = None, progress: Progress = _quiet, commit: bool = True) -> ImportResult:
    path = Path(path).expanduser()
    if not path.exists():
        raise BadRequest(f"{path}: no such file or directory")
    source: DirSource | TarSource = DirSource(path) if path.is_dir() else TarSource(path)
    try:
        progress({"status": "pulling manifest"})
        if source.size(LAYOUT_FILE) is None:
            raise BadRequest(f"{path} is not an OCI image layout: it has no oci-layout file")
        layout = read_small(source, LAYOUT_FILE, "the oci-layout file")
        try:
            version = json.loads(layout).get("imageLayoutVersion")
        except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, nested too deep
            version = None
        if not isinstance(version, str) or not version.startswith("1."):
            raise BadRequest(f"{path}: oci-layout is not an OCI image layout 1.x marker")
        try:
            index = json.loads(read_small(source, INDEX_FILE, "index.json"))
            descriptors = [d for d in index["manifests"] if isinstance(d, dict)]
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested past json's decoder
            raise BadRequest(f"{path}: index.json is not a valid OCI image index") from None
        chosen = _pick(descriptors, ref, str(path))
        media = chosen.get("mediaType")
        if media in (OCI_INDEX, DOCKER_LIST):
            raise Unsupported(f"{path}: {ref or 'the model'} is a multi-platform image index, not a model")
        if media not in (OCI_MANIFEST, DOCKER_MANIFEST, None):
            raise Unsupported(f"{path}: manifest media type {media!r} is not an image manifest")
        digest = names.parse_digest(chosen.get("digest", ""))
        size = chosen.get("size")
        raw = read_small(source, blob_rel(digest), f"manifest {digest}",
                          size if isinstance(size, int) else None)
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise IntegrityError(f"{path}: manifest {digest} is corrupt (its bytes hash differently)")
        manifest = Manifest.parse(raw)
        _check_is_model(manifest, str(path))
        model = names.parse(name) if isinstance(name, str) else name or _model_name(ref_of(chosen), path)
        # Every blob must be there with its size before the first byte is written.
        for layer in manifest.blobs:
            if store.has_blob(layer.digest, layer.size):
                continue
            found = source.size(blob_rel(layer.digest))
            if found is None:
                raise IntegrityError(f"{path}: blob {layer.digest} named by the manifest is missing")
            if found != layer.size:
                raise IntegrityError(f"{path}: blob {layer.digest} has {found} bytes, the manifest says {layer.size}")
        with store.writing():
            methods, copied = _copy_blobs(store, source, manifest.blobs, progress)
            progress({"status": "verifying sha256 digest"})
            if not commit:  # the caller writes its own manifest over these blobs (importers.import_path)
                return ImportResult(staged(model, raw), dict(methods), copied)
            progress({"status": "writing manifest"})
            store.write_manifest(model, raw)
            entry = store.resolve(model)  # under the lock: an rm right after cannot make it "not found"
        progress({"status": "success"})
        return ImportResult(entry, dict(methods), copied)
    finally:
        source.close()


def _copy_blobs(store: Store, source: DirSource | TarSource, blobs: Iterable[Layer],
                progress: Progress) -> tuple[Counter, int]:
    methods: Counter[str] = Counter()
    copied = 0
    seen: set[str] = set()
    for layer in blobs:
        if layer.digest in seen:
            continue
        seen.add(layer.digest)
        tick = blob_ticker(progress, "pulling", layer.digest, layer.size)
        if store.has_blob(layer.digest, layer.size):
            tick(layer.size)
            methods["existing"] += 1
            continue
        rel = blob_rel(layer.digest)
        src = source.path_for_link(rel, store)
        if src is not None:
            actual, size = hash_file(src, tick)  # verify first, then link without a copy
            _expect(layer, actual, size, source.label)
            _, _, method = store.put_file(src, known_digest=actual)
            methods[method] += 1
            copied += size if method == "copy" else 0
            continue
        with store.blob_writer() as writer:
            try:
                with source.open(rel) as fh:
                    while chunk := fh.read(CHUNK):
                        writer.write(chunk)
                        tick(len(chunk))
                        if writer.size > layer.size:
                            break
            except (tarfile.TarError, EOFError) as exc:
                raise IntegrityError(f"{source.label}: blob {layer.digest} is truncated: {exc}") from None
            if writer.size != layer.size:
                raise IntegrityError(f"{source.label}: blob {layer.digest} has {writer.size} bytes, "
                                     f"expected {layer.size}; no model was written")
            try:
                writer.commit(layer.digest)
            except IntegrityError:
                raise IntegrityError(f"{source.label}: blob {layer.digest} is corrupt (its content hashes "
                                     "differently); no model was written") from None
        methods["copy"] += 1
        copied += layer.size
    return methods, copied


def _expect(layer: Layer, actual: str, size: int, label: str) -> None:
    if size != layer.size:
        raise IntegrityError(f"{label}: blob {layer.digest} has {size} bytes, expected {layer.size}")
    if actual != layer.digest:
        raise IntegrityError(f"{label}: blob {layer.digest} is corrupt (its content hashes to {actual}); "
                             "no model was written")


def pull(store: Store, source: str, name: str | ModelName | None = None,
         progress: Progress = _quiet) -> ModelEntry:
    """`mlxlite pull oci-layout:PATH[:REF]`: the ref picks the model when there are several."""
    path, ref = parse_source(source)
    return import_layout(store, path, name=name, ref=ref, progress=progress)
