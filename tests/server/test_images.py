"""Image URLs the daemon fetches (`server/images.py`, MLXLITE_IMAGE_FETCH) reach public
addresses only unless the setting is `private`: every address a host resolves to is checked,
the connection goes to the address checked (one lookup, the URL's host in Host and SNI), and
every redirect hop is checked again. All of it on loopback: names other than localhost are
answered by a stand-in resolver, and a refused address is never connected to."""

from __future__ import annotations

import http.server
import ipaddress
import re
import socket
import ssl
import threading
import urllib.parse

import pytest

from mlxlite import config
from mlxlite.errors import BadRequest
from mlxlite.server import images
from tests.vision_models import png, send_png

WHERE = "messages[0].content[1].image_url.url"
LOOPBACK = ipaddress.ip_address("127.0.0.1")


class ImageHost:
    """A loopback HTTP(S) server: /one.png a PNG, /hop?to=URL a 302 to URL, /loop a 302 to
    itself; `seen` holds (path, Host header) of every request it got."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[tuple[str, str]] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                host.seen.append((self.path, self.headers.get("Host", "")))
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/one.png":
                    send_png(self, png(1))
                elif url.path in ("/hop", "/loop"):
                    self.send_response(302)
                    self.send_header("Location", urllib.parse.parse_qs(url.query)["to"][0]
                                     if url.path == "/hop" else "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_error(404)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"http{'s' * (tls is not None)}://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def image_host():
    host = ImageHost()
    yield host
    host.close()


def only_loopback_allowed(asked: list) -> images.Refusal:
    """The default refusal, except that 127.0.0.1 counts as public (loopback stands in for
    the internet here); every address asked about is recorded."""
    def refuse(ip):
        asked.append(str(ip))
        return None if ip == LOOPBACK else images.address_refusal(ip)
    return refuse


def fake_resolver(monkeypatch, answers: dict[str, list[tuple[str, int]]]) -> list[str]:
    """getaddrinfo for the names in `answers`: each lookup takes the next (ip, port); other
    names resolve as usual. Returns the names looked up, in order."""
    real = socket.getaddrinfo
    looked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        looked.append(host)
        ip, answer_port = answers[host].pop(0)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, answer_port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked


# ---- which addresses are public ---------------------------------------------------------------
@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "a loopback address"), ("127.8.9.10", "a loopback address"), ("::1", "a loopback address"),
    ("10.1.2.3", "a private address"), ("172.16.0.1", "a private address"), ("192.168.1.1", "a private address"),
    ("fc00::1", "a private address"), ("169.254.169.254", "a link-local address"), ("fe80::1", "a link-local address"),
    ("224.0.0.251", "a multicast address"), ("ff02::1", "a multicast address"), ("0.0.0.0", "an unspecified address"),
    ("::", "an unspecified address"), ("240.0.0.1", "a reserved address"), ("fec0::1", "a site-local address"),
    ("100.64.0.1", "an address that is not globally routable"),   # carrier-grade NAT
    ("::ffff:127.0.0.1", "a loopback address (127.0.0.1)"), ("::ffff:169.254.169.254", "a link-local address"),
    ("64:ff9b::a9fe:a9fe", "a link-local address (169.254.169.254)"),   # NAT64 of the metadata address
    ("2002:a00:1::", "a private address (10.0.0.1)"),                    # 6to4 of a private one
])
def test_non_public_addresses_are_refused_and_say_what_they_are(address, why):
    assert images.address_refusal(ipaddress.ip_address(address)).startswith(why)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111",
                                     "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808"])   # NAT64 of a public address
def test_public_addresses_are_allowed(address):
    assert images.address_refusal(ipaddress.ip_address(address)) is None


def test_the_setting_is_off_public_or_private(monkeypatch):
    for value, want in (("0", "off"), ("", "off"), ("1", "public"), ("true", "public"), ("public", "public"),
                        ("private", "private"), ("PRIVATE", "private")):
        monkeypatch.setenv("MLXLITE_IMAGE_FETCH", value)
        assert config.get("image_fetch") == want, value
    monkeypatch.setenv("MLXLITE_IMAGE_FETCH", "everything")
    with pytest.raises(BadRequest, match="MLXLITE_IMAGE_FETCH"):
        config.get("image_fetch")


# ---- fetching ---------------------------------------------------------------------------------
def test_loopback_is_refused_unless_the_private_opt_in_allows_it(image_host, monkeypatch):
    url = image_host.url + "/one.png"
    monkeypatch.setenv("MLXLITE_IMAGE_FETCH", "1")
    with pytest.raises(BadRequest, match=re.escape(f"invalid {WHERE}: not fetching {url}: 127.0.0.1 is a loopback "
                                                   "address; image URLs may name public addresses only "
                                                   "(MLXLITE_IMAGE_FETCH=private allows the rest)")):
        images.from_url(url, WHERE)
    with pytest.raises(BadRequest, match=r"localhost resolves to (127\.0\.0\.1|::1), a loopback address"):
        images.from_url(f"http://localhost:{image_host.port}/one.png", WHERE)
    assert image_host.seen == []            # refused before connecting
    monkeypatch.setenv("MLXLITE_IMAGE_FETCH", "private")
    assert images.from_url(url, WHERE) == png(1)


def test_every_redirect_hop_is_checked(image_host):
    asked: list = []
    refuse = only_loopback_allowed(asked)
    hop = image_host.url + "/hop?to="
    assert images.fetch(hop + image_host.url + "/one.png", WHERE, refuse) == png(1)
    assert asked == ["127.0.0.1", "127.0.0.1"]      # the redirect's address was checked too
    for target, why in (("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
                        (f"http://[::1]:{image_host.port}/one.png", "::1 is a loopback address"),
                        (f"http://10.0.0.1:{image_host.port}/one.png", "10.0.0.1 is a private address")):
        image_host.seen.clear()
        with pytest.raises(BadRequest, match=re.escape(f"not fetching {target}: {why}")):
            images.fetch(hop + urllib.parse.quote(target), WHERE, refuse)
        assert [path for path, _ in image_host.seen] == ["/hop?to=" + urllib.parse.quote(target)]
    with pytest.raises(BadRequest, match="more than 5 redirects"):
        images.fetch(image_host.url + "/loop", WHERE, refuse)
    with pytest.raises(BadRequest, match="must be http"):
        images.fetch(hop + "file:///etc/passwd", WHERE, refuse)


def test_a_host_is_looked_up_once_and_the_checked_address_connected(image_host, monkeypatch):
    """DNS rebinding: a second lookup would answer a closed port (here standing in for an
    address the check never saw); the fetch connects to what the one lookup answered."""
    looked = fake_resolver(monkeypatch, {"images.test": [("127.0.0.1", image_host.port), ("127.0.0.1", 1)]})
    asked: list = []
    assert images.fetch(f"http://images.test:{image_host.port}/one.png", WHERE, only_loopback_allowed(asked)) == png(1)
    assert looked == ["images.test"] and asked == ["127.0.0.1"]
    assert image_host.seen == [("/one.png", f"images.test:{image_host.port}")]


def test_every_address_a_host_resolves_to_is_checked(image_host, monkeypatch):
    real = socket.getaddrinfo

    def two_answers(host, port, *args, **kwargs):
        if host != "images.test":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
                for ip in ("127.0.0.1", "169.254.169.254")]

    monkeypatch.setattr(socket, "getaddrinfo", two_answers)
    with pytest.raises(BadRequest, match="images.test resolves to 169.254.169.254, a link-local address"):
        images.fetch(f"http://images.test:{image_host.port}/one.png", WHERE, only_loopback_allowed([]))
    assert image_host.seen == []


def test_https_to_the_checked_address_names_the_urls_host_in_sni_and_the_certificate_check(tmp_path, monkeypatch):
    pytest.importorskip("cryptography", reason="the test certificate is made with `cryptography`")
    from tests.registry_fixtures import self_signed

    key, cert = map(str, self_signed(tmp_path, dns=("images.test",), ips=()))     # the DNS name only
    monkeypatch.setenv("SSL_CERT_FILE", cert)       # the client trusts this one certificate
    server_names: list = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.sni_callback = lambda sock, name, ctx: server_names.append(name)
    host = ImageHost(tls)
    try:
        fake_resolver(monkeypatch, {"images.test": [("127.0.0.1", host.port)]})
        got = images.fetch(f"https://images.test:{host.port}/one.png", WHERE, only_loopback_allowed([]))
        assert got == png(1) and server_names == ["images.test"]
        assert host.seen == [("/one.png", f"images.test:{host.port}")]
        # The certificate is checked against the URL's host: by address, it names the wrong one.
        with pytest.raises(BadRequest, match="fetching the image failed: .*certificate"):
            images.fetch(f"https://127.0.0.1:{host.port}/one.png", WHERE, only_loopback_allowed([]))
    finally:
        host.close()
