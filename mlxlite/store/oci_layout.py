"""The OCI image layout format for `layout.py`: names, limits, index bytes, and safe
readers of a layout directory or tar.

A tar is checked member by member before any blob is read: no absolute or `..` names,
no links leaving the layout, no devices or FIFOs, no duplicate files, no truncation
(tarfile stops quietly at a damaged header; we don't). Nothing here extracts or writes
anything: readers hand out byte streams, the caller verifies digests. Never imports mlx.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mlxlite import progress as progress_events
from mlxlite.errors import BadRequest, IntegrityError
from mlxlite.store.manifest import OCI_MANIFEST, Manifest, digest_hex
from mlxlite.store.store import ModelEntry, Store

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"
MAX_META = 4 << 20  # index.json and manifests; registries cap manifests at 4 MiB too
MAX_MEMBERS = 100_000
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: tarfile reads them too

Progress = Callable[[dict], None]


def blob_ticker(emit: Progress, verb: str, digest: str, total: int) -> Callable[[int], None]:
    """Byte increments -> progress.layer's throttled, never-backwards events."""
    report = progress_events.layer(emit, verb, digest, total)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        report(done)

    return tick


def manifest_media(manifest: Manifest) -> str:
    try:
        media = json.loads(manifest.raw).get("mediaType")
    except ValueError:  # pragma: no cover - Manifest.parse already parsed it
        media = None
    return media if isinstance(media, str) and media else OCI_MANIFEST


def descriptor(entry: ModelEntry) -> dict:
    return {"mediaType": manifest_media(entry.manifest), "digest": entry.digest,
            "size": len(entry.manifest.raw), "annotations": {REF_NAME: entry.name.display}}


def index_bytes(descriptors: list[dict]) -> bytes:
    data = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"


def layout_bytes() -> bytes:
    return json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode()


def blob_rel(digest: str) -> str:
    return f"blobs/sha256/{digest_hex(digest)}"


def ref_of(descriptor: dict) -> str | None:
    annotations = descriptor.get("annotations")
    ref = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
    return ref if isinstance(ref, str) and ref else None


def normalize(name: str) -> str:
    """A member path without `./` and empty parts ('' for the root)."""
    return "/".join(p for p in name.split("/") if p not in ("", "."))


class DirSource:
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
        except OSError as exc:  # a symlink loop, a name too long, no permission
            raise BadRequest(f"{self.label}: {rel} cannot be read: {exc.strerror or exc}") from None
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


class TarSource:
    """A layout tar, checked member by member before any blob is read: no absolute or
    `..` names, no links leaving the layout, no devices, no duplicates, not truncated."""

    def __init__(self, path: Path) -> None:
        self.label, self.path = str(path), path
        with open(path, "rb") as fh:
            self.compressed = fh.read(6).startswith(COMPRESSED_MAGIC)
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
                norm = normalize(member.name)
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
        if name.startswith("/") or re.match(r"[A-Za-z]:[/\\]", name):  # POSIX or drive-letter absolute
            raise self._refuse(member, "absolute path")
        if ".." in name.split("/") or "\\" in name:
            raise self._refuse(member, "path leads outside the layout")
        if member.issym() or member.islnk():
            target = member.linkname
            base = posixpath.dirname(normalize(name)) if member.issym() else ""
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
        if self.compressed:
            return self.tar.extractfile(member)  # type: ignore[return-value]
        # A plain tar: read the member's byte range directly (no tarfile buffer copy).
        return _Range(self.path, member.offset_data, member.size)  # type: ignore[return-value]

    def path_for_link(self, rel: str, store: Store) -> Path | None:
        return None


def read_small(source: DirSource | TarSource, rel: str, what: str, expect: int | None = None) -> bytes:
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




class _Range:
    """`size` bytes of a file from `offset`; a short read is a truncated tar."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self.fh = open(path, "rb", buffering=0)
        self.fh.seek(offset)
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n) if n else b""
        while 0 < len(data) < n:  # a raw read may return less than asked before EOF
            more = self.fh.read(n - len(data))
            if not more:
                break
            data += more
        if len(data) < n:
            raise IntegrityError(f"unexpected end of data: the tar is truncated ({self.left - len(data)} bytes short)")
        self.left -= len(data)
        return data

    def __enter__(self) -> _Range:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()
