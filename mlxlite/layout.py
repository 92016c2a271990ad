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
into the store's blob writer, so no member name can write outside the store.
Never imports mlx.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import secrets
import shutil
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from mlxlite import names
from mlxlite.errors import BadRequest, IntegrityError, MlxliteError, Unsupported
from mlxlite.names import ModelName
from mlxlite.store import (
    CHUNK,
    CONFIG_MEDIA_TYPE,
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Layer,
    Manifest,
    ModelEntry,
    Store,
    _reflink,
    digest_hex,
    hash_file,
)

if TYPE_CHECKING:
    from mlxlite.importers import ImportResult

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"
SOURCE_PREFIX = "oci-layout:"
MAX_META = 4 << 20  # index.json and manifests; registries cap manifests at 4 MiB too
MAX_MEMBERS = 100_000
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: tarfile reads them too

# Layer types that make a manifest a model even without our config (Ollama's models).
_MODEL_MEDIA_PREFIXES = ("application/vnd.ollama.image.", "application/vnd.mlxlite.")

Progress = Callable[[dict], None]


@dataclass(frozen=True)
class PackResult:
    path: Path
    kind: str  # "dir" or "tar"
    refs: tuple[str, ...]
    size: int  # bytes of blobs the package holds for these models
    methods: dict[str, int] = field(default_factory=dict)  # hardlink/reflink/copy/existing/stream

    def summary(self) -> str:
        how = ", ".join(f"{n} {m}" for m, n in sorted(self.methods.items()))
        return f"packed {', '.join(self.refs)} into {self.path} ({self.kind}, {self.size} bytes; {how})"


def _quiet(_: dict) -> None:
    pass


def _ticker(emit: Progress, verb: str, digest: str, total: int) -> Callable[[int], None]:
    """Byte increments -> progress.layer's throttled, never-backwards events."""
    from mlxlite import progress as progress_events

    report = progress_events.layer(emit, verb, digest, total)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        report(done)

    return tick


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
    from mlxlite.progress import Printer

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
                if _normalize(member.name) == LAYOUT_FILE:
                    return True
                if i > MAX_MEMBERS:
                    return False
    except (tarfile.TarError, OSError, EOFError):
        return False
    return False


# ---- pack --------------------------------------------------------------------------------
def _manifest_media(manifest: Manifest) -> str:
    try:
        media = json.loads(manifest.raw).get("mediaType")
    except ValueError:  # pragma: no cover - Manifest.parse already parsed it
        media = None
    return media if isinstance(media, str) and media else OCI_MANIFEST


def _descriptor(entry: ModelEntry) -> dict:
    return {"mediaType": _manifest_media(entry.manifest), "digest": entry.digest,
            "size": len(entry.manifest.raw), "annotations": {REF_NAME: entry.name.display}}


def _index_bytes(descriptors: list[dict]) -> bytes:
    data = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"


def _layout_bytes() -> bytes:
    return json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode()


def _blobs_of(entries: list[ModelEntry]) -> list[tuple[str, int, bytes | None]]:
    """(digest, size, bytes for manifests) of every blob, deduplicated, manifests first."""
    out: dict[str, tuple[str, int, bytes | None]] = {}
    for entry in entries:
        out.setdefault(entry.digest, (entry.digest, len(entry.manifest.raw), entry.manifest.raw))
    for entry in entries:
        for layer in entry.manifest.blobs:
            out.setdefault(layer.digest, (layer.digest, layer.size, None))
    return list(out.values())


def pack(store: Store, name: str | ModelName | Iterable[str | ModelName], out_path: str | Path,
         progress: Progress = _quiet) -> PackResult:
    """Write the named model(s) as an OCI image layout: a `.tar` file, else a directory."""
    wanted = [name] if isinstance(name, (str, ModelName)) else list(name)
    if not wanted:
        raise BadRequest("pack needs at least one model name")
    out = Path(out_path).expanduser()
    with store.writing():  # rm/prune take the store exclusively: no blob vanishes mid-pack
        entries = [store.resolve(n) for n in wanted]
        for entry in entries:
            for layer in entry.manifest.blobs:
                if not store.has_blob(layer.digest, layer.size):
                    raise IntegrityError(f"model '{entry.name.display}' is damaged: blob {layer.digest} "
                                         "is missing or has the wrong size; pull or import it again")
        if out.name.lower().endswith(".tar"):
            methods = _pack_tar(store, entries, out, progress)
            kind = "tar"
        else:
            methods = _pack_dir(store, entries, out, progress)
            kind = "dir"
    size = sum(size for _, size, _ in _blobs_of(entries))
    progress({"status": "success"})
    return PackResult(out, kind, tuple(e.name.display for e in entries), size, dict(methods))


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _read_index(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_bytes())
        manifests = data["manifests"]
        if not isinstance(manifests, list):
            raise TypeError
        return [m for m in manifests if isinstance(m, dict)]
    except (OSError, ValueError, KeyError, TypeError):
        raise BadRequest(f"{path} is not a valid OCI index; refusing to overwrite it") from None


