"""Model packages (OCI image layouts): pack/import round trips, damaged and hostile
packages refused with nothing stored or written outside, skopeo interop both ways."""

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mlxlite.errors import BadRequest, Busy, IntegrityError, ModelNotFound, Unsupported
from mlxlite.store import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MEDIA_FILE,
    MEDIA_GGUF,
    MEDIA_TEMPLATE,
    TITLE,
    Layer,
    Store,
    build_manifest,
    layout,
)

SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (.ci/run installs it)")


def make_model(store: Store, name: str = "tiny:latest", big: int = 300_000, seed: int = 1) -> str:
    """A store model with a config blob and three titled file layers; returns its digest."""
    weights = bytes((i * 131 + seed) % 251 for i in range(big))
    files = {"config.json": json.dumps({"model_type": "llama", "seed": seed}).encode(),
             "model.safetensors": weights, "tokenizer.json": b'{"version": "1.0"}'}
    layers = [Layer(MEDIA_FILE, store.put_bytes(data), len(data), {TITLE: title})
              for title, data in files.items()]
    layers.append(Layer(MEDIA_TEMPLATE, store.put_bytes(b"{{ prompt }}"), 12))
    config = store.put_json({"format": "safetensors", "architecture": "llama", "files": sorted(files)})
    return store.write_manifest(name, build_manifest(config, layers))


def stored_blobs(store: Store) -> set[str]:
    return {p.name for p in store.blob_dir.iterdir()} if store.blob_dir.is_dir() else set()


