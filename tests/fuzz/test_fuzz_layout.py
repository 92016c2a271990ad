"""OCI image layouts and their tars (`mlxlite/store/layout.py`, `oci_layout.py`) mutated
and hostile: flipped, cut and extended tars; tars built member by member with `..` and
absolute names, links out of the layout, devices, FIFOs, huge declared sizes; layout
directories with damaged files, missing blobs, and symlinks (out, to directories, loops).

Properties: an import either raises a typed error and stores no model (no temp files
left), or stores exactly the packed model with every blob verified; and nothing is ever
written outside the store: a bait directory beside the package, the package itself and
the working directory stay byte for byte as they were."""

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlxlite.errors import MlxliteError
from mlxlite.store import MEDIA_FILE, TITLE, TMP_PREFIX, Layer, Store, build_manifest, layout
from tests.fuzz.common import examples, json_values, mutated, outcome, texts


# ---- the seed package ----------------------------------------------------------------------
def _seed() -> tuple[str, bytes, dict[str, bytes]]:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": bytes(range(256)) * 8}
        layers = [Layer(MEDIA_FILE, store.put_bytes(data), len(data), {TITLE: title}) for title, data in files.items()]
        config = store.put_json({"format": "safetensors", "architecture": "llama", "files": sorted(files)})
        digest = store.write_manifest("seed:latest", build_manifest(config, layers))
        layout.pack(store, "seed", Path(tmp) / "pkg.tar")
        layout.pack(store, "seed", Path(tmp) / "pkg")
        tree = {str(p.relative_to(Path(tmp) / "pkg")): p.read_bytes()
                for p in sorted((Path(tmp) / "pkg").rglob("*")) if p.is_file()}
        return digest, (Path(tmp) / "pkg.tar").read_bytes(), tree


DIGEST, TAR, TREE = _seed()
BLOBS = sorted(k for k in TREE if k.startswith("blobs/"))
MANIFEST_REL = "blobs/sha256/" + DIGEST.split(":", 1)[1]
BAIT_FILES = {"secret.txt": b"do not touch", "blob": TREE[BLOBS[0]]}


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under root: file bytes, link targets, 'dir'."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:  # a FIFO is never opened (it would block): its presence is compared
                out[rel] = p.read_bytes() if p.is_file() else "other"
    return out


