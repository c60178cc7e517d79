"""Slow and departing clients, over raw sockets against a real gateway process (scripted backends behind it,
``fake_backend``).

- An upload that trickles is cut with 408 ``request_timeout`` (the envelope, then the connection closed)
  and counted; so is one that keeps coming at a fair pace for longer than the total allowed; a normal
  upload, even one that pauses within the grace period, is not.
- A client that leaves mid-body, or while a backend works on its image, is status 499 and counted in
  ``snap2caption_http_client_disconnects_total``, never a 5xx and never a logged traceback; the backend
  call for it is cancelled.

The gateway allows a body 1 s plus 1 s per 1,000 bytes, at most 4 s. Time bounds are generous (a cut
expected at about 1 s or 4 s must come within 10 or 12 s) and one-sided where the rule makes a lower
bound exact (nothing is cut before its allowance).
"""

from __future__ import annotations

import re
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway_stack import metric, noise_png, post_analyze
from tests.helpers import ServiceProcess, image_bytes, wait_for
from tests.services.gateway.fake_backend import Fakes, fakes, healthy  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

PACE = {"body_min_bytes_per_s": "1000", "body_grace_s": "1", "body_max_time_s": "4"}
BOUNDARY = "s2cboundary"
MULTIPART_HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
    "Content-Type: image/png\r\n\r\n"
).encode()


@pytest.fixture(scope="module")
def gateway(fakes: Fakes) -> Iterator[ServiceProcess]:  # noqa: F811
    service = fakes.gateway(**PACE)
    yield service
    service.stop(timeout_s=10)


# ------------------------------------------------------------------------------------------ raw HTTP


def open_request(
    service: ServiceProcess,
    content_length: int,
    content_type: str = "application/octet-stream",
    path: str = "/v1/analyze",
) -> socket.socket:
    """A connection that has sent a POST's headers and no body yet."""
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=15)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    )
    sock.sendall(head.encode())
    return sock


def trickle(
    sock: socket.socket, chunk: bytes, every_s: float, started: float, give_up_s: float = 20
) -> float:
    """Send ``chunk`` every ``every_s`` until the server answers; return the seconds since ``started``
    (taken before the headers went out, so never after the server's own start).

    The socket is polled before each send, so nothing is sent once the answer is there.
    """
    while time.monotonic() - started < give_up_s:
        readable, _, _ = select.select([sock], [], [], every_s)
        if readable:
            return time.monotonic() - started
        sock.sendall(chunk)
    raise AssertionError(f"the server let a trickling upload run for {give_up_s} s")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers, body)`` of one response."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"the connection closed without a full response: {data!r}"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (n.partition(":") for n in lines[1:])
    }
    while len(body) < int(headers["content-length"]):
        part = sock.recv(65536)
        assert part, f"the connection closed mid-body: {body!r}"
        body += part
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (waits up to 5 s for it to)."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# ------------------------------------------------------------------------------------------ metrics


def counter(service: ServiceProcess, name: str, **labels: str) -> float:
    return metric(service.url, name, service="gateway", **labels) or 0.0


def server_errors(service: ServiceProcess) -> dict[str, float]:
    """Every 5xx the gateway counted on /v1/analyze, by status."""
    text = httpx.get(f"{service.url}/metrics", timeout=5).text
    found = re.findall(r"snap2caption_http_requests_total\{([^}]*)\} (\S+)", text)
    return {
        labels: float(value)
        for labels, value in found
        if 'route="/v1/analyze"' in labels and re.search(r'status="5\d\d"', labels) and float(value) > 0
    }


def assert_no_traceback(service: ServiceProcess) -> None:
    log = service.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


# ------------------------------------------------------------------------------------------ slow bodies


def test_a_trickling_upload_is_cut_with_408_and_counted(gateway: ServiceProcess) -> None:
    before = counter(gateway, "snap2caption_http_slow_bodies_total", reason="min_rate")
    timed = counter(gateway, "snap2caption_http_request_duration_seconds_count", route="/v1/analyze")
    started = time.monotonic()
    with open_request(gateway, content_length=1_000_000) as sock:
        elapsed = trickle(sock, b"x", every_s=0.3, started=started)  # 3 bytes/s against 1,000 bytes/s
        status, headers, body = read_response(sock)
        closed = closed_by_server(sock)
    assert status == 408, body
    assert 1.0 <= elapsed < 10  # cut soon after the 1 s grace period
    error = httpx.Response(status, content=body).json()["error"]
    assert error["code"] == "request_timeout" and "too slow" in error["message"]
    assert error["request_id"] == headers["x-request-id"]
    assert headers["connection"] == "close" and closed  # the connection and its descriptor are let go
    assert counter(gateway, "snap2caption_http_slow_bodies_total", reason="min_rate") == before + 1
    assert counter(gateway, "snap2caption_http_requests_total", route="/v1/analyze", status="408") >= 1
    # A slow client's time is not the service's latency.
    assert counter(gateway, "snap2caption_http_request_duration_seconds_count", route="/v1/analyze") == timed


