"""Push and pull against a real registry (Debian's docker-registry on loopback)."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading

import pytest

from mlxlite.errors import BadRequest, IntegrityError, InvalidName, ModelNotFound, RegistryError, Unauthorized
from mlxlite.names import ModelName
from mlxlite.remote import download, pull, push
from mlxlite.remote.registry import Registry
from mlxlite.store import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MEDIA_FILE,
    MEDIA_GGUF,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    TITLE,
    Layer,
    build_manifest,
)
from tests.registry_fixtures import PASSWORD, USER

FAST = download.Tuning(streams=4, part_size=1 << 20, stall_timeout=5.0, backoff=0.05, chunk=64 << 10)


def make_model(store, name: str, weights: int = 3 << 20, seed: bytes = b"") -> dict[str, bytes]:
    """A model of real files in the store: safetensors-sized random weights + small JSON files."""
    files = {
        "model.safetensors": seed + os.urandom(weights),
        "config.json": json.dumps({"model_type": "llama", "seed": seed.hex()}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
    }
    layers = [Layer(MEDIA_FILE, store.put_bytes(data), len(data), {TITLE: title})
              for title, data in files.items()]
    raw = build_manifest(store.put_json({"format": "safetensors", "files": sorted(files)}), layers)
    store.write_manifest(name, raw)
    return files


def model_files(store, name: str) -> dict[str, bytes]:
    entry = store.resolve(name)
    return {title: store.blob_path(layer.digest).read_bytes() for title, layer in entry.manifest.files().items()}


def test_push_rm_pull_gives_identical_digests_and_verifies(store, registry, run_cli):
    name = registry.name("team/tiny:v1")
    files = make_model(store, name)
    events: list[dict] = []
    pushed = push(store, name, insecure=True, progress=events.append, chunk_size=1 << 20)  # chunked upload
    statuses = [e["status"] for e in events]
    assert statuses[0] == "retrieving manifest" and statuses[-2:] == ["pushing manifest", "success"]
    assert all(e["completed"] <= e["total"] for e in events if "total" in e)
    store.remove(name)
    assert not store.exists(name)
    events = []
    entry = pull(store, name, insecure=True, progress=events.append, tuning=FAST)
    assert entry.digest == pushed
    assert model_files(store, name) == files
    assert store.verify() == []
    assert list(download.partial_dir(store).iterdir()) == []  # no partial, journal or lock left
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layer_events = [e for e in events if e["status"].startswith("pulling ") and "total" in e]
    for e in layer_events:
        assert e["status"] == f"pulling {e['digest'][7:19]}" and set(e) == {"status", "digest", "total", "completed"}
    assert layer_events[-1]["completed"] == layer_events[-1]["total"]
    code, out, err = run_cli("verify", name)
    assert code == 0, err


def test_progress_never_moves_backwards(store, registry, registry_proxy):
    name = registry.name("team/mono:v1")
    make_model(store, name, weights=6 << 20)
    push(store, name, insecure=True)
    store.remove(name)
    proxy = registry_proxy(registry.host)
    proxy.stall_once = 1.0  # a retry in the middle must not rewind the bar
    events: list[dict] = []
    tuning = download.Tuning(streams=3, part_size=1 << 20, stall_timeout=0.3, backoff=0.01, chunk=64 << 10)
    pull(store, f"{proxy.host}/team/mono:v1", insecure=True, progress=events.append, tuning=tuning)
    seen: dict[str, int] = {}
    for e in events:
        if "completed" in e:
            assert e["completed"] >= seen.get(e["digest"], 0)
            seen[e["digest"]] = e["completed"]
    assert proxy.stalls == 1


def test_monolithic_push_and_pull_by_digest(store, registry):
    name = registry.name("team/mono:v2")
    make_model(store, name, weights=200_000)
    digest = push(store, name, insecure=True)  # fits one PUT
    store.remove(name)
    entry = pull(store, f"{name}@{digest}", insecure=True, tuning=FAST)
    assert entry.digest == digest


def test_second_push_skips_and_other_repo_mounts(store, registry, registry_proxy):
    proxy = registry_proxy(registry.host)
    name = f"{proxy.host}/team/a:v1"
    files = make_model(store, name)
    push(store, name, insecure=True)
    total = sum(len(d) for d in files.values())
    assert proxy.upload_bytes >= total
    proxy.upload_bytes = 0
    events: list[dict] = []
    push(store, name, insecure=True, progress=events.append)  # HEAD says present: nothing sent
    assert proxy.upload_bytes == 0
    assert any(e.get("completed") == e.get("total") for e in events if "total" in e)
    store.copy(name, f"{proxy.host}/other/b:v1")
    push(store, f"{proxy.host}/other/b:v1", insecure=True)  # mounted from team/a
    assert proxy.upload_bytes == 0
    store.remove(f"{proxy.host}/other/b:v1")
    store.remove(name)
    entry = pull(store, f"{proxy.host}/other/b:v1", insecure=True, tuning=FAST)
    assert model_files(store, entry.name) == files


def test_wrong_byte_gives_digest_error_and_leaves_no_blob(store, registry, registry_proxy):
    name = registry.name("team/bad:v1")
    make_model(store, name)
    push(store, name, insecure=True)
    entry = store.resolve(name)
    store.remove(name)
    proxy = registry_proxy(registry.host)
    proxy.corrupt = True
    with pytest.raises(IntegrityError, match="digest mismatch"):
        pull(store, f"{proxy.host}/team/bad:v1", insecure=True, tuning=FAST)
    assert not any(store.has_blob(layer.digest) for layer in entry.manifest.blobs)
    assert not store.exists(f"{proxy.host}/team/bad:v1")
    leftovers = [p.name for p in download.partial_dir(store).iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_stall_timeout_fires_and_retry_succeeds(store, registry, registry_proxy):
    name = registry.name("team/slow:v1")
    files = make_model(store, name)
    push(store, name, insecure=True)
    store.remove(name)
    proxy = registry_proxy(registry.host)
    proxy.stall_once = 3.0
    tuning = download.Tuning(streams=2, part_size=1 << 20, stall_timeout=0.5, backoff=0.01, chunk=64 << 10)
    entry = pull(store, f"{proxy.host}/team/slow:v1", insecure=True, tuning=tuning)
    assert proxy.stalls == 1
    assert model_files(store, entry.name) == files
    assert store.verify() == []


def test_concurrent_pulls_of_one_model_download_once(store, registry, registry_proxy):
    name = registry.name("team/shared:v1")
    files = make_model(store, name, weights=4 << 20)
    push(store, name, insecure=True)
    store.remove(name)
    proxy = registry_proxy(registry.host)
    proxy.rate = 8 << 20  # slow enough that both pulls overlap
    errors: list[BaseException] = []

    def one() -> None:
        try:
            pull(store, f"{proxy.host}/team/shared:v1", insecure=True, tuning=FAST)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    total = sum(len(d) for d in files.values())
    assert total <= proxy.blob_bytes < total * 1.01
    assert store.verify() == []


def test_missing_model_is_not_found(store, registry):
    with pytest.raises(ModelNotFound, match="does not exist"):
        pull(store, registry.name("team/nothing:v1"), insecure=True)


def test_ollama_docker_manifest_with_ollama_media_types(store, registry):
    """Ollama's registry serves Docker v2 manifests with its own layer types: round-trip one."""
    weights = b"GGUF" + os.urandom(100_000)
    cfg = json.dumps({"model_format": "gguf", "model_family": "llama", "model_type": "135M",
                      "file_type": "Q4_1"}).encode()
    layers = [Layer(MEDIA_GGUF, store.put_bytes(weights), len(weights)),
              Layer(MEDIA_SYSTEM, store.put_bytes(b"be brief"), 8),
              Layer(MEDIA_PARAMS, store.put_bytes(b'{"temperature":0.2}'), 19)]
    raw = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                      "config": {"mediaType": DOCKER_CONFIG, "digest": store.put_bytes(cfg), "size": len(cfg)},
                      "layers": [layer.to_json() for layer in layers]}, indent=3).encode()
    name = registry.name("library/ollamaish:latest")
    store.write_manifest(name, raw)
    digest = push(store, name, insecure=True)
    store.remove(name)
    entry = pull(store, name, insecure=True, tuning=FAST)
    assert entry.digest == digest and entry.manifest.raw == raw
    info = store.read_config(entry)
    assert info["format"] == "gguf" and info["quantization"] == "Q4_1"
    assert list(entry.manifest.files()) == ["model.gguf"]


