"""/api/create and /api/blobs/:digest over a real server, with urllib and the official
`ollama` Python client."""

import hashlib
import http.client
import json
import urllib.error
import urllib.request

import pytest

from mlxlite import store as st
from mlxlite.modelfile import build as cr
from mlxlite.modelfile import parser as modelfile
from tests.fake_engine import RunningServer
from tests.store.test_store import blobs_on_dev_full


@pytest.fixture
def server(store):
    with RunningServer(store=store) as running:
        yield running


def _req(server, method, path, data=None, headers=None):
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_blob_upload_checks_the_digest(server, store):
    data = b"some model bytes" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert _req(server, "HEAD", f"/api/blobs/{digest}")[0] == 404
    wrong = "sha256:" + "0" * 64
    status, body = _req(server, "POST", f"/api/blobs/{wrong}", data)
    assert status == 400 and "digest mismatch" in json.loads(body)["error"]
    assert not store.has_blob(wrong) and not store.has_blob(digest)
    assert not [p for p in store.blob_dir.iterdir() if p.name.startswith(".tmp-")]
    assert _req(server, "POST", f"/api/blobs/{digest}", data)[0] == 201
    assert store.read_blob(digest) == data
    assert _req(server, "HEAD", f"/api/blobs/{digest}")[0] == 200
    assert _req(server, "POST", f"/api/blobs/{digest}", data)[0] == 200
    assert _req(server, "HEAD", "/api/blobs/sha256:nothex")[0] == 400


def test_chunked_blob_upload(server, store):
    data = b"x" * 300_000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", f"/api/blobs/{digest}", body=iter([data[:100_000], data[100_000:]]),
                 encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().status == 201
    conn.close()
    assert store.read_blob(digest) == data


def test_ollama_client_create_from_uploaded_gguf_matches_the_cli(server, store, default_gguf, tmp_path, run_cli):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server.url)
    digest = client.create_blob(default_gguf)
    assert digest == "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    statuses = [r.status for r in client.create(
        model="pirate", files={default_gguf.name: digest}, system="You are a pirate.",
        parameters={"temperature": 0, "stop": ["<|im_end|>"]}, license=["MIT"], stream=True)]
    assert statuses[-2:] == ["writing manifest", "success"]
    assert f"using existing layer {digest}" in statuses
    entry = store.resolve("pirate")
    settings = cr.settings_of(store, entry)
    assert settings.system == "You are a pirate." and settings.licenses == ("MIT",)
    assert settings.parameters == {"temperature": 0.0, "stop": ["<|im_end|>"]}
    # the same model from a Modelfile through the CLI has the same digest (the importer
    # names the layer after the file a symlink points to)
    (tmp_path / "smol.gguf").symlink_to(default_gguf)
    (tmp_path / "Modelfile").write_text(
        'FROM ./smol.gguf\nSYSTEM You are a pirate.\nPARAMETER temperature 0\nPARAMETER stop <|im_end|>\nLICENSE MIT\n')
    assert run_cli("create", "pirate-cli", "-f", str(tmp_path / "Modelfile"))[0] == 0
    assert store.resolve("pirate-cli").digest == entry.digest