def _pack_dir(store: Store, entries: list[ModelEntry], out: Path, progress: Progress) -> Counter:
    """Blobs first (hardlink, reflink, copy), index.json last: readers never see a
    descriptor whose blobs are not there. An existing layout gains the models."""
    existing: list[dict] = []
    if out.exists():
        if not out.is_dir():
            raise BadRequest(f"{out} exists and is not a directory; use a new path (or one ending in .tar)")
        if (out / LAYOUT_FILE).is_file():
            existing = _read_index(out / INDEX_FILE) if (out / INDEX_FILE).exists() else []
        elif any(out.iterdir()):
            raise BadRequest(f"{out} is a non-empty directory without an oci-layout file; "
                             "pack into a new or empty directory")
    blob_dir = out / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    if not (out / LAYOUT_FILE).is_file():
        _write_atomic(out / LAYOUT_FILE, _layout_bytes())
    methods: Counter[str] = Counter()
    for digest, size, raw in _blobs_of(entries):
        dst = blob_dir / digest_hex(digest)
        tick = _ticker(progress, "packing", digest, size)
        if dst.is_file() and dst.stat().st_size == size:
            methods["existing"] += 1
        elif raw is not None:
            _write_atomic(dst, raw)
            methods["copy"] += 1
        else:
            methods[_place(store.blob_path(digest), dst)] += 1
        tick(size)
    refs = {e.name.display for e in entries}
    kept = [d for d in existing if (d.get("annotations") or {}).get(REF_NAME) not in refs]
    _write_atomic(out / INDEX_FILE, _index_bytes(kept + [_descriptor(e) for e in entries]))
    return methods


def _place(src: Path, dst: Path) -> str:
    """Put a store blob at dst: hardlink, then reflink, then a kernel-side copy."""
    tmp = _tmp_sibling(dst)
    try:
        try:
            os.link(src, tmp)
            method = "hardlink"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            if _reflink(src, tmp):
                method = "reflink"
            else:
                shutil.copyfile(src, tmp)  # sendfile on Linux, fcopyfile on macOS: bounded memory
                method = "copy"
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dst)
        return method
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class _HashingReader:
    """A store blob read for tarfile, hashed as it goes, so a corrupt store blob never
    leaves the machine inside a package."""

    def __init__(self, fh: BinaryIO, tick: Callable[[int], None]) -> None:
        self.fh, self.tick, self.hash = fh, tick, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.hash.update(data)
        self.tick(len(data))
        return data


