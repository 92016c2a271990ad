"""hf.co pulls and plain-URL pulls against a local server that speaks the hub's API.

The server serves `/api/models/<repo>/revision/<rev>?blobs=true` and
`/<repo>/resolve/<rev>/<file>` from fixture files; LFS files redirect to a "CDN" on
another host name (localhost vs 127.0.0.1), which must never see the token.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import struct
import threading
import urllib.parse

import pytest

from mlxlite.errors import BadRequest, IntegrityError, ModelNotFound
from mlxlite.remote import pull

SHA = "0123456789abcdef0123456789abcdef01234567"


def make_gguf(file_type: int, pad: int = 300_000) -> bytes:
    """A small valid GGUF v3 file: llama metadata, no tensors, padding after the header."""
    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kvs = [("general.architecture", 8, string("llama")),
           ("general.file_type", 4, struct.pack("<I", file_type)),
           ("general.parameter_count", 10, struct.pack("<Q", 135_000_000)),
           ("llama.context_length", 4, struct.pack("<I", 2048))]
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, kind, value in kvs:
        out += string(key) + struct.pack("<I", kind) + value
    return out + os.urandom(pad)


def make_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    return struct.pack("<Q", len(header)) + header + os.urandom(64)


class Hub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.token: str | None = None
        self.cdn_auth: list[str] = []
        self.corrupt: set[str] = set()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head: bool = False):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                if path.startswith("/cdn/"):
                    hub.cdn_auth.append(self.headers.get("Authorization", ""))
                    data = hub.blobs()[path[5:]]
                    if path[5:] in hub.corrupt:
                        data = b"\x00" + data[1:]
                    return self.send_bytes(data, head)
                if path.startswith("/files/"):
                    return self.send_bytes(hub.repos["files"][path[7:]], head)
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self.send_json(401, {"error": "Invalid credentials"})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
                if m:
                    files = hub.repos.get(m.group(1))
                    if files is None or m.group(2) not in ("main", SHA):
                        return self.send_json(404, {"error": "Repository not found"})
                    siblings = []
                    for name, data in files.items():
                        sib = {"rfilename": name, "size": len(data)}
                        if name.endswith((".gguf", ".safetensors")):
                            sib["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                          "pointerSize": 130}
                        siblings.append(sib)
                    return self.send_json(200, {"id": m.group(1), "sha": SHA, "siblings": siblings})
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m and m.group(1) in hub.repos and m.group(3) in hub.repos[m.group(1)]:
                    data = hub.repos[m.group(1)][m.group(3)]
                    if m.group(3).endswith((".gguf", ".safetensors")):
                        self.send_response(302)
                        port = self.server.server_address[1]
                        self.send_header("Location", f"http://localhost:{port}/cdn/{hashlib.sha256(data).hexdigest()}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                    return self.send_bytes(data, head)
                return self.send_json(404, {"error": "Entry not found"})

            def send_json(self, status: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def send_bytes(self, data: bytes, head: bool) -> None:
                rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if rng:
                    start = int(rng.group(1))
                    end = int(rng.group(2)) if rng.group(2) else len(data) - 1
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                    data = data[start:end + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def blobs(self) -> dict[str, bytes]:
        return {hashlib.sha256(d).hexdigest(): d for files in self.repos.values() for d in files.values()}


@pytest.fixture
def hub(monkeypatch):
    server = Hub()
    monkeypatch.setenv("MLXLITE_HF_ENDPOINT", server.url)
    yield server
    server.server.shutdown()


def files_of(store, entry) -> dict[str, bytes]:
    return {t: store.blob_path(layer.digest).read_bytes() for t, layer in entry.manifest.files().items()}


def test_gguf_repo_pulls_the_quantization_its_tag_names(store, hub):
    q40, q4km = make_gguf(2), make_gguf(15)
    hub.repos["org/Tiny-GGUF"] = {"Tiny.Q4_0.gguf": q40, "Tiny.Q4_K_M.gguf": q4km, "README.md": b"# tiny"}
    events: list[dict] = []
    entry = pull(store, "hf.co/org/Tiny-GGUF:Q4_0", progress=events.append)
    assert files_of(store, entry) == {"Tiny.Q4_0.gguf": q40}
    info = store.read_config(entry)
    assert info["format"] == "gguf" and info["architecture"] == "llama" and info["context_length"] == 2048
    assert "parameter_count" in info and "Q4_0" in info["quantization"]
    assert info["files"] == ["Tiny.Q4_0.gguf"] and info["source"] == f"hf.co/org/Tiny-GGUF@{SHA}"
    assert [e["status"] for e in events][-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    assert hashlib.sha256(q40).hexdigest() in {e.get("digest", "")[7:] for e in events}
    # No tag: Q4_K_M, as Ollama picks.
    entry = pull(store, "hf.co/org/Tiny-GGUF")
    assert list(files_of(store, entry)) == ["Tiny.Q4_K_M.gguf"]
    assert store.verify() == []


def test_unknown_quantization_lists_the_available_ones(store, hub):
    hub.repos["org/Tiny-GGUF"] = {"Tiny.Q4_0.gguf": make_gguf(2), "Tiny.Q8_0.gguf": make_gguf(7)}
    with pytest.raises(BadRequest, match=r"Q5_K_M.*available: Q4_0, Q8_0"):
        pull(store, "hf.co/org/Tiny-GGUF:Q5_K_M")
    with pytest.raises(BadRequest, match="pick one with a tag"):
        pull(store, "hf.co/org/Tiny-GGUF")  # two files and no Q4_K_M


def test_safetensors_repo_with_token_and_cdn_redirect(store, hub, monkeypatch):
    files = {"config.json": json.dumps({"model_type": "llama", "max_position_embeddings": 512}).encode(),
             "model.safetensors": make_safetensors(), "tokenizer.json": b'{"version":"1.0"}',
             "chat_template.jinja": b"{{ messages }}", "weights.bin": b"not ours", ".gitattributes": b"*"}
    hub.repos["mlx-community/Tiny-4bit"] = files
    hub.token = "hf_secret"
    with pytest.raises(Exception, match="HF_TOKEN"):
        pull(store, "hf.co/mlx-community/Tiny-4bit")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    entry = pull(store, "hf.co/mlx-community/Tiny-4bit")
    expected = {k: v for k, v in files.items() if k not in ("weights.bin", ".gitattributes")}
    assert files_of(store, entry) == expected
    info = store.read_config(entry)
    assert info["format"] == "safetensors" and info["parameter_count"] == 16 and info["context_length"] == 512
    assert hub.cdn_auth and all(a == "" for a in hub.cdn_auth)  # the token never left the hub host
    view = store.view(entry)
    assert (view / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_hub_sha256_mismatch_is_a_digest_error(store, hub):
    data = make_gguf(2)
    hub.repos["org/Bad-GGUF"] = {"Bad.Q4_0.gguf": data}
    hub.corrupt.add(hashlib.sha256(data).hexdigest())
    with pytest.raises(IntegrityError, match="digest mismatch"):
        pull(store, "hf.co/org/Bad-GGUF:Q4_0")
    assert not store.has_blob("sha256:" + hashlib.sha256(data).hexdigest())
    assert store.list() == []


def test_missing_repo_is_not_found(store, hub):
    with pytest.raises(ModelNotFound):
        pull(store, "hf.co/org/nothing")


def test_url_pull_with_and_without_sha256(store, hub, run_cli):
    data = make_gguf(2)
    hub.repos["files"] = {"My-Model.Q4_0.gguf": data}
    url = f"{hub.url}/files/My-Model.Q4_0.gguf"
    entry = pull(store, url)
    assert files_of(store, entry) == {"My-Model.Q4_0.gguf": data}
    assert entry.name.display == "my-model.q4_0:latest"
    store.remove(entry.name)
    code, out, err = run_cli("pull", url, "--sha256", hashlib.sha256(data).hexdigest())
    assert code == 0, err
    assert store.exists("my-model.q4_0")
    store.remove("my-model.q4_0")
    code, out, err = run_cli("pull", url, "--sha256", "0" * 64)
    assert code == 1 and "digest mismatch" in err
    assert not store.exists("my-model.q4_0")