def test_ollama_client_create_from_a_model(server, store, default_model):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server.url)
    result = client.create(model="quiz", from_=default_model, template=modelfile.parse(
        'FROM x\nTEMPLATE "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        '<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"').instructions[1].text,
        messages=[{"role": "user", "content": "Is Toronto in Canada?"}, {"role": "assistant", "content": "yes"}])
    assert result.status == "success"
    entry = store.resolve("quiz")
    assert entry.manifest.layers_of(st.MEDIA_GGUF) == store.resolve(default_model).manifest.layers_of(st.MEDIA_GGUF)
    settings = cr.settings_of(store, entry)
    assert settings.messages == (("user", "Is Toronto in Canada?"), ("assistant", "yes"))
    assert settings.template.startswith("{{ if .System }}<|im_start|>system")  # Ollama's Go template, as sent
    assert entry.manifest.layers_of(st.MEDIA_OLLAMA_TEMPLATE) and not entry.manifest.layers_of(st.MEDIA_TEMPLATE)
    shown = client.show("quiz")
    assert shown is not None


def test_create_quantizes_over_the_api_and_through_the_ollama_client(server, store, tiny_safetensors_model):
    body = {"model": "tiny-q8", "from": tiny_safetensors_model, "quantize": "q8"}
    got, raw = _req(server, "POST", "/api/create", json.dumps(body).encode(), {"Content-Type": "application/json"})
    statuses = [json.loads(line)["status"] for line in raw.splitlines()]
    assert got == 200 and statuses[0].startswith("quantizing float32 safetensors model tiny-st:latest to q8")
    assert statuses[-2:] == ["writing manifest", "success"]
    assert store.read_config(store.resolve("tiny-q8"))["quantization"] == "Q8 (group 64)"
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server.url)
    assert client.create(model="tiny-q4", from_=tiny_safetensors_model, quantize="q4_K_M").status == "success"
    assert client.show("tiny-q4").details.quantization_level == "Q4 (group 64)"
    with pytest.raises(ollama.ResponseError, match="already quantized") as info:
        client.create(model="again", from_="tiny-q4", quantize="q8", stream=True).__next__()
    assert info.value.status_code == 400


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"model": "x", "from": "nosuch"}, 404, "not found"),
    ({"model": "x"}, 400, "neither"),
    ({"model": "x", "from": "smollm2:135m", "parameters": {"bogus": 1}}, 400, "unknown option"),
    ({"model": "x", "from": "smollm2:135m", "parameters": {"top_p": 5}}, 400, "outside"),
    ({"model": "x", "from": "smollm2:135m", "template": "### User: {{ .Prompt }"}, 400, "Go template"),
    ({"model": "x", "from": "smollm2:135m", "quantize": "q4_K_M"}, 400, "already quantized (GGUF Q4_1, Q8_0)"),
    ({"model": "x", "from": "smollm2:135m", "quantize": "q3_K_S"}, 400, "unknown quantization type 'q3_K_S'"),
    ({"model": "x", "from": "smollm2:135m", "quantize": 4}, 400, "invalid quantization type"),
    ({"model": "x", "from": "smollm2:135m", "adapters": {"a.gguf": "sha256:" + "1" * 64}}, 400, "adapters"),
    ({"model": "x", "files": {"m.gguf": "sha256:" + "1" * 64}}, 400, "was not uploaded"),
    ({"model": "bad name!", "from": "smollm2:135m"}, 400, "invalid model name"),
    ({"model": "x", "from": "../etc/passwd"}, 400, "not a model name"),
    ({"model": "x", "files": {"../evil.gguf": "sha256:" + "1" * 64}}, 400, "invalid file name"),
])
def test_create_errors_are_statuses_before_any_line(server, store, default_model, body, status, words):
    got, raw = _req(server, "POST", "/api/create", json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert got == status, raw
    assert words in json.loads(raw)["error"]
    assert [e.name.display for e in store.list()] == [default_model]


@pytest.mark.e2e
@pytest.mark.slow
def test_created_model_chats_in_character_through_the_server(server, store, default_model):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server.url)
    client.create(model="pirate", from_=default_model, parameters={"temperature": 0, "num_predict": 24},
                  system="You are a pirate captain. Always talk like a pirate: say Arr, matey and Ahoy.")
    ask = [{"role": "user", "content": "Who are you?"}]
    pirate = client.chat(model="pirate", messages=ask).message.content
    plain = client.chat(model=default_model, messages=ask, options={"temperature": 0, "num_predict": 24}).message.content
    assert pirate != plain
    assert any(w in pirate.lower() for w in ("arr", "aye", "ahoy", "matey", "captain", "pirate", "sea")), pirate


def test_create_from_uploaded_safetensors_files(server, store, tiny_safetensors_dir):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server.url)
    files = {p.name: client.create_blob(p) for p in sorted(tiny_safetensors_dir.iterdir()) if p.is_file()}
    assert client.create(model="tiny-up", files=files, system="be brief").status == "success"
    entry = store.resolve("tiny-up")
    assert {name: layer.digest for name, layer in entry.manifest.files().items()} == files
    assert cr.settings_of(store, entry).system == "be brief"


