"""Real OCI registries for the pull/push tests, all on loopback.

- `registry`: Debian's `docker-registry` (Docker Distribution 2.8) on 127.0.0.1, port
  chosen by the kernel (port 0; read back from its log), temp storage, deletes enabled.
- `token_registry`: the same behind bearer-token auth; the token server is ours (a
  ThreadingHTTPServer issuing RS256 JWTs with an `x5c` chain the registry trusts).
  User `alice`/`wonderland` gets what she asks for; anonymous users get nothing.
- `basic_registry`: htpasswd basic auth (bcrypt hashes; needs the `bcrypt` package).
- `registry_proxy(target)`: an HTTP proxy in front of a registry that counts body bytes,
  and on request throttles, flips a byte of blob bodies, or stalls once mid-body.
Tests skip with a clear reason only when the `docker-registry` binary is missing.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
USER, PASSWORD = "alice", "wonderland"


@dataclass
class RunningRegistry:
    host: str  # 127.0.0.1:<port>
    root: Path
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def name(self, repo_tag: str) -> str:
        return f"{self.host}/{repo_tag}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start(tmp: Path, auth_yaml: str = "") -> RunningRegistry:
    if not os.path.exists(BINARY):
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "config.yml"
    cfg.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:0\n  secret: {secrets.token_hex(16)}\n"
        + auth_yaml
    )
    log = tmp / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([BINARY, "serve", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(r'listening on 127\.0\.0\.1:(\d+)', log.read_text(errors="replace"))
        if match:
            return RunningRegistry(f"127.0.0.1:{match.group(1)}", tmp, proc, log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"docker-registry did not start:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def registry(tmp_path_factory):
    reg = _start(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


# ---- token auth ----------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    server: http.server.ThreadingHTTPServer
    requests: list = field(default_factory=list)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"


def _token_server(key, cert_der: bytes, service: str, issuer: str) -> TokenServer:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    state = TokenServer(server=None)  # type: ignore[arg-type]

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            from urllib.parse import parse_qs, urlsplit

            query = parse_qs(urlsplit(self.path).query)
            auth = self.headers.get("Authorization", "")
            user = None
            if auth.startswith("Basic "):
                name, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                if (name, pw) != (USER, PASSWORD):
                    self.send_response(401)
                    self.end_headers()
                    return
                user = name
            state.requests.append({"user": user, "scope": query.get("scope", [])})
            access = []
            for scope in query.get("scope", []):
                for one in scope.split(" "):
                    kind, _, rest = one.partition(":")
                    repo, _, actions = rest.rpartition(":")
                    if user:  # anonymous users are granted nothing
                        access.append({"type": kind, "name": repo, "actions": actions.split(",")})
            now = int(time.time())
            header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(cert_der).decode()]}
            claims = {"iss": issuer, "sub": user or "", "aud": service, "exp": now + 600,
                      "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
            signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
            sig = key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
            body = json.dumps({"token": f"{signing}.{_b64url(sig)}"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    state.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=state.server.serve_forever, args=(0.05,), daemon=True).start()
    return state


@pytest.fixture
def token_registry(tmp_path_factory):
    pytest.importorskip("cryptography", reason="the token server signs JWTs with `cryptography`")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    tmp = tmp_path_factory.mktemp("token_registry")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlxlite-test-token")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp / "root.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    service, issuer = "mlxlite-test", "mlxlite-test-issuer"
    tokens = _token_server(key, cert.public_bytes(serialization.Encoding.DER), service, issuer)
    reg = _start(tmp, "auth:\n  token:\n"
                      f"    realm: {tokens.realm}\n    service: {service}\n    issuer: {issuer}\n"
                      f"    rootcertbundle: {tmp / 'root.pem'}\n")
    reg.tokens = tokens  # type: ignore[attr-defined]
    yield reg
    reg.stop()
    tokens.server.shutdown()


def self_signed(tmp: Path, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
                ) -> tuple[Path, Path]:
    """A key and self-signed certificate for these names and addresses (PEM files in `tmp`)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (ips or dns)[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName(d) for d in dns]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = tmp / "tls.key", tmp / "tls.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture
