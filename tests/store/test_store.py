"""The content-addressed store: atomic blobs and manifests, verify, prune, concurrency."""

import errno
import hashlib
import io
import json
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from mlxlite import names
from mlxlite.errors import BadRequest, InsufficientStorage, IntegrityError, ModelNotFound
from mlxlite.store import MEDIA_FILE, TITLE, Layer, Store, build_manifest


def make_model(store: Store, name: str, files: dict[str, bytes]) -> str:
    layers = []
    for title, data in files.items():
        layers.append(Layer(MEDIA_FILE, store.put_bytes(data), len(data), {TITLE: title}))
    config = store.put_json({"format": "safetensors", "files": sorted(files)})
    return store.write_manifest(names.parse(name), build_manifest(config, layers))


def test_blob_is_named_by_its_sha256(store):
    digest = store.put_bytes(b"hello")
    assert digest == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert store.blob_path(digest).read_bytes() == b"hello"
    assert store.put_bytes(b"hello") == digest  # idempotent


def test_stream_with_wrong_expected_digest_leaves_nothing(store):
    import io

    with pytest.raises(IntegrityError, match="digest mismatch"):
        store.put_stream(io.BytesIO(b"abc"), expected="sha256:" + "0" * 64)
    assert [p.name for p in store.blob_dir.iterdir()] == []


def test_manifest_refuses_missing_blobs(store):
    config = store.put_json({"format": "gguf"})
    ghost = Layer(MEDIA_FILE, "sha256:" + "1" * 64, 3, {TITLE: "x"})
    with pytest.raises(IntegrityError, match="missing"):
        store.write_manifest(names.parse("m"), build_manifest(config, [ghost]))
    assert not store.exists("m")


def test_manifest_round_trip_and_list(store):
    digest = make_model(store, "a/model:v1", {"config.json": b"{}", "w.safetensors": b"x" * 100})
    entry = store.resolve("A/Model:V1")
    assert entry.digest == digest
    assert set(entry.manifest.files()) == {"config.json", "w.safetensors"}
    assert [e.name.display for e in store.list()] == ["a/model:v1"]
    assert entry.size == sum(layer.size for layer in entry.manifest.blobs)


def test_titles_that_escape_are_rejected(store):
    data = b"x"
    config = store.put_json({})
    for bad in ("../x", "/etc/passwd", "a/../../b", ""):
        layer = Layer(MEDIA_FILE, store.put_bytes(data), 1, {TITLE: bad})
        with pytest.raises(BadRequest, match="invalid file name"):
            store.write_manifest(names.parse("m"), build_manifest(config, [layer]))


def test_view_is_a_directory_of_links(store):
    make_model(store, "m", {"config.json": b"{}", "sub/tok.json": b"[]"})
    view = store.view(store.resolve("m"))
    assert (view / "config.json").read_bytes() == b"{}"
    assert (view / "sub" / "tok.json").is_symlink()


def test_remove_keeps_shared_blobs(store):
    make_model(store, "one", {"a": b"shared", "b": b"only-one"})
    make_model(store, "two", {"a": b"shared"})
    store.remove("one")
    assert not store.exists("one")
    assert store.has_blob("sha256:" + hashlib.sha256(b"shared").hexdigest())
    assert not store.has_blob("sha256:" + hashlib.sha256(b"only-one").hexdigest())
    with pytest.raises(ModelNotFound):
        store.remove("one")


def test_verify_names_the_bad_blob_and_its_models(store):
    make_model(store, "m", {"w": b"weights" * 1000})
    blob = store.blob_path(store.resolve("m").manifest.files()["w"].digest)
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    blob.write_bytes(bytes(data))
    bad = store.verify()
    assert len(bad) == 1 and bad[0].models == ("m:latest",)
    with pytest.raises(IntegrityError, match="corrupt"):
        store.check_integrity(store.resolve("m"))


def test_integrity_check_remembers_verified_blobs(store, monkeypatch):
    make_model(store, "m", {"w": b"abc" * 1000})
    entry = store.resolve("m")
    store.check_integrity(entry)
    calls = []
    import mlxlite.store.verified as st

    monkeypatch.setattr(st, "hash_file", lambda *a, **k: calls.append(a) or ("x", 0))
    store.check_integrity(entry)
    assert calls == []  # unchanged size + mtime: not hashed again