def test_older_request_shape_with_a_whole_modelfile(server, store, default_model):
    body = {"name": "mf", "modelfile": f"FROM {default_model}\nSYSTEM hi\nPARAMETER top_k 7\nREQUIRES 0.14.0\n",
            "stream": False}
    status, raw = _req(server, "POST", "/api/create", json.dumps(body).encode())
    assert status == 200 and json.loads(raw) == {"status": "success"}
    settings = cr.settings_of(store, store.resolve("mf"))
    assert (settings.system, settings.parameters, settings.requires) == ("hi", {"top_k": 7}, "0.14.0")
    bad = {"name": "mf2", "modelfile": "FROM x\nPARAMETER top_k many\n"}
    status, raw = _req(server, "POST", "/api/create", json.dumps(bad).encode())
    assert status == 400 and json.loads(raw)["error"].startswith("Modelfile:2:17: ")
    local = {"name": "mf3", "modelfile": "FROM /etc/passwd\n"}
    status, raw = _req(server, "POST", "/api/create", json.dumps(local).encode())
    assert status == 400 and "must name a model" in json.loads(raw)["error"]


def test_create_from_never_reads_the_daemons_files(server, store, tiny_gguf_path, tiny_gguf_model,
                                                   tmp_path, monkeypatch):
    # The daemon's working directory holds a GGUF, a secret, and a folder named like a stored model.
    cwd = tmp_path / "daemon-cwd"
    (cwd / "etc").mkdir(parents=True)
    (cwd / "private.gguf").write_bytes(tiny_gguf_path.read_bytes())
    (cwd / "etc" / "passwd").write_text("root:x:0:0:SECRET-BYTES\n")
    (cwd / tiny_gguf_model).mkdir()
    monkeypatch.chdir(cwd)
    before = sorted(e.name.display for e in store.list())

    def create(body):
        got, raw = _req(server, "POST", "/api/create", json.dumps({**body, "stream": False}).encode(),
                        {"Content-Type": "application/json"})
        return got, json.loads(raw)

    for source in ("private.gguf", "etc/passwd"):
        got, reply = create({"model": "stolen", "from": source})
        assert got == 404, reply
        assert "not found" in reply["error"] and "SECRET" not in reply["error"]
    assert sorted(e.name.display for e in store.list()) == before
    # A folder named like the stored model does not hide it.
    got, reply = create({"model": "copy", "from": tiny_gguf_model, "system": "be brief"})
    assert got == 200 and reply["status"] == "success", reply
    base = store.resolve(tiny_gguf_model).manifest.layers_of(st.MEDIA_GGUF)
    assert store.resolve("copy").manifest.layers_of(st.MEDIA_GGUF) == base


@pytest.mark.parametrize("chunked", [False, True])
def test_blob_upload_onto_a_full_disk_is_a_507_the_client_reads(server, store, monkeypatch, chunked):
    """The 507 (was a 500, and the socket closed on the unread body) reaches a client that is
    still uploading; nothing is kept and the connection stays usable."""
    blobs_on_dev_full(monkeypatch)
    data = bytes(range(256)) * (32 << 10)          # 8 MiB: far more than the socket buffers hold
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        if chunked:
            parts = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
            conn.request("POST", f"/api/blobs/{digest}", body=iter(parts), encode_chunked=True,
                         headers={"Transfer-Encoding": "chunked"})
        else:
            conn.request("POST", f"/api/blobs/{digest}", body=data)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 507
        assert body == {"error": f"no space left on device at {store.blob_dir}"}
        conn.request("HEAD", f"/api/blobs/{digest}")   # the same connection still answers
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404
    finally:
        conn.close()
    assert not store.has_blob(digest)
    assert [p.name for p in store.blob_dir.iterdir()] == []
    (line,) = [r for r in server.log_lines() if r.get("status") == 507]
    assert "no space left on device" in line["error"] and "traceback" not in line
