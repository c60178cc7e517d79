"""SSRF-safe URL fetch against real loopback HTTP servers that record every connection they accept."""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import pytest
from PIL import Image

from snap2caption.errors import PayloadTooLarge, UrlFetchFailed, UrlNotAllowed
from snap2caption.net.fetch import FetchPolicy, address_block_reason, fetch_url
from tests.helpers import wait_for


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class _Handler(BaseHTTPRequestHandler):
    server: _RecordingServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Host", "")))
        path, _, query = self.path.partition("?")
        if path == "/img":
            self._send(200, PNG, "image/png")
        elif path == "/redirect":  # /redirect?<absolute or relative location>
            self._redirect(query)
        elif path.startswith("/chain/"):  # /chain/N redirects N more times, then serves the image
            left = int(path.rsplit("/", 1)[1])
            if left == 0:
                self._send(200, PNG, "image/png")
            else:
                self._redirect(f"/chain/{left - 1}")
        elif path == "/big-declared":
            self._send(200, b"x" * 5000, "image/png")
        elif path == "/big-streamed":  # no Content-Length: the reader must stop at the cap by itself
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.close_connection = True
            try:
                chunk = b"y" * 65536
                for _ in range(1024):  # 64 MB: far more than loopback socket buffers can absorb
                    self.wfile.write(chunk)
            except OSError:
                self.server.stream_aborted.set()
        elif path == "/missing":
            self._send(404, b"not here", "text/plain")
        else:
            self._send(500, b"?", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _RecordingServer(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that records every accepted connection."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.accepted: list[tuple[str, int]] = []
        self.requests: list[tuple[str, str]] = []
        self.stream_aborted = threading.Event()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        self.accepted.append(addr)
        return sock, addr

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture()
def servers() -> Iterator[list[_RecordingServer]]:
    """Two recording servers (the second plays the internal target a redirect points at)."""
    started = [_RecordingServer(), _RecordingServer()]
    threads = [threading.Thread(target=s.serve_forever, args=(0.02,), daemon=True) for s in started]
    for t in threads:
        t.start()
    yield started
    for s in started:
        s.shutdown()
        s.server_close()


@pytest.fixture()
def silent_listener() -> Iterator[tuple[int, list[socket.socket]]]:
    """Accepts connections and never answers (for the read timeout)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                held.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(sock.getsockname()[1]), held
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    sock.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


STRICT = FetchPolicy(max_bytes=1_000_000, connect_timeout_s=2.0, read_timeout_s=2.0)
LOOPBACK_OK = FetchPolicy(
    max_bytes=1_000_000, connect_timeout_s=2.0, read_timeout_s=2.0, allow_private_hosts=True
)

# A real public address (example.com's); nothing ever connects to it: the test backend below stands in
# for the internet and dials the loopback server instead.
PUBLIC_IP = "93.184.215.14"


class _FakeInternet(httpcore.AsyncNetworkBackend):
    """Test double for the route to the internet (which this machine has not): dials ``PUBLIC_IP`` on
    the loopback test server, refuses every other address, and records what it was asked for."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.asked: list[tuple[str, int]] = []
        self._real = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.asked.append((host, port))
        if host != PUBLIC_IP:
            raise httpcore.ConnectError(f"test internet only routes {PUBLIC_IP}")
        return await self._real.connect_tcp("127.0.0.1", self.port, timeout=timeout)

    async def sleep(self, seconds: float) -> None:
        await self._real.sleep(seconds)


class _Resolver:
    """Maps host names to fixed answers (a sequence per name: one answer per call) and counts calls."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        queue = self.answers[host]
        return queue.pop(0) if len(queue) > 1 else queue[0]


# --- the happy path -----------------------------------------------------------------------------------


def test_fetches_an_image_from_loopback_when_private_hosts_are_allowed(
    servers: list[_RecordingServer],
) -> None:
    url = f"http://127.0.0.1:{servers[0].port}/img"
    got = run(fetch_url(url, LOOPBACK_OK))
    assert got.content == PNG
    assert got.content_type == "image/png"
    assert got.final_url == url
    assert servers[0].requests == [("/img", f"127.0.0.1:{servers[0].port}")]


def test_public_host_is_pinned_to_the_checked_address_and_keeps_its_host_header(
    servers: list[_RecordingServer],
) -> None:
    internet = _FakeInternet(servers[0].port)
    # DNS rebinding: the first lookup says public, any later one would say loopback.
    resolver = _Resolver({"images.example": [[PUBLIC_IP], ["127.0.0.1"]]})
    got = run(
        fetch_url(
            f"http://images.example:{servers[0].port}/img",
            STRICT,
            resolver=resolver,
            network_backend=internet,
        )
    )
    assert got.content == PNG
    assert resolver.calls == ["images.example"]  # resolved once, never again for the connection
    assert internet.asked == [(PUBLIC_IP, servers[0].port)]  # dialled the checked address
    assert servers[0].requests == [("/img", f"images.example:{servers[0].port}")]


def test_follows_up_to_max_redirects(servers: list[_RecordingServer]) -> None:
    url = f"http://127.0.0.1:{servers[0].port}/chain/3"
    got = run(fetch_url(url, LOOPBACK_OK))
    assert got.content == PNG
    assert got.final_url.endswith("/chain/0")


# --- refusals before any connection -------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
        "2130706433",  # decimal 127.0.0.1
        "0x7f.1",  # hex shorthand
        "0177.0.0.1",  # octal
        "127.1",
    ],
)
def test_loopback_in_any_spelling_is_refused_without_a_connection(
    servers: list[_RecordingServer], host: str
) -> None:
    with pytest.raises(UrlNotAllowed):
        run(fetch_url(f"http://{host}:{servers[0].port}/img", STRICT))
    assert servers[0].accepted == []


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "100.64.0.1",
        "[fd00:ec2::254]",
        "[fe80::1]",
    ],
)
def test_internal_addresses_are_refused(host: str) -> None:
    internet = _FakeInternet(1)
    with pytest.raises(UrlNotAllowed):
        run(fetch_url(f"http://{host}/latest/meta-data/", STRICT, network_backend=internet))
    assert internet.asked == []


def test_a_host_with_one_bad_address_among_good_ones_is_refused() -> None:
    internet = _FakeInternet(1)
    resolver = _Resolver({"mixed.example": [[PUBLIC_IP, "10.1.2.3"]]})
    with pytest.raises(UrlNotAllowed, match="private"):
        run(fetch_url("http://mixed.example/img", STRICT, resolver=resolver, network_backend=internet))
    assert internet.asked == []


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/_x",
        "ftp://example.com/a.png",
        "http://user@{host}/img",
        "http://user:pw@{host}/img",
        "http://@{host}/img",
        "http://images.example\\@{host}/img",
        "http:///img",
        "http://exa mple.com/img",
        "//{host}/img",
    ],
)
def test_refused_urls(servers: list[_RecordingServer], url: str) -> None:
    # Even with private hosts allowed, scheme and userinfo tricks are refused.
    with pytest.raises(UrlNotAllowed):
        run(fetch_url(url.format(host=f"127.0.0.1:{servers[0].port}"), LOOPBACK_OK))
    assert servers[0].accepted == []


def test_redirect_from_a_public_host_to_loopback_is_refused_without_connecting(
    servers: list[_RecordingServer],
) -> None:
    public, internal = servers
    internet = _FakeInternet(public.port)
    resolver = _Resolver({"images.example": [[PUBLIC_IP]]})
    url = f"http://images.example:{public.port}/redirect?http://127.0.0.1:{internal.port}/img"
    with pytest.raises(UrlNotAllowed, match="loopback"):
        run(fetch_url(url, STRICT, resolver=resolver, network_backend=internet))
    assert len(public.accepted) == 1  # the first hop really happened
    assert internal.accepted == []  # the second never did
    assert internet.asked == [(PUBLIC_IP, public.port)]


def test_redirect_to_a_host_that_resolves_private_is_refused(servers: list[_RecordingServer]) -> None:
    public, _ = servers
    internet = _FakeInternet(public.port)
    resolver = _Resolver({"images.example": [[PUBLIC_IP]], "internal.example": [["192.168.0.10"]]})
    url = f"http://images.example:{public.port}/redirect?http://internal.example/x"
    with pytest.raises(UrlNotAllowed, match="private"):
        run(fetch_url(url, STRICT, resolver=resolver, network_backend=internet))
    assert resolver.calls == ["images.example", "internal.example"]
    assert internet.asked == [(PUBLIC_IP, public.port)]


def test_redirect_to_another_scheme_is_refused(servers: list[_RecordingServer]) -> None:
    url = f"http://127.0.0.1:{servers[0].port}/redirect?file:///etc/passwd"
    with pytest.raises(UrlNotAllowed, match="scheme"):
        run(fetch_url(url, LOOPBACK_OK))


def test_more_than_max_redirects_is_refused(servers: list[_RecordingServer]) -> None:
    with pytest.raises(UrlNotAllowed, match="redirects"):
        run(fetch_url(f"http://127.0.0.1:{servers[0].port}/chain/4", LOOPBACK_OK))
    assert len(servers[0].requests) == 4  # the first request and three redirects, never a fifth


# --- failures ------------------------------------------------------------------------------------------


def test_dns_failure_is_a_fetch_failure() -> None:
    with pytest.raises(UrlFetchFailed, match="DNS"):
        run(fetch_url("http://nowhere.example/img", STRICT, resolver=_Resolver({})))


def test_non_2xx_is_a_fetch_failure(servers: list[_RecordingServer]) -> None:
    with pytest.raises(UrlFetchFailed, match="404"):
        run(fetch_url(f"http://127.0.0.1:{servers[0].port}/missing", LOOPBACK_OK))


def test_connection_refused_is_a_fetch_failure() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UrlFetchFailed):
        run(fetch_url(f"http://127.0.0.1:{port}/img", LOOPBACK_OK))


def test_read_timeout_on_a_server_that_never_answers(
    silent_listener: tuple[int, list[socket.socket]],
) -> None:
    port, held = silent_listener
    policy = FetchPolicy(max_bytes=1000, connect_timeout_s=1.0, read_timeout_s=0.5, allow_private_hosts=True)
    started = time.monotonic()
    with pytest.raises(UrlFetchFailed, match="timed out"):
        run(fetch_url(f"http://127.0.0.1:{port}/img", policy))
    # The listener never answers, so without the read timeout this would hang; the slack over 0.5 s is
    # for a machine whose cores other processes keep busy.
    assert time.monotonic() - started < 10
    wait_for(lambda: held, 5, "the listener to accept the connection")  # its thread polls every 0.1 s
    assert len(held) == 1


def test_declared_length_over_the_cap_is_refused_before_reading(servers: list[_RecordingServer]) -> None:
    policy = FetchPolicy(max_bytes=4096, allow_private_hosts=True)
    with pytest.raises(PayloadTooLarge, match="5000"):
        run(fetch_url(f"http://127.0.0.1:{servers[0].port}/big-declared", policy))


def test_undeclared_body_stops_at_the_cap(servers: list[_RecordingServer]) -> None:
    policy = FetchPolicy(max_bytes=10_000, allow_private_hosts=True)
    with pytest.raises(PayloadTooLarge, match="10000"):
        run(fetch_url(f"http://127.0.0.1:{servers[0].port}/big-streamed", policy))
    # We hung up long before the server's 64 MB: its writes fail on the closed connection.
    assert servers[0].stream_aborted.wait(10)


# --- the address classifier ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.1",
        "0.0.0.0",
        "10.1.2.3",
        "172.31.0.1",
        "192.168.0.1",
        "100.64.0.1",
        "169.254.169.254",
        "224.0.0.1",
        "239.1.2.3",
        "255.255.255.255",
        "240.0.0.1",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:0:7f00:1",  # IPv4-translated
        "::127.0.0.1",  # IPv4-compatible
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b:1::1",  # local-use NAT64
        "fd00:ec2::254",
        "fc00::1",
        "fe80::1",
        "ff02::1",
        "2001::1",  # Teredo
        "2001:db8::1",
    ],
)
def test_blocked_addresses(address: str) -> None:
    assert address_block_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address",
    ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:93.184.215.14", "64:ff9b::808:808"],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_block_reason(ipaddress.ip_address(address)) is None


# --- TLS: pinned to the checked address, yet SNI and the certificate check use the URL's host name ---------


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A throwaway certificate for ``name`` and its key, as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class _TlsServer(_RecordingServer):
    """The recording server behind TLS, noting the SNI name each client sent."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__()
        self.sni: list[str | None] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.context.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)  # type: ignore[assignment]

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        return self.context.wrap_socket(sock, server_side=True), addr


@pytest.mark.parametrize("cert_name", ["images.example", "someone-else.example"])
def test_https_keeps_the_host_name_for_sni_and_certificate_checks(tmp_path: Path, cert_name: str) -> None:
    cert, key = _self_signed(tmp_path, cert_name)
    server = _TlsServer(cert, key)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        internet = _FakeInternet(server.port)
        resolver = _Resolver({"images.example": [[PUBLIC_IP]]})
        trust = ssl.create_default_context(cafile=str(cert))
        url = f"https://images.example:{server.port}/img"
        fetch = fetch_url(url, STRICT, resolver=resolver, network_backend=internet, ssl_context=trust)
        if cert_name == "images.example":
            assert run(fetch).content == PNG
            assert server.requests == [("/img", f"images.example:{server.port}")]
        else:  # the pinned IP does not stand in for the name: a certificate for another name is refused
            with pytest.raises(UrlFetchFailed):
                run(fetch)
            assert server.requests == []
        assert server.sni == ["images.example"]
        assert internet.asked == [(PUBLIC_IP, server.port)]
    finally:
        server.shutdown()
        server.server_close()