def import_and_check(make_package) -> None:
    """`make_package(tmp, bait) -> path`; imports it with a bait beside it and checks the properties."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bait, work = tmp / "bait", tmp / "work"
        bait.mkdir()
        work.mkdir()
        for name, data in BAIT_FILES.items():
            (bait / name).write_bytes(data)
        package = make_package(tmp, bait)
        store = Store(tmp / "store")
        before = {"bait": snapshot(bait), "work": snapshot(work),
                  "package": snapshot(package) if package.is_dir() else package.read_bytes()}
        cwd = os.getcwd()
        os.chdir(work)
        try:
            entry = layout.import_layout(store, package)
        except MlxliteError as exc:
            assert str(exc)
            outcome(f"refused: {type(exc).__name__}")
            entry = None
        finally:
            os.chdir(cwd)
        after = {"bait": snapshot(bait), "work": snapshot(work),
                 "package": snapshot(package) if package.is_dir() else package.read_bytes()}
        assert after == before, "the import wrote outside the store"
        assert set(os.listdir(tmp)) <= {"bait", "work", "store", package.name}
        if entry is None:
            assert store.list() == []
            if store.blob_dir.is_dir():
                assert not [p for p in os.listdir(store.blob_dir) if p.startswith(TMP_PREFIX)]
        else:
            outcome("imported")
            assert entry.digest == DIGEST and store.verify() == []
            assert {layer.digest for layer in entry.manifest.blobs} | {DIGEST} == {
                "sha256:" + b.rsplit("/", 1)[1] for b in BLOBS}


# ---- mutated tars --------------------------------------------------------------------------
def _tar_bytes(data: bytes, name: str = "pkg.tar"):
    def make(tmp: Path, bait: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


def test_the_seed_package_imports(tmp_path):
    import_and_check(_tar_bytes(TAR))
    import_and_check(_dir(TREE, []))


@settings(max_examples=examples(150))
@given(mutated(TAR, max_ops=3))
@example(TAR[:512])
@example(TAR[:-1024])           # no end-of-archive blocks
@example(TAR + b"\0" * 100)
def test_mutated_tars_import_the_model_or_raise_a_typed_error(data):
    import_and_check(_tar_bytes(data))


@settings(max_examples=examples(60))
@given(mutated(TAR, max_ops=2), st.sampled_from(["gz", "bz2", "xz"]))
def test_mutated_compressed_tars_import_the_model_or_raise_a_typed_error(data, codec):
    import bz2
    import gzip
    import lzma

    squeeze = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec]
    packed = squeeze(TAR)
    # Damage the compressed stream itself half of the time, the tar inside it the other half.
    blob = squeeze(data) if data[:1] == TAR[:1] else bytes(mutated_stream(packed, data))
    import_and_check(_tar_bytes(blob, f"pkg.tar.{codec}"))


def mutated_stream(packed: bytes, noise: bytes) -> bytearray:
    buf = bytearray(packed)
    for k, b in enumerate(noise[:4]):
        buf[(b * 7919 + k * 104729) % len(buf)] ^= 1 << (b % 8)
    return buf


# ---- hostile tars, member by member ---------------------------------------------------------
TYPES = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
         tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE]
NAMES = ["oci-layout", "index.json", "./oci-layout", "blobs", "blobs/sha256", *BLOBS, "../bait/secret.txt",
         "../../bait/x", "blobs/../../bait/y", "/tmp/abs", "C:\\x", "a\\..\\b", "blobs/sha256/../../../bait/z",
         "", ".", "..", "x" * 200]


@st.composite
def hostile_members(draw):
    members = []
    keep = draw(st.lists(st.sampled_from(["oci-layout", "index.json", *BLOBS]), unique=True))
    for name in keep:
        members.append((name, tarfile.REGTYPE, "", TREE[name], None))
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(NAMES) | texts(12))
        kind = draw(st.sampled_from(TYPES))
        target = draw(st.sampled_from(["", "/etc/passwd", "../bait/secret.txt", "../../bait", "blobs/sha256",
                                       BLOBS[0], "oci-layout", name, "/"]) | texts(8))
        data = draw(st.sampled_from([b"", TREE[BLOBS[-1]], TREE["index.json"]]) | st.binary(max_size=64))
        size = draw(st.none() | st.sampled_from([0, 1, 1 << 33, (1 << 63) - 1]))
        members.append((name, kind, target, data, size))
    order = draw(st.permutations(range(len(members))))
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]))
    return [members[i] for i in order], fmt, draw(st.booleans())


def build_tar(members, fmt, end_marker) -> bytes:
    out = io.BytesIO()
    for name, kind, target, data, size in members:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = kind, target, 0o644
        info.size = len(data) if size is None else size
        if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE):
            info.size, data = 0, b""
        try:
            out.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
        except ValueError:  # a name or size this format cannot hold: the member is left out
            continue
        out.write(data + b"\0" * (-len(data) % 512))
    if end_marker:
        out.write(b"\0" * 1024)
    return out.getvalue()


@settings(max_examples=examples(150))
@given(hostile_members())
@example(([("oci-layout", tarfile.REGTYPE, "", TREE["oci-layout"], None),
           ("index.json", tarfile.REGTYPE, "", TREE["index.json"], None),
           (MANIFEST_REL, tarfile.SYMTYPE, "../../../bait/blob", b"", None)], tarfile.GNU_FORMAT, True))
@example(([("oci-layout", tarfile.REGTYPE, "", TREE["oci-layout"], None),
           ("index.json", tarfile.REGTYPE, "", TREE["index.json"], 1 << 33)], tarfile.GNU_FORMAT, True))
def test_hostile_tars_import_the_model_or_raise_a_typed_error(spec):
    members, fmt, end_marker = spec
    import_and_check(_tar_bytes(build_tar(members, fmt, end_marker)))


# ---- layout directories ---------------------------------------------------------------------
def _dir(tree: dict[str, bytes], edits: list):
    def make(tmp: Path, bait: Path) -> Path:
        root = tmp / "pkg"
        for rel, data in tree.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        for op, rel, arg in edits:
            path = root / rel
            try:
                _apply(op, path, arg, root, tmp, bait)
            except OSError:  # an edit that an earlier one made impossible (its folder is gone)
                continue
        return root
    return make


def _apply(op: str, path: Path, arg, root: Path, tmp: Path, bait: Path) -> None:
    if op == "rmtree":
        shutil.rmtree(root / "blobs", ignore_errors=True)
        return
    if path.is_symlink() or path.is_file() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if op == "write":
        path.write_bytes(arg)
    elif op == "symlink":
        target = {"bait-file": bait / "secret.txt", "bait-blob": bait / "blob", "bait-dir": bait, "self": path,
                  "missing": tmp / "nowhere", "relative-out": Path("../../../bait/blob"), "root": Path("/")}[arg]
        path.symlink_to(target)
    elif op == "dir":
        path.mkdir()
    elif op == "fifo":
        os.mkfifo(path)


FILES = ["oci-layout", "index.json", *BLOBS]
edits = st.lists(st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(FILES), st.none()),
    st.tuples(st.just("write"), st.sampled_from(FILES), st.sampled_from(FILES).flatmap(
        lambda f: mutated(TREE[f], max_ops=3)) | json_values().map(lambda v: json.dumps(v).encode("utf-8",
                                                                                       "surrogatepass"))),
    st.tuples(st.just("symlink"), st.sampled_from(FILES), st.sampled_from(
        ["bait-file", "bait-blob", "bait-dir", "self", "missing", "relative-out", "root"])),
    st.tuples(st.sampled_from(["dir", "fifo"]), st.sampled_from(FILES), st.none()),
    st.tuples(st.just("rmtree"), st.just(""), st.none())), min_size=1, max_size=3)


@settings(max_examples=examples(150))
@given(edits)
@example([("symlink", MANIFEST_REL, "self")])       # a symlink loop
@example([("symlink", BLOBS[0], "bait-dir")])
@example([("fifo", "index.json", None)])
@example([("write", "index.json", b'{"manifests": [{"digest": "%s", "annotations": ["x"]}]}' % DIGEST.encode())])
@example([("write", "index.json", b'{"manifests": [{"digest": "%s", "annotations": "x"}]}' % DIGEST.encode())])
@example([("write", "oci-layout", b"[" * 100_000)])
@example([("write", "index.json", b"[" * 100_000)])
def test_damaged_layout_directories_import_the_model_or_raise_a_typed_error(changes):
    import_and_check(_dir(TREE, changes))