def tls_registry(tmp_path_factory, monkeypatch):
    """docker-registry over HTTPS with a self-signed certificate that SSL_CERT_FILE trusts."""
    pytest.importorskip("cryptography", reason="the test certificate is made with `cryptography`")
    tmp = tmp_path_factory.mktemp("tls_registry")
    key_path, cert_path = self_signed(tmp)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))
    reg = _start(tmp, f"  tls:\n    certificate: {cert_path}\n    key: {key_path}\n")
    yield reg
    reg.stop()


@pytest.fixture
def basic_registry(tmp_path_factory):
    bcrypt = pytest.importorskip("bcrypt", reason="htpasswd auth needs bcrypt hashes (pip install bcrypt)")
    tmp = tmp_path_factory.mktemp("basic_registry")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    (tmp / "htpasswd").write_text(f"{USER}:{hashed}\n")
    reg = _start(tmp, f"auth:\n  htpasswd:\n    realm: mlxlite-test\n    path: {tmp / 'htpasswd'}\n")
    yield reg
    reg.stop()


# ---- a misbehaving proxy -------------------------------------------------------------------
class RegistryProxy:
    """Forwards HTTP to `target`, counting blob body bytes; can throttle, corrupt or stall."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.blob_bytes = 0
        self.upload_bytes = 0
        self.rate = 0.0            # bytes/second for blob bodies (0: unlimited)
        self.corrupt = False       # flip one byte in every blob body
        self.stall_once = 0.0      # stall this many seconds once, mid-body, then close
        self.stalls = 0
        self.fail_next = 0         # answer this many blob GETs with 503
        self.redirect_to = ""      # answer blob GETs with a 307 to this host (a "CDN")
        self.redirects = 0
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy._forward(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _forward(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        if body and "/blobs/uploads/" in handler.path:
            with self.lock:
                self.upload_bytes += len(body)
        if handler.command == "GET" and "/blobs/sha256:" in handler.path and self.redirect_to:
            with self.lock:
                self.redirects += 1
            handler.send_response(307)
            handler.send_header("Location", f"http://{self.redirect_to}{handler.path}")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if handler.command == "GET" and "/blobs/sha256:" in handler.path:
            with self.lock:
                fail = self.fail_next > 0
                if fail:
                    self.fail_next -= 1
                    self.failed += 1
            if fail:
                handler.send_response(503)
                handler.send_header("Content-Length", "0")
                handler.send_header("Connection", "close")
                handler.end_headers()
                handler.close_connection = True
                return
        conn = http.client.HTTPConnection(self.target, timeout=60)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(handler.command, handler.path, body=body, headers=headers)
        resp = conn.getresponse()
        is_blob = handler.command == "GET" and "/blobs/sha256:" in handler.path and resp.status in (200, 206)
        if is_blob:
            # A small send buffer: bytes counted as sent are (nearly) bytes the client got.
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        handler.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("connection", "transfer-encoding"):
                if key.lower() == "location" and value.startswith(f"http://{self.target}"):
                    value = value.replace(self.target, self.host, 1)
                handler.send_header(key, value)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        if handler.command == "HEAD":
            conn.close()
            return
        first = True
        sent = 0
        started = time.monotonic()
        try:
            while True:
                data = resp.read(16384)
                if not data:
                    break
                if is_blob and self.corrupt and first:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                first = False
                if is_blob and self.stall_once and sent > 0:
                    with self.lock:
                        stall, self.stall_once = self.stall_once, 0.0
                        self.stalls += 1
                    time.sleep(stall)
                    return
                handler.wfile.write(data)
                sent += len(data)
                if is_blob:
                    with self.lock:
                        self.blob_bytes += len(data)
                    if self.rate:
                        delay = started + sent / self.rate - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            conn.close()


@pytest.fixture
def registry_proxy():
    proxies: list[RegistryProxy] = []

    def make(target: str) -> RegistryProxy:
        proxy = RegistryProxy(target)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
