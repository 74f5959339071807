"""Remote image URLs: allow-list, public addresses only (pinned), size cap, redirects re-checked; the sandbox
(table resolver + recording loopback-only transport) that tests and drills give a server."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from trimodal.inference import media_fetch
from trimodal.inference.media_fetch import (MediaFetcher, MediaSandbox, check_public, host_allowed, ip_literal,
                                            is_loopback, parse_domains, read_attempts, table_resolver)
from trimodal.inference.messages import RequestError

PUBLIC = "93.184.215.14"


def _fetcher(handler, resolve=lambda host, port: [PUBLIC], max_bytes=1000, domains=("img.example.com",)):
    return MediaFetcher(domains, max_bytes, timeout_s=2, resolve=resolve, transport=httpx.MockTransport(handler))


def test_domain_lists_and_matching():
    assert parse_domains(" a.com, *.B.org ,,") == ("a.com", "*.b.org")
    assert parse_domains(None) == ()
    assert host_allowed("a.com", ["a.com"]) and host_allowed("A.COM.", ["a.com"])
    assert not host_allowed("evil-a.com", ["a.com"]) and not host_allowed("x.a.com", ["a.com"])
    assert host_allowed("x.b.org", ["*.b.org"]) and not host_allowed("b.org", ["*.b.org"])
    assert not host_allowed("xb.org", ["*.b.org"])


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.5", "169.254.169.254", "::1",
                                     "::ffff:127.0.0.1", "0.0.0.0", "fe80::1", "224.0.0.1", "100.64.0.1"])
def test_non_public_addresses_are_refused(address):
    with pytest.raises(RequestError, match="non-public address"):
        check_public(address, "h")


def test_fetch_connects_to_the_vetted_address_with_the_original_host():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"PNGDATA")

    assert _fetcher(handler)("https://img.example.com/a.png?x=1") == b"PNGDATA"
    assert seen[0].url.host == PUBLIC and seen[0].url.path == "/a.png" and seen[0].url.query == b"x=1"
    assert seen[0].headers["host"] == "img.example.com"
    assert seen[0].extensions["sni_hostname"] == "img.example.com"


@pytest.mark.parametrize("url, match", [
    ("https://other.example.com/a.png", "not in the allowed media domains"),
    ("ftp://img.example.com/a.png", "http"),
    ("https://user:pw@img.example.com/a.png", "credentials"),
])
def test_urls_refused_before_any_request(url, match):
    def handler(request):
        raise AssertionError("no request may be made")

    with pytest.raises(RequestError, match=match):
        _fetcher(handler)(url)


def test_host_resolving_to_a_private_address_is_refused():
    def handler(request):
        raise AssertionError("no request may be made")

    with pytest.raises(RequestError, match="non-public address"):
        _fetcher(handler, resolve=lambda host, port: [PUBLIC, "10.0.0.7"])("http://img.example.com/a.png")


def test_size_cap_by_header_and_by_count():
    big = _fetcher(lambda r: httpx.Response(200, content=b"x" * 2000))
    with pytest.raises(RequestError, match="over the limit"):
        big("http://img.example.com/a.png")

    def chunked(request):
        return httpx.Response(200, content=iter([b"x" * 600, b"x" * 600]))  # no Content-Length

    with pytest.raises(RequestError, match="over the limit of 1000 bytes"):
        _fetcher(chunked)("http://img.example.com/a.png")


def test_redirects_are_checked_again_and_errors_are_named():
    def to_elsewhere(request):
        return httpx.Response(302, headers={"location": "http://169.254.169.254/latest"})

    with pytest.raises(RequestError, match="not in the allowed media domains"):
        _fetcher(to_elsewhere)("http://img.example.com/a.png")

    def same_host(request):
        if request.url.path == "/a.png":
            return httpx.Response(301, headers={"location": "/b.png"})
        return httpx.Response(200, content=b"ok")

    assert _fetcher(same_host)("http://img.example.com/a.png") == b"ok"
    with pytest.raises(RequestError, match="HTTP 404"):
        _fetcher(lambda r: httpx.Response(404))("http://img.example.com/a.png")


def test_the_table_resolver_answers_literals_and_its_table_and_nothing_else():
    resolve = table_resolver({"Metadata.Google.Internal": ["169.254.169.254"]})
    assert resolve("metadata.google.internal.", 80) == ["169.254.169.254"]
    assert resolve("10.0.0.1", 80) == ["10.0.0.1"] and resolve("::1", 80) == ["::1"]
    assert resolve("2130706433", 80) == ["127.0.0.1"] and resolve("0x7f000001", 80) == ["127.0.0.1"]  # inet_aton
    with pytest.raises(RequestError, match="does not resolve \\(not in the resolver table\\)"):
        resolve("example.com", 80)
    assert ip_literal("localhost") is None and ip_literal("[::1]") == "::1"
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("localhost") and not is_loopback("10.0.0.1") and not is_loopback("0.0.0.0")


class _Image(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "7")
        self.end_headers()
        self.wfile.write(b"PNGDATA")

    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Image)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def connections(monkeypatch):
    """Every address a socket is connected to in this test (the transport's only way out)."""
    seen, real = [], socket.socket.connect

    def connect(sock, address):
        seen.append(address[0])
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def test_the_sandbox_connects_to_loopback_only_and_records_every_attempt(tmp_path, monkeypatch, loopback_server,
                                                                         connections):
    """With check_public broken on purpose, a public and a private host reach the transport: it records both
    and opens a socket to neither; the loopback image server is reached."""
    monkeypatch.setattr(media_fetch, "check_public", lambda address, host: address)  # a regression
    record = tmp_path / "attempts.jsonl"
    sandbox = MediaSandbox(str(record), {"img.test": ("127.0.0.1",), "cdn.test": ("93.184.215.14",),
                                         "metadata.google.internal": ("169.254.169.254",)})
    fetch = sandbox.fetcher(("img.test", "cdn.test", "metadata.google.internal"), 1000, 5)
    assert fetch(f"http://img.test:{loopback_server}/a.png") == b"PNGDATA"
    for url in ("http://cdn.test/a.png", "http://metadata.google.internal/computeMetadata/v1/"):
        with pytest.raises(RequestError, match="ConnectError: the loopback-only media transport refused"):
            fetch(url)
    assert fetch(f"http://img.test:{loopback_server}/b.png") == b"PNGDATA"  # one pooled transport, still open
    attempts = read_attempts(record)
    assert [(a["host"], a["allowed"]) for a in attempts] == [
        ("127.0.0.1", True), ("93.184.215.14", False), ("169.254.169.254", False), ("127.0.0.1", True)]
    assert connections and set(connections) == {"127.0.0.1"}


def test_an_intact_check_refuses_before_the_transport_is_asked(tmp_path, connections):
    record = tmp_path / "attempts.jsonl"
    sandbox = MediaSandbox(str(record), {"localhost": ("127.0.0.1",), "metadata.google.internal": ("169.254.169.254",)})
    fetch = sandbox.fetcher(("localhost", "metadata.google.internal", "10.0.0.1"), 1000, 5)
    for url in ("http://localhost/a.png", "http://metadata.google.internal/", "http://10.0.0.1/"):
        with pytest.raises(RequestError, match="non-public address"):
            fetch(url)
    assert read_attempts(record) == [] and connections == []