def test_an_upload_longer_than_the_total_time_is_cut(gateway: ServiceProcess) -> None:
    before = counter(gateway, "snap2caption_http_slow_bodies_total", reason="max_time")
    started = time.monotonic()
    with open_request(gateway, content_length=1_000_000) as sock:
        # 8,000 bytes/s: a fair pace, for too long
        elapsed = trickle(sock, b"x" * 2000, every_s=0.25, started=started)
        status, _, body = read_response(sock)
        assert status == 408 and closed_by_server(sock), body
    assert 4.0 <= elapsed < 12
    assert counter(gateway, "snap2caption_http_slow_bodies_total", reason="max_time") == before + 1


def test_a_normal_upload_is_unaffected(healthy: Fakes, gateway: ServiceProcess) -> None:  # noqa: F811
    image = noise_png(500, 400, seed=3)  # 600 kB: longer than the grace period's worth at the minimum rate
    assert post_analyze(gateway.url, image).status_code == 200
    # A pause inside the grace period is fine too.
    with open_request(gateway, content_length=len(image)) as sock:
        sock.sendall(image[:1000])
        time.sleep(0.5)
        sock.sendall(image[1000:])
        status, _, body = read_response(sock)
    assert status == 200, body


# ------------------------------------------------------------------------------------------ departures


@pytest.mark.parametrize("multipart", [False, True], ids=["raw", "multipart"])
def test_a_client_leaving_mid_body_is_499_not_500(gateway: ServiceProcess, multipart: bool) -> None:
    before = counter(gateway, "snap2caption_http_client_disconnects_total", phase="upload")
    closed_before = counter(gateway, "snap2caption_http_requests_total", route="/v1/analyze", status="499")
    content_type = f"multipart/form-data; boundary={BOUNDARY}" if multipart else "image/png"
    with open_request(gateway, content_length=100_000, content_type=content_type) as sock:
        sock.sendall((MULTIPART_HEAD if multipart else b"") + image_bytes("red")[:500])
        time.sleep(0.2)  # let the gateway start reading
    wait_for(
        lambda: counter(gateway, "snap2caption_http_client_disconnects_total", phase="upload") == before + 1,
        timeout_s=10,
        what="the departure to be counted",
    )
    assert counter(gateway, "snap2caption_http_requests_total", route="/v1/analyze", status="499") == (
        closed_before + 1
    )
    assert server_errors(gateway) == {}
    assert_no_traceback(gateway)


def test_a_client_leaving_while_the_backend_works_is_499_and_the_call_is_cancelled(
    healthy: Fakes,  # noqa: F811
    gateway: ServiceProcess,
) -> None:
    before = counter(gateway, "snap2caption_http_client_disconnects_total", phase="processing")
    cancelled = metric(
        gateway.url, "snap2caption_gateway_backend_requests_total", backend="captioner", outcome="cancelled"
    )
    healthy.captioner.behave(delay_s=30)
    image = image_bytes("red")
    with open_request(gateway, len(image), "image/png", path="/v1/analyze?features=caption") as sock:
        sock.sendall(image)
        wait_for(
            lambda: healthy.captioner.seen()["calls"].get("caption") == 1,
            timeout_s=10,
            what="the captioner to get the call",
        )
    # Counted as soon as the gateway notices, long before the captioner's 30 s are up.
    wait_for(
        lambda: (
            counter(gateway, "snap2caption_http_client_disconnects_total", phase="processing") == before + 1
        ),
        timeout_s=10,
        what="the departure to be counted",
    )
    now_cancelled = metric(
        gateway.url, "snap2caption_gateway_backend_requests_total", backend="captioner", outcome="cancelled"
    )
    assert now_cancelled == (cancelled or 0) + 1
    assert metric(gateway.url, "snap2caption_circuit_breaker_state", backend="captioner") == 0
    assert server_errors(gateway) == {}
    assert_no_traceback(gateway)
