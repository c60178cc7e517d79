"""Fetch an image by URL for a caller without letting the caller reach our own network (SSRF-safe).

Per hop (the first request and every redirect, followed by hand):

1. parse the URL and refuse anything but plain ``http``/``https`` with a host and no userinfo
   (``http://user@host``, backslashes, whitespace and control characters are refused outright);
2. resolve the host ourselves, once (``socket.getaddrinfo``, which also turns the decimal, octal and
   hex shorthand forms such as ``2130706433`` or ``0x7f.1`` into a real address), and check EVERY
   resolved address with :func:`address_block_reason` (loopback, private, link-local, CGNAT, multicast,
   reserved, cloud metadata, and the IPv4-mapped / compatible / 6to4 / NAT64 forms of those);
3. connect to a checked address only: the connection pool gets a network backend pinned to the
   checked addresses, so no second DNS lookup can swap in another one (DNS rebinding), while the
   request still carries the original ``Host`` header and TLS still uses the original name for SNI
   and certificate checks.

Refusals raise :class:`~snap2caption.errors.UrlNotAllowed` (400) before any connection is made;
network trouble, non-2xx answers and timeouts raise :class:`~snap2caption.errors.UrlFetchFailed` (422);
a body over the cap raises :class:`~snap2caption.errors.PayloadTooLarge` (413), refused from
``Content-Length`` when the server sends one, else as soon as the cap is passed while reading.
Whether the bytes are an image is for the decoder (magic bytes) to say, not the ``Content-Type``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore
import httpx

from snap2caption import __version__
from snap2caption.errors import PayloadTooLarge, UrlFetchFailed, UrlNotAllowed

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``async (host, port) -> [ip, ...]``: the addresses a host name resolves to, as strings."""

MAX_URL_CHARS = 4096
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchPolicy:
    """Limits of one URL fetch.

    Attributes:
        max_bytes: Largest body accepted; reading stops at the cap (413 ``payload_too_large``).
        connect_timeout_s: Per connection attempt (and for the DNS lookup).
        read_timeout_s: Per read of the response; the whole fetch, every hop included, must also finish
            within ``connect_timeout_s + read_timeout_s`` so a server trickling bytes cannot hold it.
        max_redirects: Redirects followed; one more is refused (400 ``url_not_allowed``).
        allow_private_hosts: Skip only the address-class check (for local development and tests that
            serve from loopback); scheme, userinfo, redirect and size checks still apply.
    """

    max_bytes: int
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    max_redirects: int = 3
    allow_private_hosts: bool = False

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError(f"max_bytes and timeouts must be positive, got {self}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")


@dataclass(frozen=True)
class FetchedImage:
    """What a fetch returns: the body, where it finally came from, and the server's content type."""

    content: bytes
    final_url: str
    content_type: str | None


# --- address classes ---------------------------------------------------------------------------------