def test_token_auth_anonymous_is_refused_credentials_work(store, token_registry, monkeypatch):
    name = token_registry.name("team/secret:v1")
    files = make_model(store, name)
    with pytest.raises(Unauthorized):
        push(store, name, insecure=True)
    monkeypatch.setenv("MLXLITE_REGISTRY_AUTH",
                       json.dumps({token_registry.host: {"username": USER, "password": PASSWORD}}))
    digest = push(store, name, insecure=True)
    store.remove(name)
    assert pull(store, name, insecure=True, tuning=FAST).digest == digest
    assert model_files(store, name) == files
    requests = token_registry.tokens.requests
    assert any(r["user"] == USER and any("push" in s for s in r["scope"]) for r in requests)


def test_token_auth_from_docker_config_json(store, token_registry, monkeypatch, tmp_path):
    name = token_registry.name("team/docker:v1")
    make_model(store, name)
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {f"http://{token_registry.host}": {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    digest = push(store, name, insecure=True)
    store.remove(name)
    assert pull(store, name, insecure=True, tuning=FAST).digest == digest


def test_basic_auth(store, basic_registry, monkeypatch):
    name = basic_registry.name("team/basic:v1")
    files = make_model(store, name)
    with pytest.raises(Unauthorized, match="authentication"):
        push(store, name, insecure=True)
    monkeypatch.setenv("MLXLITE_REGISTRY_AUTH",
                       json.dumps({basic_registry.host: {"username": USER, "password": PASSWORD}}))
    push(store, name, insecure=True)
    store.remove(name)
    pull(store, name, insecure=True, tuning=FAST)
    assert model_files(store, name) == files


def test_cli_pull_and_push(store, registry, run_cli):
    name = registry.name("team/cli:v1")
    make_model(store, name)
    code, out, err = run_cli("push", name, "--insecure")
    assert code == 0, err
    assert "success" in err + out
    store.remove(name)
    code, out, err = run_cli("pull", name, "--insecure")
    assert code == 0, err
    assert store.exists(name)
    code, out, err = run_cli("pull", registry.name("team/absent:v1"), "--insecure")
    assert code == 1 and err.strip().splitlines()[-1].startswith("error:") and "does not exist" in err
    assert "Traceback" not in err


def test_oras_pulls_what_mlxlite_pushed(store, registry, tmp_path):
    oras_client = pytest.importorskip("oras.client", reason="pip install oras")
    name = registry.name("team/oras:v1")
    files = make_model(store, name)
    push(store, name, insecure=True)
    client = oras_client.OrasClient(insecure=True)
    out = tmp_path / "out"
    client.pull(target=f"{registry.host}/team/oras:v1", outdir=str(out))
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files


def test_https_registry_without_insecure(store, tls_registry):
    name = tls_registry.name("team/tls:v1")
    files = make_model(store, name)
    digest = push(store, name)  # https, verified against SSL_CERT_FILE
    store.remove(name)
    assert pull(store, name, tuning=FAST).digest == digest
    assert model_files(store, name) == files


def test_plain_http_registry_needs_insecure(store, registry):
    with pytest.raises(RegistryError, match="--insecure"):
        pull(store, registry.name("team/any:v1"))


@pytest.fixture
def no_lookups(monkeypatch):
    """Every DNS lookup is recorded and refused: the test asserts there were none."""
    calls = []

    def spy(host, *args, **kwargs):
        calls.append(host)
        raise OSError("test: no lookup may happen here")

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    return calls


def test_an_impossible_name_fails_before_any_lookup(store, no_lookups):
    # A model filed under port 99999, as an older `cp` let in: push must not go looking for it.
    make_model(store, ModelName("localhost:99999", "ns", "m", "latest"), weights=64)
    with pytest.raises(InvalidName, match="port 99999"):
        push(store, "localhost:99999/ns/m", insecure=True)
    with pytest.raises(InvalidName, match="port 99999"):
        pull(store, "localhost:99999/ns/m:v1", insecure=True)
    with pytest.raises(InvalidName, match="port 0"):
        pull(store, "localhost:0/ns/m")
    with pytest.raises(BadRequest, match="port from 1 to 65535"):
        pull(store, "http://localhost:99999/x.gguf")
    with pytest.raises(InvalidName):
        Registry("localhost:70000")
    assert no_lookups == []