def assert_nothing_imported(store: Store, before: set[str]) -> None:
    """No model appeared, no temp file is left, and `prune` removes any leftover blob."""
    assert store.list() == []
    assert not [p for p in stored_blobs(store) if p.startswith(".tmp-")]
    store.prune()
    assert stored_blobs(store) == before


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ---- round trips --------------------------------------------------------------------
def test_dir_pack_rm_import_round_trip_keeps_digest_and_hardlinks(store, tmp_path):
    digest = make_model(store)
    result = layout.pack(store, "tiny", tmp_path / "pkg")
    assert result.kind == "dir" and result.methods["hardlink"] == 5  # config + 4 layers; manifest written
    index = json.loads((tmp_path / "pkg" / "index.json").read_text())
    (desc,) = index["manifests"]
    assert desc["digest"] == digest and desc["annotations"][layout.REF_NAME] == "tiny:latest"
    assert json.loads((tmp_path / "pkg" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    store.remove("tiny")
    store.prune()
    assert stored_blobs(store) == set()

    result = layout.import_layout_result(store, tmp_path / "pkg")
    assert result.entry.name.display == "tiny:latest" and result.entry.digest == digest
    assert result.methods == {"hardlink": 5} and result.copied_bytes == 0  # hashed, then linked
    assert store.verify() == []


def test_gzipped_tar_imports_too(store, tmp_path):
    import gzip

    digest = make_model(store)
    layout.pack(store, "tiny", tmp_path / "m.tar")
    (tmp_path / "m.tar.gz").write_bytes(gzip.compress((tmp_path / "m.tar").read_bytes()))
    store.remove("tiny")
    assert layout.import_layout(store, tmp_path / "m.tar.gz").digest == digest


def test_tar_pack_rm_import_round_trip_keeps_digest_and_is_reproducible(store, tmp_path):
    digest = make_model(store)
    layout.pack(store, "tiny", tmp_path / "a.tar")
    layout.pack(store, "tiny", tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames()[:2] == ["oci-layout", "index.json"]  # metadata first: streamable
    store.remove("tiny")
    events = []
    result = layout.import_layout_result(store, tmp_path / "a.tar", progress=events.append)
    assert result.entry.digest == digest and result.methods == {"copy": 5}
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == [
        "verifying sha256 digest", "writing manifest", "success"]
    blob_events = [e for e in events if "total" in e]
    assert {e["digest"] for e in blob_events} == {layer.digest for layer in result.entry.manifest.blobs}
    assert all(e["completed"] <= e["total"] for e in blob_events)
    assert store.verify() == []


def test_import_skips_blobs_already_in_store_and_renames(store, tmp_path):
    digest = make_model(store)
    layout.pack(store, "tiny", tmp_path / "m.tar")
    result = layout.import_layout_result(store, tmp_path / "m.tar", name="other/copy:v2")
    assert result.methods == {"existing": 5} and result.copied_bytes == 0
    assert store.resolve("other/copy:v2").digest == digest


def test_ollama_style_docker_manifest_round_trips(store, tmp_path):
    gguf = Layer(MEDIA_GGUF, store.put_bytes(b"GGUF" + bytes(5000)), 5004)
    cfg_raw = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
    cfg = Layer(DOCKER_CONFIG, store.put_bytes(cfg_raw), len(cfg_raw))
    raw = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": cfg.to_json(),
                      "layers": [gguf.to_json()]}).encode()
    digest = store.write_manifest("ollama-model:q4", raw)
    layout.pack(store, "ollama-model:q4", tmp_path / "o.tar")
    store.remove("ollama-model:q4")
    assert layout.import_layout(store, tmp_path / "o.tar").digest == digest


def test_several_models_in_one_package_ref_picks_one(store, tmp_path):
    d1 = make_model(store, "tiny:latest", seed=1)
    d2 = make_model(store, "tiny:big", big=400_000, seed=2)
    layout.pack(store, ["tiny:latest", "tiny:big"], tmp_path / "both.tar")
    for name in ("tiny:latest", "tiny:big"):
        store.remove(name)
    with pytest.raises(BadRequest, match="holds 2 models"):
        layout.import_layout(store, tmp_path / "both.tar")
    assert layout.pull(store, f"oci-layout:{tmp_path / 'both.tar'}:tiny:big").digest == d2
    assert layout.pull(store, f"oci-layout:{tmp_path / 'both.tar'}:{d1}", name="picked").digest == d1
    with pytest.raises(BadRequest, match="no model 'nope'"):
        layout.pull(store, f"oci-layout:{tmp_path / 'both.tar'}:nope")


def test_dir_pack_adds_to_existing_layout_and_refuses_foreign_dirs(store, tmp_path):
    make_model(store, "tiny:latest", seed=1)
    make_model(store, "tiny:v2", seed=2)
    layout.pack(store, "tiny:latest", tmp_path / "pkg")
    layout.pack(store, "tiny:v2", tmp_path / "pkg")
    layout.pack(store, "tiny:v2", tmp_path / "pkg")  # same ref again: replaced, not duplicated
    refs = [d["annotations"][layout.REF_NAME]
            for d in json.loads((tmp_path / "pkg" / "index.json").read_text())["manifests"]]
    assert refs == ["tiny:latest", "tiny:v2"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(BadRequest, match="non-empty directory"):
        layout.pack(store, "tiny", tmp_path / "other")
    with pytest.raises(ModelNotFound):
        layout.pack(store, "absent", tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_pack_refuses_corrupt_store_blob_and_leaves_no_file(store, tmp_path):
    make_model(store)
    entry = store.resolve("tiny")
    blob = store.blob_path(entry.manifest.files()["model.safetensors"].digest)
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        layout.pack(store, "tiny", tmp_path / "out.tar")
    assert os.listdir(tmp_path) == []


def test_a_killed_tar_pack_leaves_a_temp_that_the_next_pack_removes(store, tmp_path):
    make_model(store)
    out = tmp_path / "pkgs" / "m.tar"
    # A real pack in another process, stopped mid-tar (in its progress callback) and killed.
    code = ("import sys, time; sys.path.insert(0, '.'); from mlxlite.store import Store, layout\n"
            "def progress(event):\n"
            "    if event.get('completed'):\n"
            "        print('packing', flush=True)\n"
            "        time.sleep(600)\n"
            "layout.pack(Store(), 'tiny', sys.argv[1], progress=progress)\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "packing"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    (left,) = os.listdir(out.parent)
    assert left.startswith(f".m.tar.tmp-{proc.pid}-")
    # A live pack's temp (its flock held) and another destination's temp are not ours to remove.
    live, other = out.parent / ".m.tar.tmp-1-0123abcd", out.parent / ".n.tar.tmp-2-89abcdef"
    other.write_bytes(b"")
    with open(live, "xb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        layout.pack(store, "tiny", out)
    assert sorted(os.listdir(out.parent)) == sorted([live.name, "m.tar", other.name])
    assert layout.import_layout(store, out, name="again").digest == store.resolve("tiny").digest


def test_a_dir_pack_is_one_at_a_time_and_removes_a_killed_packs_temps(store, tmp_path):
    make_model(store)
    out = tmp_path / "pkg"
    layout.pack(store, "tiny", out)
    dead = [out / ".index.json.tmp-99999-0123abcd", out / "blobs" / "sha256" / f".{'a' * 64}.tmp-99999-89abcdef"]
    for path in dead:
        path.write_bytes(b"what a killed pack left")
    mine = out / "notes.tmp-1-0123abcd"  # not a name pack makes: left alone
    mine.write_text("mine")
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a pack into this layout holds it
        with pytest.raises(Busy, match="another pack is writing"):
            layout.pack(store, "tiny", out)
        assert all(path.exists() for path in dead)
    finally:
        os.close(fd)
    layout.pack(store, "tiny", out)
    assert not any(path.exists() for path in dead) and mine.read_text() == "mine"
    digest = store.resolve("tiny").digest
    store.remove("tiny")
    assert layout.import_layout(store, out).digest == digest


def test_parse_source_takes_longest_existing_path(tmp_path):
    pkg = tmp_path / "a:b.tar"
    pkg.write_bytes(b"")
    assert layout.parse_source(f"oci-layout:{pkg}") == (pkg, None)
    assert layout.parse_source(f"oci-layout:{pkg}:tiny:latest") == (pkg, "tiny:latest")
    with pytest.raises(BadRequest, match="no such OCI layout"):
        layout.parse_source(f"oci-layout:{tmp_path}/missing.tar:x")


# ---- damaged packages -----------------------------------------------------------------
def _member_offset(tar_path: Path, digest: str) -> tuple[int, int]:
    with tarfile.open(tar_path) as tar:
        member = tar.getmember(f"blobs/sha256/{digest.split(':')[1]}")
        return member.offset, member.offset_data


def test_tar_with_flipped_byte_in_a_blob_is_refused(store, tmp_path):
    make_model(store)
    weights = store.resolve("tiny").manifest.files()["model.safetensors"].digest
    layout.pack(store, "tiny", tmp_path / "m.tar")
    store.remove("tiny")
    store.prune()
    _, data_at = _member_offset(tmp_path / "m.tar", weights)
    raw = bytearray((tmp_path / "m.tar").read_bytes())
    raw[data_at + 12345] ^= 0x01
    (tmp_path / "m.tar").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=f"blob {weights} is corrupt"):
        layout.import_layout(store, tmp_path / "m.tar")
    assert_nothing_imported(store, set())
    assert tree(tmp_path) == {"m.tar"}


def test_dir_with_flipped_byte_in_a_blob_is_refused(store, tmp_path):
    make_model(store)
    weights = store.resolve("tiny").manifest.files()["model.safetensors"].digest
    layout.pack(store, "tiny", tmp_path / "pkg")
    store.remove("tiny")  # the package keeps its hardlinked copy
    store.prune()
    blob = tmp_path / "pkg" / "blobs" / "sha256" / weights.split(":")[1]
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 0x80
    blob.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="corrupt"):
        layout.import_layout(store, tmp_path / "pkg")
    assert_nothing_imported(store, set())


@pytest.mark.parametrize("where", ["mid-blob", "member-boundary", "mid-header", "end-marker"])
def test_truncated_tar_is_refused(store, tmp_path, where):
    make_model(store)
    weights = store.resolve("tiny").manifest.files()["model.safetensors"].digest
    layout.pack(store, "tiny", tmp_path / "m.tar")
    store.remove("tiny")
    store.prune()
    header_at, data_at = _member_offset(tmp_path / "m.tar", weights)
    raw = (tmp_path / "m.tar").read_bytes()
    with tarfile.open(tmp_path / "m.tar") as tar:
        last = tar.getmembers()[-1]
    cut = {"mid-blob": data_at + 1000, "member-boundary": header_at, "mid-header": header_at + 100,
           "end-marker": last.offset_data + ((last.size + 511) // 512) * 512}[where]
    (tmp_path / "m.tar").write_bytes(raw[:cut])
    with pytest.raises(IntegrityError, match="truncated|missing"):
        layout.import_layout(store, tmp_path / "m.tar")
    assert_nothing_imported(store, set())


def test_layout_whose_index_names_a_missing_blob_is_refused(store, tmp_path):
    make_model(store)
    entry = store.resolve("tiny")
    layout.pack(store, "tiny", tmp_path / "pkg")
    store.remove("tiny")
    store.prune()
    weights = entry.manifest.files()["model.safetensors"].digest
    (tmp_path / "pkg" / "blobs" / "sha256" / weights.split(":")[1]).unlink()
    with pytest.raises(IntegrityError, match=f"blob {weights} named by the manifest is missing"):
        layout.import_layout(store, tmp_path / "pkg")
    assert stored_blobs(store) == set()  # checked before the first byte is written
    (tmp_path / "pkg" / "blobs" / "sha256" / entry.digest.split(":")[1]).unlink()
    with pytest.raises(IntegrityError, match=f"manifest {entry.digest}.*missing"):
        layout.import_layout(store, tmp_path / "pkg")
    assert_nothing_imported(store, set())


def _hostile_tar(store: Store, tmp_path: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    """Our valid package plus one hostile member appended."""
    layout.pack(store, "tiny", tmp_path / "good.tar")
    out = tmp_path / "pkg" / "bad.tar"
    out.parent.mkdir()
    with tarfile.open(tmp_path / "good.tar") as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
        dst.addfile(extra, io.BytesIO(data) if data else None)
    (tmp_path / "good.tar").unlink()
    return out


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize("member, why", [
    (_member("../x", size=4), "outside the layout"),
    (_member("blobs/../../x", size=4), "outside the layout"),
    (_member("/tmp/mlxlite-layout-abs-x", size=4), "absolute path"),
    (_member("C:/x", size=4), "absolute path"),
    (_member("blobs/evil", tarfile.SYMTYPE, link="/etc/passwd"), "points outside"),
    (_member("blobs/evil", tarfile.SYMTYPE, link="../../x"), "points outside"),
    (_member("evil", tarfile.LNKTYPE, link="../x"), "outside the layout"),
    (_member("fifo", tarfile.FIFOTYPE), "not a regular file"),
    (_member("blobs/sha256/dev", tarfile.CHRTYPE), "not a regular file"),
])
def test_tar_with_unsafe_member_is_refused(store, tmp_path, member, why):
    make_model(store)
    bad = _hostile_tar(store, tmp_path, member, b"evil" if member.size else b"")
    store.remove("tiny")
    store.prune()
    before = tree(tmp_path)
    with pytest.raises(BadRequest, match=why):
        layout.import_layout(store, bad)
    assert_nothing_imported(store, set())
    assert tree(tmp_path) == before
    assert not Path("/tmp/mlxlite-layout-abs-x").exists()


def test_blob_that_is_a_link_is_refused(store, tmp_path):
    make_model(store)
    entry = store.resolve("tiny")
    weights = entry.manifest.files()["model.safetensors"].digest.split(":")[1]
    layout.pack(store, "tiny", tmp_path / "good.tar")
    bad = tmp_path / "bad.tar"
    with tarfile.open(tmp_path / "good.tar") as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            if m.name.endswith(weights):  # the blob replaced by a link to another member
                dst.addfile(_member(m.name, tarfile.SYMTYPE, link="../../index.json"))
            else:
                dst.addfile(m, src.extractfile(m) if m.isreg() else None)
    store.remove("tiny")
    store.prune()
    with pytest.raises(BadRequest, match="not a regular file"):
        layout.import_layout(store, bad)
    assert_nothing_imported(store, set())


def test_foreign_container_image_is_not_an_mlxlite_model(store, tmp_path):
    pkg = tmp_path / "img"
    blobs = pkg / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        import hashlib

        hexd = hashlib.sha256(data).hexdigest()
        (blobs / hexd).write_bytes(data)
        return {"digest": "sha256:" + hexd, "size": len(data)}

    config = {"mediaType": "application/vnd.oci.image.config.v1+json", **put(b'{"architecture":"amd64"}')}
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(b"\x1f\x8b not really")}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config, "layers": [layer]}).encode()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(manifest),
            "annotations": {layout.REF_NAME: "busybox"}}
    (pkg / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (pkg / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    with pytest.raises(Unsupported, match="not an mlxlite model.*tar\\+gzip"):
        layout.import_layout(store, pkg)
    assert stored_blobs(store) == set()


# ---- CLI ---------------------------------------------------------------------------------
def test_cli_pack_and_import(store, tmp_path, run_cli):
    digest = make_model(store)
    code, out, err = run_cli("pack", "tiny", "-o", str(tmp_path / "m.tar"))
    assert code == 0, err
    assert "packed tiny:latest" in out
    run_cli("rm", "tiny")
    code, out, err = run_cli("import", str(tmp_path / "m.tar"))
    assert code == 0, err
    assert "imported tiny:latest" in out and store.resolve("tiny").digest == digest
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:  # a tar, but no layout in it
        tar.add(tmp_path / "m.tar", "model.bin")
    code, out, err = run_cli("import", str(tmp_path / "plain.tar"))
    assert code == 1 and "not an OCI image layout: it has no oci-layout file" in err
    (tmp_path / "junk.tar").write_bytes(b"\0" * 100)
    code, out, err = run_cli("import", str(tmp_path / "junk.tar"))
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


# ---- skopeo interop ------------------------------------------------------------------
def skopeo(*args: str) -> None:
    proc = subprocess.run([SKOPEO, "--insecure-policy", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@needs_skopeo
def test_skopeo_copies_our_dir_and_we_import_its_copy(store, tmp_path):
    digest = make_model(store)
    layout.pack(store, "tiny", tmp_path / "ours")
    skopeo("copy", f"oci:{tmp_path / 'ours'}:tiny:latest", f"oci:{tmp_path / 'theirs'}:v1")
    store.remove("tiny")
    store.prune()
    entry = layout.import_layout(store, tmp_path / "theirs")
    assert entry.digest == digest and entry.name.display == "theirs:v1"  # skopeo's bare tag
    assert store.verify() == []


@needs_skopeo
def test_skopeo_reads_our_tar_and_we_repack_its_dir(store, tmp_path):
    digest = make_model(store)
    layout.pack(store, "tiny", tmp_path / "ours.tar")
    skopeo("copy", f"oci-archive:{tmp_path / 'ours.tar'}:tiny:latest", f"oci:{tmp_path / 'theirs'}:t")
    store.remove("tiny")
    entry = layout.import_layout(store, tmp_path / "theirs", name="tiny")
    assert entry.digest == digest
    layout.pack(store, "tiny", tmp_path / "again.tar")
    skopeo("copy", f"oci-archive:{tmp_path / 'again.tar'}:tiny:latest", f"oci:{tmp_path / 'third'}:x")
    skopeo("copy", f"oci:{tmp_path / 'third'}:x", f"oci-archive:{tmp_path / 'third.tar'}:y")
    store.remove("tiny")
    assert layout.import_layout(store, tmp_path / "third.tar").digest == digest


@needs_skopeo
def test_skopeo_pulls_what_mlxlite_pushed_and_import_takes_it(store, registry, tmp_path, run_cli):
    from mlxlite.remote import push

    source = registry.name("team/tiny:v1")
    digest = make_model(store, source)
    push(store, source, insecure=True)
    skopeo("copy", "--src-tls-verify=false", f"docker://{source}", f"oci:{tmp_path / 'fromreg'}:v1")
    store.remove(source)
    store.prune()
    code, out, err = run_cli("import", str(tmp_path / "fromreg"))
    assert code == 0, err
    assert store.resolve("fromreg:v1").digest == digest and store.verify() == []
    code, out, err = run_cli("pull", f"oci-layout:{tmp_path / 'fromreg'}:v1")
    assert code == 0, err
    assert "pulled fromreg:v1" in out and "pulling manifest" in err and "success" in err


@pytest.mark.parametrize("fixture", ["tiny_gguf_model", "tiny_safetensors_model"])
def test_packed_model_runs_after_rm_and_import(store, tmp_path, run_cli, request, fixture, monkeypatch):
    monkeypatch.setenv("MLXLITE_OPENBLAS", "0")  # in-process: leave pytest's BLAS alone
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # `run` reads piped stdin
    name = request.getfixturevalue(fixture)
    argv = ("run", name, "Hello world", "--temperature", "0", "--num-predict", "8", "--seed", "7")
    code, before, err = run_cli(*argv)
    assert code == 0, err
    digest = store.resolve(name).digest
    code, _, err = run_cli("pack", name, "-o", str(tmp_path / "m.tar"))
    assert code == 0, err
    run_cli("rm", name)
    run_cli("prune")
    assert stored_blobs(store) == set()
    code, _, err = run_cli("import", str(tmp_path / "m.tar"))
    assert code == 0, err
    assert store.resolve(name).digest == digest
    code, after, err = run_cli(*argv)
    assert code == 0, err
    assert after == before and after.strip()


class _Killed(BaseException):
    """Stands for a kill -9: nothing after it runs (not even `except Exception`)."""


@pytest.mark.parametrize("moment", ["writing the marker", "after the marker's temp"])
def test_a_dir_pack_killed_before_its_marker_is_finished_by_the_next_pack(store, tmp_path, monkeypatch, moment):
    """pack made blobs/ before writing oci-layout: killed between (tests/attacks/test_kill_verbs.py),
    it left a folder every later pack refused as "a non-empty directory without an oci-layout
    file"; so did a kill that left the marker's temp file."""
    from mlxlite.store import pack as pack_module

    make_model(store)
    out = tmp_path / "pkg"
    if moment == "writing the marker":
        real = pack_module._write_atomic

        def killed_at_the_marker(path: Path, data: bytes) -> None:
            if path.name == "oci-layout":
                raise _Killed()
            real(path, data)

        monkeypatch.setattr(pack_module, "_write_atomic", killed_at_the_marker)
        with pytest.raises(_Killed):
            layout.pack(store, "tiny", out)
        monkeypatch.undo()
    else:
        out.mkdir()
        (out / ".oci-layout.tmp-99999-0123abcd").write_text('{"imageLayoutVersion"')
    layout.pack(store, "tiny", out)
    assert sorted(os.listdir(out)) == ["blobs", "index.json", "oci-layout"]
    digest = store.resolve("tiny").digest
    store.remove("tiny")
    assert layout.import_layout(store, out).digest == digest
