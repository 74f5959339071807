"""Fetching remote image URLs safely: an allow-list of hosts, public addresses only, a size cap and a timeout.

Remote URLs are refused unless their host is on the allow-list (an exact host, or `*.example.com` for its
subdomains). The host is resolved once; every address must be public (no loopback, private, link-local,
multicast or reserved ranges), and the connection goes to that vetted address (TLS still verifies the host
name through SNI), so a DNS answer cannot change between the check and the fetch. Redirects are followed by
hand, each hop checked the same way.

`MediaSandbox` is the setting tests and drills give a server whose allow-list names private hosts on purpose: host
names are answered from a table (no DNS query), and connections go through `LoopbackOnlyTransport`, which appends
every attempt to a file and opens none to an address outside 127.0.0.0/8 and ::1. Even if the public-address check
regressed, such a server would send packets to loopback only, and the file shows the attempt.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence
from urllib.parse import urlsplit

import httpx

from trimodal.inference.messages import RequestError

Resolver = Callable[[str, int], list[str]]
MAX_REDIRECTS = 3


def parse_domains(text: str | None) -> tuple[str, ...]:
    """'a.com, *.b.org' -> ('a.com', '*.b.org'), lower-cased, blanks dropped."""
    return tuple(d.strip().lower().rstrip(".") for d in (text or "").split(",") if d.strip())


def host_allowed(host: str, domains: Sequence[str]) -> bool:
    """Exact match, or a subdomain of an entry written `*.domain`."""
    host = host.lower().rstrip(".")
    for domain in domains:
        if domain.startswith("*."):
            if host.endswith(domain[1:]) and host != domain[2:]:
                return True
        elif host == domain:
            return True
    return False


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RequestError(f"image URL host {host!r} does not resolve ({exc})", "image_url")
    return sorted({info[4][0] for info in infos})


def check_public(address: str, host: str) -> str:
    """`address` if it is a public unicast address, else a RequestError naming the host."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast:
        raise RequestError(f"image URL host {host!r} resolves to a non-public address ({ip}); refused", "image_url")
    return str(ip)


class MediaFetcher:
    """Callable `url -> bytes` for `messages.parse_messages(fetch_url=...)`."""

    def __init__(self, allowed_domains: Sequence[str], max_bytes: int, timeout_s: float = 10.0,
                 resolve: Resolver = system_resolver, transport: httpx.BaseTransport | None = None):
        self.allowed_domains = tuple(allowed_domains)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.resolve = resolve
        self.transport = transport

    def __call__(self, url: str) -> bytes:
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False, transport=self.transport,
                          trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                response_or_next = self._get(client, url)
                if isinstance(response_or_next, bytes):
                    return response_or_next
                url = response_or_next
        raise RequestError(f"image URL redirected more than {MAX_REDIRECTS} times", "image_url")

    def _vet(self, url: str) -> tuple[httpx.URL, str, str]:
        """(URL pointing at the vetted address, host, address) or RequestError."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestError("image URLs must be http(s)://host/... or data: URLs", "image_url")
        if parts.username or parts.password:
            raise RequestError("image URLs must not carry credentials", "image_url")
        host = parts.hostname
        if not host_allowed(host, self.allowed_domains):
            raise RequestError(f"image URL host {host!r} is not in the allowed media domains", "image_url")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = [check_public(a, host) for a in self.resolve(host, port)]
        if not addresses:
            raise RequestError(f"image URL host {host!r} does not resolve", "image_url")
        pinned = httpx.URL(url).copy_with(host=addresses[0])
        return pinned, host, addresses[0]

    def _get(self, client: httpx.Client, url: str) -> bytes | str:
        """The body of `url`, or the next URL when it redirects."""
        pinned, host, _ = self._vet(url)
        original = httpx.URL(url)
        headers = {"Host": original.netloc.decode("ascii"), "Accept": "image/*"}
        extensions = {"sni_hostname": host} if original.scheme == "https" else {}
        try:
            with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                if response.is_redirect and "location" in response.headers:
                    return str(original.join(response.headers["location"]))
                if response.status_code != 200:
                    raise RequestError(f"image URL answered HTTP {response.status_code}", "image_url")
                return self._read_capped(response)
        except httpx.HTTPError as exc:
            raise RequestError(f"image URL could not be fetched ({type(exc).__name__}: {exc})", "image_url")

    def _read_capped(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise RequestError(f"image URL body is {declared} bytes, over the limit of {self.max_bytes}",
                               "image_url")
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > self.max_bytes:
                raise RequestError(f"image URL body is over the limit of {self.max_bytes} bytes", "image_url")
        return bytes(data)


def ip_literal(host: str) -> str | None:
    """The address a literal host names ('::1', '127.0.0.1', and inet_aton's '2130706433' or '0x7f000001'), else None.

    Parsing only: nothing is looked up.
    """
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%")[0]))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def is_loopback(host: str) -> bool:
    """True for a literal loopback address (127.0.0.0/8, ::1, ::ffff:127.x); a host name is never loopback here."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def table_resolver(table: Mapping[str, Sequence[str]]) -> Resolver:
    """A resolver that answers from `table` (host -> addresses) and from literal addresses; never from DNS."""
    known = {host.lower().rstrip("."): list(addresses) for host, addresses in table.items()}

    def resolve(host: str, port: int) -> list[str]:
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        name = host.lower().rstrip(".")
        if name not in known:
            raise RequestError(f"image URL host {host!r} does not resolve (not in the resolver table)", "image_url")
        return known[name]

    return resolve


class LoopbackOnlyTransport(httpx.BaseTransport):
    """An httpx transport that appends every request it is asked to send to `record` (one JSON line each:
    host, port, url, allowed) and connects only to literal loopback addresses; anything else is a ConnectError
    before a socket is opened.

    One pooled transport serves every fetch of a MediaFetcher, so a client closing it does not close the pool.
    """

    def __init__(self, record: str | Path):
        self.record = Path(record)
        self._inner = httpx.HTTPTransport()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        allowed = is_loopback(host)
        line = {"host": host, "port": request.url.port, "url": str(request.url), "allowed": allowed}
        with self._lock, self.record.open("a") as out:
            out.write(json.dumps(line) + "\n")
        if not allowed:
            raise httpx.ConnectError(f"the loopback-only media transport refused to connect to {host}",
                                     request=request)
        return self._inner.handle_request(request)

    def close(self) -> None:
        """Kept open for the next fetch (see the class docstring)."""


def read_attempts(record: str | Path) -> list[dict]:
    """The attempts a LoopbackOnlyTransport recorded (none when the file does not exist)."""
    path = Path(record)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class MediaSandbox:
    """A server setting for tests and drills: resolve image hosts from `hosts` (no DNS) and fetch through a
    LoopbackOnlyTransport that records every attempt in the file `record`."""

    record: str
    """JSON-lines file every fetch attempt is appended to (see `read_attempts`)."""
    hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Host name -> addresses; literal addresses need no entry, any other host does not resolve."""

    def fetcher(self, allowed_domains: Sequence[str], max_bytes: int, timeout_s: float) -> MediaFetcher:
        """A MediaFetcher that resolves from the table and connects through the recording transport."""
        return MediaFetcher(allowed_domains, max_bytes, timeout_s, resolve=table_resolver(self.hosts),
                            transport=LoopbackOnlyTransport(self.record))
