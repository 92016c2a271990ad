"""`/api/pull` and `/api/push` on the daemon, against a real registry: Ollama's event
shapes, streamed and not, errors before and after the first line, the ollama client."""

from __future__ import annotations

import json

import pytest

from mlxlite.remote import push as push_model
from tests.fake_engine import FakeEngine, RunningServer, call
from tests.remote.test_registry import make_model


@pytest.fixture
def srv(store):
    with RunningServer(FakeEngine(), store) as s:
        yield s


def test_push_then_pull_stream_ollama_events(srv, store, registry):
    name = registry.name("team/api:v1")
    files = make_model(store, name)
    status, lines = call(srv, "/api/push", {"model": name, "insecure": True})
    assert status == 200
    assert lines[0] == {"status": "retrieving manifest"}
    assert lines[-2:] == [{"status": "pushing manifest"}, {"status": "success"}]
    pushing = [line for line in lines if "total" in line]
    assert pushing and all(line["status"] == f"pushing {line['digest'][7:19]}" for line in pushing)
    digest = store.resolve(name).digest
    store.remove(name)
    status, lines = call(srv, "/api/pull", {"model": name, "insecure": True})
    assert status == 200
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-3:] == [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                          {"status": "success"}]
    layers = [line for line in lines if "total" in line]
    assert {line["digest"] for line in layers} == {lay.digest for lay in store.resolve(name).manifest.blobs}
    for line in layers:
        assert set(line) == {"status", "digest", "total", "completed"} and 0 <= line["completed"] <= line["total"]
    assert store.resolve(name).digest == digest
    got = {t: store.blob_path(lay.digest).read_bytes() for t, lay in store.resolve(name).manifest.files().items()}
    assert got == files


def test_pull_without_stream_and_errors(srv, store, registry):
    name = registry.name("team/api:v2")
    make_model(store, name)
    assert call(srv, "/api/push", {"name": name, "insecure": True, "stream": False}) == (200, {"status": "success"})
    store.remove(name)
    assert call(srv, "/api/pull", {"model": name, "insecure": True, "stream": False}) == (200, {"status": "success"})
    assert store.exists(name)
    missing = registry.name("team/absent:v1")
    status, body = call(srv, "/api/pull", {"model": missing, "insecure": True, "stream": False})
    assert status == 404 and "does not exist" in body["error"]
    status, lines = call(srv, "/api/pull", {"model": missing, "insecure": True})
    assert status == 200 and lines[0] == {"status": "pulling manifest"} and "does not exist" in lines[-1]["error"]
    assert call(srv, "/api/pull", {"model": name, "insecure": "yes"})[0] == 400
    assert call(srv, "/api/pull", {})[0] == 400
    assert call(srv, "/api/pull", {"model": "bad name!"})[0] == 400
    assert call(srv, "/api/push", {"model": "nothing-here:v1"})[0] == 404
    status, body = call(srv, "/api/pull", {"model": "oci-layout:packages"})  # a server-side path
    assert status == 400 and "local paths" in body["error"]


def test_ollama_client_pulls_and_pushes(srv, store, registry):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=srv.url)
    name = registry.name("team/client:v1")
    make_model(store, name)
    pushed = [p.status for p in client.push(name, insecure=True, stream=True)]
    assert pushed[-1] == "success"
    store.remove(name)
    progress = list(client.pull(name, insecure=True, stream=True))
    assert progress[-1].status == "success"
    assert any(p.total and p.completed == p.total and p.digest for p in progress)
    assert client.pull(name, insecure=True).status == "success"
    assert store.exists(name)


def test_client_that_goes_away_cancels_the_pull_and_keeps_the_partial(srv, store, registry, registry_proxy):
    import http.client
    import time

    from mlxlite.remote import download

    name = registry.name("team/gone:v1")
    make_model(store, name, weights=16 << 20)
    push_model(store, name, insecure=True)
    big = max(store.resolve(name).manifest.layers, key=lambda lay: lay.size)
    store.remove(name)
    proxy = registry_proxy(registry.host)
    proxy.rate = 2 << 20  # slow: the pull is still running when the client leaves
    conn = http.client.HTTPConnection(srv.url.split("//")[1], timeout=30)
    conn.request("POST", "/api/pull", body=json.dumps({"model": f"{proxy.host}/team/gone:v1", "insecure": True}))
    resp = conn.getresponse()
    assert json.loads(resp.readline()) == {"status": "pulling manifest"}
    deadline = time.monotonic() + 20
    while download.partial_bytes(store, big.digest, big.size) < 1 << 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    conn.close()  # the client goes away mid-download
    time.sleep(1.0)
    settled = download.partial_bytes(store, big.digest, big.size)
    time.sleep(1.5)
    assert download.partial_bytes(store, big.digest, big.size) == settled < big.size  # stopped, kept
    assert not store.exists(f"{proxy.host}/team/gone:v1")
    proxy.rate = 0
    assert call(srv, "/api/pull", {"model": f"{proxy.host}/team/gone:v1", "insecure": True, "stream": False}) \
        == (200, {"status": "success"})