def _tarinfo(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    # Fixed owner, mode and time: the same models always pack to the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = size, 0, 0, 0, "", ""
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    return info


def _pack_tar(store: Store, entries: list[ModelEntry], out: Path, progress: Progress) -> Counter:
    """Metadata first (oci-layout, index.json, manifests), then blobs streamed 1 MiB at a
    time into a temp file renamed into place: a reader of the tar can stop early, and a
    failed pack leaves nothing at `out`."""
    if out.is_dir():
        raise BadRequest(f"{out} is a directory; a .tar path must name a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out)
    methods: Counter[str] = Counter()
    try:
        with open(tmp, "xb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tar:
                index = _index_bytes([_descriptor(e) for e in entries])
                for name, data in ((LAYOUT_FILE, _layout_bytes()), (INDEX_FILE, index)):
                    tar.addfile(_tarinfo(name, len(data)), _BytesReader(data))
                tar.addfile(_tarinfo("blobs", directory=True))
                tar.addfile(_tarinfo("blobs/sha256", directory=True))
                for digest, size, raw in _blobs_of(entries):
                    info = _tarinfo(f"blobs/sha256/{digest_hex(digest)}", size)
                    tick = _ticker(progress, "packing", digest, size)
                    if raw is not None:
                        tar.addfile(info, _BytesReader(raw))
                        tick(size)
                        methods["copy"] += 1
                        continue
                    with open(store.blob_path(digest), "rb") as src:
                        reader = _HashingReader(src, tick)
                        tar.addfile(info, reader)
                    if "sha256:" + reader.hash.hexdigest() != digest:
                        raise IntegrityError(f"blob {digest} in the store is corrupt; run `mlxlite verify` "
                                             "and pull or import the model again (no package written)")
                    methods["stream"] += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return methods


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return chunk


# ---- reading layouts -----------------------------------------------------------------------
def _normalize(name: str) -> str:
    """A member path without `./` and empty parts ('' for the root)."""
    return "/".join(p for p in name.split("/") if p not in ("", "."))


class _DirSource:
    """A layout directory. Blob files must be regular files (symlinks are followed:
    reading through them is harmless, and every byte is verified anyway)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)
        self.dev = root.stat().st_dev

    def close(self) -> None:
        pass

    def _stat(self, rel: str) -> os.stat_result | None:
        try:
            st = (self.root / rel).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"{self.label}: {rel} is not a regular file")
        return st

    def size(self, rel: str) -> int | None:
        st = self._stat(rel)
        return None if st is None else st.st_size

    def open(self, rel: str) -> BinaryIO:
        return open(self.root / rel, "rb")

    def path_for_link(self, rel: str, store: Store) -> Path | None:
        """The file itself when it can be hardlinked into the store (same file system)."""
        st = self._stat(rel)
        store.blob_dir.mkdir(parents=True, exist_ok=True)
        return self.root / rel if st is not None and st.st_dev == store.blob_dir.stat().st_dev else None


class _TarSource:
    """A layout tar, checked member by member before any blob is read: no absolute or
    `..` names, no links leaving the layout, no devices, no duplicates, not truncated."""

    def __init__(self, path: Path) -> None:
        self.label = str(path)
        with open(path, "rb") as fh:
            self.compressed = fh.read(6).startswith(_COMPRESSED_MAGIC)
        try:
            self.tar = tarfile.open(path, "r:*" if self.compressed else "r:")
        except (tarfile.TarError, EOFError, OSError) as exc:
            reason = str(exc).splitlines()[0]  # tarfile lists every method it tried; one line will do
            raise BadRequest(f"{path} is not an OCI layout: not a readable tar file ({reason})") from None
        try:
            self.members = self._scan(path)
        except BaseException:
            self.tar.close()
            raise

    def close(self) -> None:
        self.tar.close()

    def _refuse(self, member: tarfile.TarInfo, why: str) -> BadRequest:
        return BadRequest(f"{self.label}: refusing tar member {member.name!r}: {why}")

    def _scan(self, path: Path) -> dict[str, tarfile.TarInfo]:
        members: dict[str, tarfile.TarInfo] = {}
        compressed = self.compressed
        total = path.stat().st_size
        last = None
        try:
            for count, member in enumerate(self.tar, 1):
                if count > MAX_MEMBERS:
                    raise BadRequest(f"{self.label}: more than {MAX_MEMBERS} members; not an OCI layout")
                self._check(member)
                norm = _normalize(member.name)
                if member.isreg() and norm in members:
                    raise self._refuse(member, "it appears twice in the archive")
                if not compressed and member.isreg() and member.offset_data + member.size > total:
                    raise IntegrityError(f"{self.label} is truncated: member {member.name!r} "
                                         f"ends past the end of the file")
                members[norm] = member
                last = member
        except (tarfile.TarError, EOFError) as exc:
            raise IntegrityError(f"{self.label} is truncated or damaged: {exc}") from None
        if not compressed:
            # tarfile stops quietly at a damaged or missing header; a whole archive ends
            # with zero blocks, so anything else at the stop point means damage.
            with open(path, "rb") as fh:
                fh.seek(self.tar.offset)
                tail = fh.read(tarfile.BLOCKSIZE)
            if len(tail) < tarfile.BLOCKSIZE or tail.strip(b"\0"):
                after = f" after member {last.name!r}" if last is not None else ""
                raise IntegrityError(f"{self.label} is truncated or damaged{after} "
                                     "(no end-of-archive marker)")
        return members

    def _check(self, member: tarfile.TarInfo) -> None:
        name = member.name
        if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
            raise self._refuse(member, "absolute path")
        if ".." in name.split("/") or "\\" in name:
            raise self._refuse(member, "path leads outside the layout")
        if member.issym() or member.islnk():
            target = member.linkname
            base = posixpath.dirname(_normalize(name)) if member.issym() else ""
            joined = posixpath.normpath(posixpath.join(base, target)) if target else ".."
            if target.startswith("/") or joined == ".." or joined.startswith("../"):
                raise self._refuse(member, f"link to {target!r} points outside the layout")
        elif not (member.isreg() or member.isdir()):
            raise self._refuse(member, "not a regular file or directory")
        if member.isreg() and member.issparse():
            raise self._refuse(member, "sparse files are not part of an OCI layout")

    def _member(self, rel: str) -> tarfile.TarInfo | None:
        member = self.members.get(rel)
        if member is not None and not member.isreg():
            raise BadRequest(f"{self.label}: member {rel} is a "
                             f"{'link' if member.issym() or member.islnk() else 'directory'}, "
                             "not a regular file")
        return member

    def size(self, rel: str) -> int | None:
        member = self._member(rel)
        return None if member is None else member.size

    def open(self, rel: str) -> BinaryIO:
        member = self._member(rel)
        assert member is not None
        return self.tar.extractfile(member)  # type: ignore[return-value]

    def path_for_link(self, rel: str, store: Store) -> Path | None:
        return None


def _read_small(source: _DirSource | _TarSource, rel: str, what: str, expect: int | None = None) -> bytes:
    size = source.size(rel)
    if size is None:
        raise IntegrityError(f"{source.label}: {what} ({rel}) is missing")
    if size > MAX_META:
        raise BadRequest(f"{source.label}: {what} is {size} bytes, larger than {MAX_META}")
    if expect is not None and size != expect:
        raise IntegrityError(f"{source.label}: {what} has {size} bytes, the index says {expect}")
    try:
        with source.open(rel) as fh:
            data = fh.read(MAX_META + 1)
    except (tarfile.TarError, EOFError) as exc:
        raise IntegrityError(f"{source.label}: {what} is truncated: {exc}") from None
    if len(data) != size:
        raise IntegrityError(f"{source.label}: {what} is truncated ({len(data)} of {size} bytes)")
    return data


def _blob_rel(digest: str) -> str:
    return f"blobs/sha256/{digest_hex(digest)}"


def _ref_of(descriptor: dict) -> str | None:
    ref = (descriptor.get("annotations") or {}).get(REF_NAME)
    return ref if isinstance(ref, str) and ref else None


def _same_name(a: str, b: str) -> bool:
    try:
        return names.parse(a).key == names.parse(b).key
    except MlxliteError:
        return False


def _pick(descriptors: list[dict], ref: str | None, label: str) -> dict:
    if not descriptors:
        raise BadRequest(f"{label}: the index lists no manifests")
    refs = [_ref_of(d) or d.get("digest", "?") for d in descriptors]
    if ref is None:
        if len(descriptors) == 1:
            return descriptors[0]
        raise BadRequest(f"{label} holds {len(descriptors)} models ({', '.join(map(str, refs))}); "
                         f"pick one: mlxlite pull oci-layout:{label}:REF")
    for match in (lambda d: _ref_of(d) == ref,
                  lambda d: d.get("digest") == ref,
                  lambda d: _ref_of(d) is not None and _same_name(_ref_of(d), ref)):
        found = [d for d in descriptors if match(d)]
        if found:
            return found[-1]  # several with one ref: the last written wins, as OCI tools do
    raise BadRequest(f"{label} has no model {ref!r}; it holds: {', '.join(map(str, refs))}")


def _model_name(ref_name: str | None, path: Path) -> ModelName:
    """ref.name `model:tag` (ours) names the model; a bare tag (skopeo's `oci:DIR:tag`)
    is the tag of a model named after the layout; none -> the layout's name."""
    from mlxlite.importers import default_name

    stem = path.name[:-4] if path.name.lower().endswith(".tar") else path.name
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
                         ref: str | None = None, progress: Progress = _quiet) -> ImportResult:
    from mlxlite.importers import ImportResult

    path = Path(path).expanduser()
    if not path.exists():
        raise BadRequest(f"{path}: no such file or directory")
    source: _DirSource | _TarSource = _DirSource(path) if path.is_dir() else _TarSource(path)
    try:
        progress({"status": "pulling manifest"})
        layout = _read_small(source, LAYOUT_FILE, "the oci-layout file")
        try:
            version = json.loads(layout).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if not isinstance(version, str) or not version.startswith("1."):
            raise BadRequest(f"{path}: oci-layout is not an OCI image layout 1.x marker")
        try:
            index = json.loads(_read_small(source, INDEX_FILE, "index.json"))
            descriptors = [d for d in index["manifests"] if isinstance(d, dict)]
        except (ValueError, KeyError, TypeError):
            raise BadRequest(f"{path}: index.json is not a valid OCI image index") from None
        chosen = _pick(descriptors, ref, str(path))
        media = chosen.get("mediaType")
        if media in (OCI_INDEX, DOCKER_LIST):
            raise Unsupported(f"{path}: {ref or 'the model'} is a multi-platform image index, not a model")
        if media not in (OCI_MANIFEST, DOCKER_MANIFEST, None):
            raise Unsupported(f"{path}: manifest media type {media!r} is not an image manifest")
        digest = names.parse_digest(chosen.get("digest", ""))
        size = chosen.get("size")
        raw = _read_small(source, _blob_rel(digest), f"manifest {digest}",
                          size if isinstance(size, int) else None)
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise IntegrityError(f"{path}: manifest {digest} is corrupt (its bytes hash differently)")
        manifest = Manifest.parse(raw)
        _check_is_model(manifest, str(path))
        model = names.parse(name) if isinstance(name, str) else name or _model_name(_ref_of(chosen), path)
        # Every blob must be there with its size before the first byte is written.
        for layer in manifest.blobs:
            if store.has_blob(layer.digest, layer.size):
                continue
            found = source.size(_blob_rel(layer.digest))
            if found is None:
                raise IntegrityError(f"{path}: blob {layer.digest} named by the manifest is missing")
            if found != layer.size:
                raise IntegrityError(f"{path}: blob {layer.digest} has {found} bytes, the manifest says {layer.size}")
        with store.writing():
            methods, copied = _copy_blobs(store, source, manifest.blobs, progress)
            progress({"status": "verifying sha256 digest"})
            progress({"status": "writing manifest"})
            store.write_manifest(model, raw)
        progress({"status": "success"})
        return ImportResult(store.resolve(model), dict(methods), copied)
    finally:
        source.close()


def _copy_blobs(store: Store, source: _DirSource | _TarSource, blobs: Iterable[Layer],
                progress: Progress) -> tuple[Counter, int]:
    methods: Counter[str] = Counter()
    copied = 0
    seen: set[str] = set()
    for layer in blobs:
        if layer.digest in seen:
            continue
        seen.add(layer.digest)
        tick = _ticker(progress, "pulling", layer.digest, layer.size)
        if store.has_blob(layer.digest, layer.size):
            tick(layer.size)
            methods["existing"] += 1
            continue
        rel = _blob_rel(layer.digest)
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
                                     f"expected {layer.size}; nothing was imported")
            try:
                writer.commit(layer.digest)
            except IntegrityError:
                raise IntegrityError(f"{source.label}: blob {layer.digest} is corrupt (its content hashes "
                                     "differently); nothing was imported") from None
        methods["copy"] += 1
        copied += layer.size
    return methods, copied


def _expect(layer: Layer, actual: str, size: int, label: str) -> None:
    if size != layer.size:
        raise IntegrityError(f"{label}: blob {layer.digest} has {size} bytes, expected {layer.size}")
    if actual != layer.digest:
        raise IntegrityError(f"{label}: blob {layer.digest} is corrupt (its content hashes to {actual}); "
                             "nothing was imported")


def pull(store: Store, source: str, name: str | ModelName | None = None,
         progress: Progress = _quiet) -> ModelEntry:
    """`mlxlite pull oci-layout:PATH[:REF]`: the ref picks the model when there are several."""
    path, ref = parse_source(source)
    return import_layout(store, path, name=name, ref=ref, progress=progress)