_V4_BLOCKS = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT (shared)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignment"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes broadcast 255.255.255.255
    )
)
_V6_BLOCKS = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fd00:ec2::254/128", "cloud metadata"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo tunnel"),
        ("2001:db8::/32", "documentation"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
_V4_COMPAT = ipaddress.IPv6Network("::/96")
_V4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _v4_block_reason(ip: ipaddress.IPv4Address) -> str | None:
    for net, reason in _V4_BLOCKS:
        if ip in net:
            return reason
    # Catch-all for any special-purpose range the table misses (the stdlib keeps the IANA registry).
    return None if ip.is_global else "not globally routable"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address carries, and the form it uses, if any."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _V4_TRANSLATED:
        return "IPv4-translated", low32
    if ip in _NAT64:
        return "NAT64", low32
    if ip in _V4_COMPAT:
        return "IPv4-compatible", low32
    return None


def address_block_reason(ip: IPAddress) -> str | None:
    """Why a fetch must not connect to ``ip``, or ``None`` when it is a public unicast address.

    IPv6 forms that carry an IPv4 address (``::ffff:127.0.0.1``, ``::127.0.0.1``,
    ``2002:7f00:1::``, ``64:ff9b::7f00:1``) are judged by the IPv4 address inside.

    Args:
        ip: A resolved address.

    Returns:
        A short reason such as ``"loopback"``, or ``None`` when allowed.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_block_reason(ip)
    ip = ipaddress.IPv6Address(int(ip))  # drop any %scope, which breaks network membership tests
    for net, reason in _V6_BLOCKS:
        if ip in net:
            return reason
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        form, v4 = embedded
        if form == "IPv4-compatible":
            return "IPv4-compatible IPv6 (deprecated)"
        inner = _v4_block_reason(v4)
        return f"{inner} ({form} IPv6 form of {v4})" if inner else None
    return None if ip.is_global else "not globally routable"


# --- resolving and pinning --------------------------------------------------------------------------


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the operating system's resolver (``getaddrinfo``), in a worker thread.

    Returns:
        The distinct addresses, in the resolver's order.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that connects only to addresses checked in advance, never re-resolving.

    The pool asks to connect to the URL's host name; this backend dials the pinned addresses in
    order instead. TLS (``start_tls`` on the returned stream) still gets the original host name.
    """

    def __init__(self, host: str, addresses: Sequence[str], inner: httpcore.AsyncNetworkBackend) -> None:
        self._host = host
        self._addresses = list(addresses)
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if host != self._host:  # one pool per hop: it can only ever ask for the hop's own host
            raise httpcore.ConnectError(f"refusing to connect to unexpected host {host!r}")
        last: Exception = httpcore.ConnectError("no address to connect to")
        for address in self._addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are never used for URL fetches")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# --- the fetch ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str  # ASCII (IDNA) host, no brackets: what is resolved and sent in SNI
    port: int

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = _DEFAULT_PORTS[self.url.scheme]
        return host if self.port == default else f"{host}:{self.port}"


def _parse(url: str) -> _Target:
    """Refuse any URL that is not a plain ``http(s)://host[:port]/path`` (raises ``UrlNotAllowed``)."""
    if len(url) > MAX_URL_CHARS:
        raise UrlNotAllowed(f"URL longer than {MAX_URL_CHARS} characters")
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in url):
        # Parsers disagree on these (WHATWG treats "\" as "/"): refuse rather than guess.
        raise UrlNotAllowed("URL contains whitespace, control characters or a backslash")
    try:
        parsed = httpx.URL(url)
        authority = urlsplit(url).netloc
    except (httpx.InvalidURL, ValueError) as exc:
        raise UrlNotAllowed(f"malformed URL: {exc}") from None
    if parsed.scheme not in _DEFAULT_PORTS:
        raise UrlNotAllowed(f"URL scheme {parsed.scheme or '(none)'!r} not allowed; use http or https")
    if parsed.userinfo or "@" in authority:
        raise UrlNotAllowed("URLs with a user name or password are not allowed")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise UrlNotAllowed("URL has no host")
    return _Target(url=parsed, host=host, port=parsed.port or _DEFAULT_PORTS[parsed.scheme])