def _count_hashes(monkeypatch) -> list:
    import mlxlite.store.verified as st

    calls: list = []
    real = st.hash_file
    monkeypatch.setattr(st, "hash_file", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def test_blobs_hashed_on_their_way_in_are_not_hashed_again_at_the_first_load(store, tiny_gguf_model, monkeypatch):
    """An 8B model's first load took 30-40 s against mlx-lm's 9 s, partly re-hashing every
    file `import` had just hashed: imported files (put_file) and written blobs
    (BlobWriter.commit: config, Modelfile layers) are recorded as verified."""
    make_model(store, "written", {"w": b"abc" * 1000})
    calls = _count_hashes(monkeypatch)
    for name in (tiny_gguf_model, "written"):
        store.check_integrity(store.resolve(name))
    assert calls == []


def test_a_pulled_blob_is_not_hashed_again_at_the_first_load(store, monkeypatch):
    from mlxlite.remote import download

    data = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def opener(start, end, timeout):
        resp = io.BytesIO(data[start:end])
        resp.status = 206
        return resp

    download.fetch(store, digest, len(data), opener, tuning=download.Tuning(streams=2, chunk=64 << 10))
    config = store.put_json({"format": "safetensors", "files": ["w"]})
    store.write_manifest(names.parse("pulled"), build_manifest(config, [Layer(MEDIA_FILE, digest, len(data),
                                                                                {TITLE: "w"})]))
    calls = _count_hashes(monkeypatch)
    store.check_integrity(store.resolve("pulled"))
    assert calls == []


def test_a_blob_replaced_by_a_file_of_the_same_size_and_mtime_is_hashed_again(store):
    """The memo keys on the inode too: a replaced file with the old size and mtime (a restore
    that kept times, `cp -p` of a damaged copy) is not taken on trust."""
    make_model(store, "m", {"w": b"abc" * 1000})
    entry = store.resolve("m")
    store.check_integrity(entry)
    blob = store.blob_path(entry.manifest.files()["w"].digest)
    before = blob.stat()
    other = blob.with_name("replacement")
    other.write_bytes(b"abd" * 1000)
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(other, blob)
    with pytest.raises(IntegrityError, match="corrupt"):
        store.check_integrity(entry)

def test_prune_removes_unreferenced_and_stale_temps(store):
    make_model(store, "m", {"w": b"keep"})
    orphan = store.put_bytes(b"orphan")
    stale = store.blob_dir / ".tmp-999-dead"
    stale.write_bytes(b"partial")
    live = store.blob_writer()
    live.write(b"in progress")
    try:
        removed, freed = store.prune()
    finally:
        live.abort()
    assert removed == 2 and freed == len(b"orphan") + len(b"partial")
    assert not store.has_blob(orphan) and not stale.exists()
    assert store.verify() == []


def test_concurrent_threads_writing_the_same_blob_and_tag(store):
    payload = os.urandom(1 << 20)
    errors = []

    def writer(i: int) -> None:
        try:
            make_model(store, "same:tag", {"w": payload, "n": str(i % 2).encode()})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.verify() == []
    assert [p for p in store.blob_dir.iterdir() if p.name.startswith(".tmp")] == []


def _process_writer(root: str, seed: int) -> None:
    store = Store(Path(root))
    for i in range(15):
        make_model(store, "shared:tag", {"w": b"W" * 300_000, "i": f"{seed}-{i}".encode()})


def test_two_processes_writing_the_same_blob_and_tag(store):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(str(store.root), s)) for s in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    entry = store.resolve("shared:tag")
    assert json.loads(entry.manifest.raw)["layers"][0]["size"] == 300_000
    assert store.verify() == []


