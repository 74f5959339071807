"""Remote image URLs: allow-list, public addresses only (pinned), size cap, redirects re-checked."""

import httpx
import pytest

from trimodal.inference.media_fetch import MediaFetcher, check_public, host_allowed, parse_domains
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