async def _resolve(target: _Target, policy: FetchPolicy, resolver: Resolver) -> list[str]:
    """Resolve the hop's host once and check every address (raises ``UrlNotAllowed``/``UrlFetchFailed``)."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None  # a name, or a shorthand such as 0x7f.1 that only getaddrinfo understands
    try:
        async with asyncio.timeout(policy.connect_timeout_s):
            addresses = (
                [str(literal)] if literal is not None else list(await resolver(target.host, target.port))
            )
    except TimeoutError:
        raise UrlFetchFailed(f"DNS lookup of {target.host} timed out") from None
    except (OSError, UnicodeError) as exc:
        raise UrlFetchFailed(f"DNS lookup of {target.host} failed: {exc}") from None
    if not addresses:
        raise UrlFetchFailed(f"DNS lookup of {target.host} returned no address")
    checked: list[str] = []
    for raw in addresses:
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            raise UrlFetchFailed(f"DNS lookup of {target.host} returned a non-address {raw!r}") from None
        if not policy.allow_private_hosts:
            reason = address_block_reason(ip)
            if reason is not None:
                logger.info("url refused: host=%s address=%s reason=%s", target.host, ip, reason)
                raise UrlNotAllowed(f"URL host {target.host} resolves to a {reason} address ({ip})")
        checked.append(str(ip))
    return checked


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


async def _get(
    target: _Target,
    addresses: list[str],
    policy: FetchPolicy,
    backend: httpcore.AsyncNetworkBackend,
    ssl_context: ssl.SSLContext,
) -> FetchedImage | httpx.URL:
    """One GET on a pinned connection: the image, or the URL a redirect points to."""
    request_url = httpcore.URL(
        scheme=target.url.scheme.encode(),
        host=target.host.encode(),
        port=target.port,
        target=target.url.raw_path,
    )
    headers = [
        (b"Host", target.host_header.encode()),
        (b"User-Agent", f"snap2caption/{__version__} (image fetch)".encode()),
        (b"Accept", b"image/*"),
        (b"Accept-Encoding", b"identity"),  # the body must be the image's own bytes, no decompression
        (b"Connection", b"close"),
    ]
    timeouts = {
        "connect": policy.connect_timeout_s,
        "read": policy.read_timeout_s,
        "write": policy.read_timeout_s,
        "pool": policy.connect_timeout_s,
    }
    pinned = _PinnedBackend(target.host, addresses, backend)
    async with (
        httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=1, retries=0, network_backend=pinned
        ) as pool,
        pool.stream(b"GET", request_url, headers=headers, extensions={"timeout": timeouts}) as response,
    ):
        status = response.status
        if status in _REDIRECTS:
            location = _header(response.headers, b"location")
            if not location:
                raise UrlFetchFailed(f"{target.url} answered {status} without a Location")
            try:
                return target.url.join(location)
            except (httpx.InvalidURL, ValueError) as exc:
                raise UrlNotAllowed(f"redirect to a malformed URL: {exc}") from None
        if not 200 <= status < 300:
            raise UrlFetchFailed(f"{target.url} answered HTTP {status}")
        length = _header(response.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > policy.max_bytes:
            raise PayloadTooLarge(f"URL body is {int(length)} bytes; the cap is {policy.max_bytes}")
        body = bytearray()
        async for chunk in response.aiter_stream():
            body += chunk
            if len(body) > policy.max_bytes:
                raise PayloadTooLarge(f"URL body exceeds the cap of {policy.max_bytes} bytes")
        content_type = _header(response.headers, b"content-type")
        return FetchedImage(content=bytes(body), final_url=str(target.url), content_type=content_type)


_NETWORK_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    ssl.SSLError,
    OSError,
)


async def fetch_url(
    url: str,
    policy: FetchPolicy,
    *,
    resolver: Resolver | None = None,
    network_backend: httpcore.AsyncNetworkBackend | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> FetchedImage:
    """Fetch ``url`` with every hop's address checked and pinned (see the module docstring).

    Args:
        url: ``http://`` or ``https://`` URL from the caller.
        policy: Size, time and redirect limits.
        resolver: Host name -> addresses; the system resolver by default. Tests inject one.
        network_backend: The httpcore backend the pinned connections dial through (anyio by
            default); it is only ever asked for already-checked addresses.
        ssl_context: TLS context for ``https`` (httpcore's default: certifi roots, hostname checks).

    Returns:
        The body, the final URL after redirects, and the server's ``Content-Type``.

    Raises:
        UrlNotAllowed: Refused URL, refused address on any hop, or more than ``max_redirects`` redirects.
        UrlFetchFailed: DNS failure, connect/read timeout, network error, non-2xx answer.
        PayloadTooLarge: Body (or its ``Content-Length``) over ``policy.max_bytes``.
    """
    resolve = resolver or system_resolver
    backend = network_backend or httpcore.AnyIOBackend()
    context = ssl_context or httpcore.default_ssl_context()
    target = _parse(url)
    try:
        async with asyncio.timeout(policy.connect_timeout_s + policy.read_timeout_s):
            for hop in range(policy.max_redirects + 1):
                addresses = await _resolve(target, policy, resolve)
                try:
                    answer = await _get(target, addresses, policy, backend, context)
                except httpcore.TimeoutException as exc:
                    raise UrlFetchFailed(f"fetching {target.url} timed out ({type(exc).__name__})") from None
                except _NETWORK_ERRORS as exc:
                    raise UrlFetchFailed(
                        f"fetching {target.url} failed: {exc or type(exc).__name__}"
                    ) from None
                if isinstance(answer, FetchedImage):
                    return answer
                logger.debug("url redirect: hop=%d from=%s to=%s", hop + 1, target.url, answer)
                target = _parse(str(answer))
    except TimeoutError:
        raise UrlFetchFailed(f"fetching {url} took longer than the time allowed") from None
    raise UrlNotAllowed(f"more than {policy.max_redirects} redirects")