# ---- linked imports: sources, other links, repair (issue 14) -----------------------------
def _damage_in_place(path: Path) -> None:
    """Flip a byte without replacing the file: every hardlink of it sees the damage."""
    with open(path, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _replace_with(path: Path, data: bytes) -> None:
    """A fresh file under the same name (a new inode), as a re-download leaves it."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _linked_model(store: Store, tmp_path: Path, name: str = "m") -> tuple[Path, bytes, str]:
    src = tmp_path / "weights.bin"
    data = os.urandom(50_000)
    src.write_bytes(data)
    digest, size, method = store.put_file(src)
    assert method == "hardlink"
    config = store.put_json({"format": "safetensors", "files": ["w"]})
    store.write_manifest(names.parse(name), build_manifest(config, [Layer(MEDIA_FILE, digest, size, {TITLE: "w"})]))
    return src, data, digest


def test_verify_names_the_other_links_of_a_damaged_blob(store, tmp_path):
    src, _, digest = _linked_model(store, tmp_path)
    _damage_in_place(src)  # damage to the imported file is damage to the blob
    (bad,) = store.verify()
    assert bad.digest == digest and bad.models == ("m:latest",)
    assert bad.links == 1 and bad.linked == (str(src.resolve()),)
    recorded = json.loads((store.root / "sources.json").read_text())
    assert recorded[digest[7:]][0]["path"] == str(src.resolve())


def test_repair_restores_a_blob_from_a_recorded_source_that_hashes_right(store, tmp_path):
    src, data, digest = _linked_model(store, tmp_path)
    _damage_in_place(src)
    assert store.repair_blob(digest) is None  # the only source is the damaged inode itself
    assert len(store.verify()) == 1
    _replace_with(src, data)  # the user fetched the file again
    how = store.repair_blob(digest)
    assert how is not None and str(src.resolve()) in how
    assert store.verify() == []
    assert store.blob_path(digest).read_bytes() == data


def test_importing_again_replaces_a_damaged_blob(store, tmp_path):
    src, data, digest = _linked_model(store, tmp_path)
    _damage_in_place(src)
    _replace_with(src, data)
    assert len(store.verify()) == 1  # the blob still holds the old, damaged inode
    _, _, method = store.put_file(src)
    assert method == "hardlink"  # not "existing": the blob present was not the right bytes
    assert store.verify() == []


def test_put_bytes_rewrites_a_damaged_small_blob(store):
    make_model(store, "m", {"w": b"weights" * 1000})
    digest = store.resolve("m").manifest.files()["w"].digest
    blob = store.blob_path(digest)
    blob.write_bytes(b"x" * blob.stat().st_size)
    assert store.put_bytes(b"weights" * 1000) == digest
    assert store.verify() == []


def test_listing_while_another_store_deletes_and_recreates_models(store):
    """`rm` removes a model's folders (tag, namespace, host) while `list` walks them: every
    listing must succeed and hold every untouched model. The churn runs on a second `Store`
    over the same root, as a second daemon would; its names sit under their own hosts so
    each delete empties three folders, which makes the race likely (before the fix every
    run failed: 1-2% of its listings raised FileNotFoundError from os.scandir)."""
    make_model(store, "base", {"w": b"x" * 100})
    kept = {f"kept{i}:latest" for i in range(5)}
    for name in kept:
        store.copy("base", name)
    other = Store(store.root)
    rounds = 60
    churned = []
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for i in range(rounds):
                name = f"host{i % 4}.test/ns{i % 3}/churn:t{i % 2}"
                other.copy("base", name)
                other.remove(name)
                churned.append(i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=churn)
    thread.start()
    listings = failures = 0
    while thread.is_alive() or listings == 0:
        try:
            shown = {e.name.display for e in store.list()}
        except OSError as exc:
            failures += 1
            errors.append(exc)
            continue
        finally:
            listings += 1
        assert kept | {"base:latest"} <= shown
    thread.join()
    assert (errors, failures, len(churned)) == ([], 0, rounds)
    assert {e.name.display for e in store.list()} == kept | {"base:latest"}


def blobs_on_dev_full(monkeypatch) -> None:
    """Blob writes land on /dev/full, where every write fails with the kernel's own ENOSPC
    (a full disk without root or a loop mount); the temp file in the store stays the real one."""
    from mlxlite.store.blobio import BlobWriter

    real_init = BlobWriter.__init__

    def init(self, blob_dir, **kwargs):
        real_init(self, blob_dir, **kwargs)
        self._fh.close()
        self._fh = open("/dev/full", "wb")  # noqa: SIM115 (closed by commit/abort)

    monkeypatch.setattr(BlobWriter, "__init__", init)


def fsync_fails_with_enospc(monkeypatch) -> None:
    """fsync reports the full disk (as it does on NFS and thin-provisioned volumes)."""
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_is_insufficient_storage_naming_the_folder(store, monkeypatch):
    make_model(store, "base", {"w": b"x" * 100})
    with monkeypatch.context() as m:
        blobs_on_dev_full(m)
        with pytest.raises(InsufficientStorage, match=f"^no space left on device at {store.blob_dir}$") as info:
            store.put_bytes(b"y" * (1 << 20))
        assert info.value.status == 507
    with monkeypatch.context() as m:
        fsync_fails_with_enospc(m)
        with pytest.raises(InsufficientStorage, match=f"at {store.manifest_path(names.parse('other')).parent}$"):
            store.copy("base", "other")
    def link_or_symlink(src, dst, *args, **kwargs):   # their errors name the source: the wrong disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), str(dst))

    with monkeypatch.context() as m:
        m.setattr(os, "link", link_or_symlink)
        m.setattr(os, "symlink", link_or_symlink)
        src = store.root.parent / "weights.bin"
        src.write_bytes(b"z" * 1000)
        with pytest.raises(InsufficientStorage, match=f"at {store.blob_dir}$"):
            store.put_file(src)
        with pytest.raises(InsufficientStorage, match=f"at {store.view_root}$"):
            store.view(store.resolve("base"))
    assert [p.name for p in store.blob_dir.iterdir() if p.name.startswith(".tmp")] == []
    assert [e.name.display for e in store.list()] == ["base:latest"]
    assert list(store.manifest_path(names.parse("other")).parent.iterdir()) == []
    assert list(store.view_root.iterdir()) == []


def test_a_load_on_a_full_disk_does_not_fail_for_want_of_its_memo(store, monkeypatch):
    """The verified-blob memo only saves re-hashing: failing to write it must not fail the
    integrity check (it raised OSError ENOSPC before)."""
    make_model(store, "m", {"w": b"x" * 100})
    entry = store.resolve("m")
    store._memo_path().unlink(missing_ok=True)  # written blobs are remembered: forget them, so the load must hash

    def write_text(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", write_text)
    store.check_integrity(entry)
    assert store.verify() == []
    assert not store._memo_path().exists()
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp")] == []


def _link_outside(store: Store, tmp_path: Path, level: str) -> tuple[str, Path]:
    """A store model whose manifest path has a symlink at `level` pointing at a folder outside
    the store that holds a valid manifest (so following it would "work") and a bait file.
    Returns the model's name and the outside folder."""
    make_model(store, "me/real:v1", {"w": b"weights"})
    raw = store.manifest_path(names.parse("me/real:v1")).read_bytes()
    outside = tmp_path / "outside"
    below = {"host": ("ns", "m"), "namespace": ("m",), "model": (), "tag": ()}[level]
    leaf = outside.joinpath(*below)
    leaf.mkdir(parents=True)
    (leaf / "latest").write_bytes(raw)
    (leaf / ".tmp-1-stale").write_bytes(b"not the store's temp file")
    (outside / "bait").write_text("must survive")
    top = store.manifest_dir / "registry.ollama.ai" / "library"
    top.mkdir(parents=True, exist_ok=True)
    if level == "host":
        os.symlink(outside, store.manifest_dir / "evil.example")
        return "evil.example/ns/m", outside
    if level == "namespace":
        os.symlink(outside, store.manifest_dir / "registry.ollama.ai" / "evil")
        return "evil/m", outside
    if level == "model":
        os.symlink(outside, top / "evil")
        return "evil", outside
    (top / "evil").mkdir()
    os.symlink(outside / "latest", top / "evil" / "latest")
    return "evil", outside


@pytest.mark.parametrize("level", ["host", "namespace", "model", "tag"])
def test_manifest_symlinks_are_never_followed_out_of_the_store(store, tmp_path, level):
    name, outside = _link_outside(store, tmp_path, level)
    before = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    with pytest.raises(IntegrityError, match="symbolic link"):
        store.resolve(name)
    with pytest.raises(IntegrityError, match="symbolic link"):
        store.remove(name)
    assert [e.name.display for e in store.list()] == ["me/real:v1"]
    store.prune()
    with pytest.raises(IntegrityError, match="symbolic link"):
        store.copy("me/real:v1", name)
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == before
    assert (outside / "bait").read_text() == "must survive"
    assert store.exists("me/real:v1") and store.verify() == []


def test_a_manifest_that_is_not_a_file_is_refused_without_hanging(store):
    make_model(store, "real", {"w": b"x"})
    folder = store.manifest_dir / "registry.ollama.ai" / "library" / "odd"
    folder.mkdir()
    os.mkfifo(folder / "fifo")
    (folder / "dir").mkdir()
    for tag in ("fifo", "dir"):
        with pytest.raises(IntegrityError, match="not a file"):
            store.resolve(f"odd:{tag}")
    assert [e.name.display for e in store.list()] == ["real:latest"]


def test_prune_removes_what_killed_processes_left_beside_the_blobs_and_keeps_live_ones(store):
    """kill -9 between writing and renaming sources.json or verified.json, or during
    /api/create's staging, left `.tmp-*` files and folders in the store's root that prune
    never removed (tests/attacks/test_kill_verbs.py found the first); and prune deleted a
    view another process was still building."""
    import subprocess
    import sys

    make_model(store, "m", {"w": b"keep"})
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(done.stdout), os.getpid()
    left = [store.root / f".tmp-sources-{dead}-0123abcd", store.root / f".tmp-memo-{dead}-4567cdef"]
    for path in left:
        path.write_text("{")
    staging = store.root / f".tmp-create-{dead}-0123456789ab"
    staging.mkdir()
    (staging / "model.gguf").write_bytes(b"a link to an uploaded blob")
    half_view = store.view_root / f".tmp-{dead}-89abcdef0123"
    half_view.mkdir(parents=True)
    live = [store.root / f".tmp-memo-{alive}-0123abcd", store.view_root / f".tmp-{alive}-0123456789ab"]
    live[0].write_text("{")
    live[1].mkdir()
    removed, _ = store.prune()
    assert removed == 3
    assert not any(path.exists() for path in [*left, staging, half_view])
    assert all(path.exists() for path in live)
    assert store.verify() == [] and store.exists("m")


# ---- races that tests/attacks/test_store_race.py found, each played at its moment ----------
def test_cp_of_a_model_an_rm_takes_first_is_not_found_never_a_missing_blob(store, monkeypatch):
    """cp resolved its source before taking the writer lock; an rm in between took the
    source's blobs and cp failed writing: "cannot write manifest: blob ... is missing" (500)."""
    make_model(store, "src", {"w": b"only src has these bytes"})
    real = Store.writing

    def rm_lands_first(self):
        Store(self.root).remove("src")       # another process's rm, just before cp takes the lock
        monkeypatch.setattr(Store, "writing", real)
        return real(self)

    monkeypatch.setattr(Store, "writing", rm_lands_first)
    with pytest.raises(ModelNotFound, match="model 'src:latest' not found"):
        store.copy("src", "dst")
    assert store.list() == [] and not list(store.blob_dir.iterdir())


@pytest.mark.parametrize("first", ["another rm", "a new import"])
def test_rm_acts_on_the_model_it_finds_under_its_lock(store, monkeypatch, first):
    """rm resolved the model before its exclusive lock: a second rm that got there first
    made it fail with a name spelled as a path ("registry.ollama.ai/library/m/latest"), and a
    re-import in between was unlinked while the old blobs' list decided what to free, so the
    new model's blobs stayed behind, unreferenced."""
    make_model(store, "m", {"w": b"first weights"})
    make_model(store, "keep", {"k": b"kept"})
    real = Store._lock

    def someone_first(self, exclusive, timeout=30.0):
        monkeypatch.setattr(Store, "_lock", real)
        if first == "another rm":
            Store(self.root).remove("m")
        else:
            make_model(Store(self.root), "m", {"w": b"second weights"})
        return real(self, exclusive, timeout)

    monkeypatch.setattr(Store, "_lock", someone_first)
    if first == "another rm":
        with pytest.raises(ModelNotFound, match=r"^model 'm:latest' not found$"):
            store.remove("m")
    else:
        store.remove("m")
        # The model removed was the new one: its blobs went with it (the old one's are prune's).
        assert not store.has_blob("sha256:" + hashlib.sha256(b"second weights").hexdigest())
    assert [e.name.display for e in store.list()] == ["keep:latest"]
    assert store.verify() == []


@pytest.mark.parametrize("moment", ["before hashing it", "after hashing it"])
def test_verify_racing_an_rm_reports_nothing_damaged(store, monkeypatch, moment):
    """verify listed the models, then an rm took one's blobs: verify reported them "missing"
    (so `mlxlite verify` exited 1 on a sound store), or, hashed just before the rm, failed
    remembering it with an untyped FileNotFoundError."""
    from mlxlite.store import repair as store_module

    make_model(store, "gone", {"w": b"bytes of a model being removed"})
    real = store_module.hash_file
    calls = []

    def rm_meanwhile(path, progress=None):
        calls.append(path)
        if len(calls) == 1 and moment == "before hashing it":
            Store(store.root).remove("gone")
        result = real(path, progress)
        if len(calls) == 1 and moment == "after hashing it":
            Store(store.root).remove("gone")
        return result

    monkeypatch.setattr(store_module, "hash_file", rm_meanwhile)
    assert store.verify() == []
    assert calls and store.list() == []
