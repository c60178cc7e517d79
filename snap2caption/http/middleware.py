"""Pure ASGI middleware: request id, access log, HTTP metrics, the body's size and pace, clients that
leave, and the last-resort 500.

A pure ASGI class (not ``BaseHTTPMiddleware``) so each request costs a few function calls and the
request id context variable is set in the same task that runs the route.

The body is watched while the app reads it (:class:`_Exchange`):

- past ``max_body_bytes``: 413 ``payload_too_large`` (from ``Content-Length`` up front, else while streaming);
- slower than :class:`BodyPace` allows: 408 ``request_timeout``, so a client trickling an upload cannot hold
  a connection and a file descriptor for as long as it likes;
- both close the connection after the answer rather than read the rest of the body.

A client that goes away before its answer is complete (mid-body, or while the answer is being computed) is
status 499 ("client closed request", nginx's convention) in the metrics and the access log, counted by phase
in ``snap2caption_http_client_disconnects_total``; never a 500, never a traceback. Work still running for it
is cancelled: nobody is waiting for the answer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from snap2caption.errors import RequestTimeout
from snap2caption.http.errors import error_json
from snap2caption.http.metrics import (
    HTTP_CLIENT_DISCONNECTS,
    HTTP_DURATION,
    HTTP_IN_FLIGHT,
    HTTP_REQUESTS,
    HTTP_SLOW_BODIES,
)
from snap2caption.logs import request_id_var

logger = logging.getLogger("snap2caption.access")
error_logger = logging.getLogger("snap2caption.http")

REQUEST_ID_HEADER = "X-Request-ID"
CLIENT_CLOSED = 499  # the status label of requests whose client left before the answer was complete
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Probes and scrapes would drown the access log; they are logged at DEBUG.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# How long a slow or departed client took says nothing about the service's latency.
_UNTIMED_STATUSES = frozenset({408, CLIENT_CLOSED})
UNMATCHED_ROUTE = "<unmatched>"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the cap; the handlers turn it into a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds {limit} bytes")


class BodyTooSlow(HTTPException):
    """Raised from ``receive`` when a body arrives slower than its :class:`BodyPace`; the handlers turn it
    into a 408 ``request_timeout``. An ``HTTPException`` (as :class:`BodyTooLarge`), because FastAPI turns
    any other error raised while it parses a declared body into a 400."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=RequestTimeout.status, detail=message)


@dataclass(frozen=True)
class BodyPace:
    """How slowly a request body may arrive before it is cut with 408 ``request_timeout``.

    Apache mod_reqtimeout's rule (``body=grace,MinRate=rate``): counted from when the request's headers
    arrived, the body may take ``grace_s`` plus one second per ``min_bytes_per_s`` bytes received so far, and
    never more than ``max_time_s`` in all. A byte a second is cut soon after the grace period; an upload at
    any real network's pace never is.

    Attributes:
        min_bytes_per_s: Slowest acceptable average rate once the grace period is over.
        grace_s: Time allowed before the first bytes count (slow starts, TLS, a busy client).
        max_time_s: Longest a whole body may take, however fast it is still arriving.
    """

    min_bytes_per_s: float
    grace_s: float
    max_time_s: float

    def __post_init__(self) -> None:
        if self.min_bytes_per_s <= 0 or self.grace_s < 0 or self.max_time_s <= 0:
            raise ValueError(f"need min_bytes_per_s > 0, grace_s >= 0, max_time_s > 0: {self}")

    def deadline(self, started: float, received: int) -> tuple[float, str]:
        """When more of the body must have arrived by (``time.monotonic()``), and which rule says so.

        Args:
            started: When the request's headers arrived (``time.monotonic()``).
            received: Body bytes received so far.

        Returns:
            ``(deadline, reason)`` with reason ``min_rate`` or ``max_time`` (the metric's label).
        """
        by_rate = started + self.grace_s + received / self.min_bytes_per_s
        by_total = started + self.max_time_s
        return (by_rate, "min_rate") if by_rate < by_total else (by_total, "max_time")


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


def pick_request_id(incoming: str | None) -> str:
    """Keep a client's ``X-Request-ID`` when it is short and plain ASCII, else make a new one."""
    if incoming and _SANE_REQUEST_ID.match(incoming):
        return incoming
    return new_request_id()


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/jobs/{job_id}``), which bounds metric cardinality.

    FastAPI records its own routes in ``scope["route"]``; plain Starlette routes it adds (``/docs``,
    ``/openapi.json``) are found by their literal path. Anything else is ``<unmatched>``.
    """
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    raw = scope.get("path")
    if any(getattr(route, "path", None) == raw for route in getattr(scope.get("app"), "routes", ())):
        return str(raw)
    return UNMATCHED_ROUTE


class _Exchange:
    """One request as the middleware sees it: the body read so far, whether the answer is complete, and
    whether the client is still there.

    Args:
        receive: The server's ``receive``.
        started: When the request's headers arrived (``time.monotonic()``).
        cap: Body byte cap, or ``None``.
        pace: Body pace, or ``None`` to wait for the body as long as the client takes.
    """

    def __init__(self, receive: Receive, started: float, cap: int | None, pace: BodyPace | None) -> None:
        self._receive = receive
        self.started = started
        self.cap = cap
        self.pace = pace
        self.received = 0
        self.body_complete = False
        self.response_complete = False
        self.close_connection = False  # answer, then close rather than read the rest of the body
        self.cut: str | None = None  # why the body was cut with 408 (`min_rate`, `max_time`)
        self.gone: str | None = None  # the phase the client left in (`upload`, `processing`)
        self.on_gone: Callable[[], None] = lambda: None
        self._watcher: asyncio.Task[None] | None = None

    async def receive(self) -> Message:
        """The app's ``receive``: the server's, with the cap and the pace enforced."""
        if self.body_complete or self.pace is None:
            message = await self._receive()
        else:
            message = await self._receive_paced(self.pace)
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.cap is not None and self.received > self.cap:
                self.close_connection = True
                raise BodyTooLarge(self.cap)
            if not message.get("more_body", False) and not self.body_complete:
                self.body_complete = True
                # From here on the server's receive only ever says "disconnected": listen for it, so that
                # work for a client that has left stops instead of running to an answer nobody reads.
                self._watcher = asyncio.create_task(self._watch())
        elif message["type"] == "http.disconnect":
            self._left()
        return message

    async def _receive_paced(self, pace: BodyPace) -> Message:
        deadline, reason = pace.deadline(self.started, self.received)
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            return await self._receive()
        self.cut = reason
        self.close_connection = True
        elapsed = time.monotonic() - self.started
        raise BodyTooSlow(
            f"request body too slow: {self.received} bytes in {elapsed:.1f} s (allowed: "
            f"{pace.grace_s:g} s plus 1 s per {pace.min_bytes_per_s:g} bytes, at most {pace.max_time_s:g} s)"
        )

    async def _watch(self) -> None:
        if (await self._receive())["type"] == "http.disconnect":
            self._left()

    def _left(self) -> None:
        # The server also says "disconnected" once the response is complete; that is no departure.
        if self.response_complete or self.gone is not None:
            return
        self.gone = "processing" if self.body_complete else "upload"
        self.on_gone()

    def close(self) -> None:
        """Stop listening for a disconnect (the exchange is over)."""
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()


class RequestContextMiddleware:
    """Per request: set the request id, time it, count it, log it, and never leak a traceback.

    Args:
        app: The wrapped ASGI app.
        service: Service name, the ``service`` label of the HTTP metrics.
        max_body_bytes: Refuse request bodies larger than this with 413 ``payload_too_large``
            (checked from ``Content-Length`` up front and while streaming); ``None`` for no cap.
        body_pace: Cut bodies arriving slower than this with 408 ``request_timeout``; ``None`` for no limit.
        track: The ``track`` label of the HTTP metrics (``production``, or ``canary`` for a service serving
            a model's canary). A route that knows better for its request (the gateway, which sends a share of
            requests to canaries) sets ``request.state.track``, and that wins, on error answers too.
    """

    def __init__(
        self,
        app: ASGIApp,
        service: str,
        max_body_bytes: int | None = None,
        body_pace: BodyPace | None = None,
        track: str = "production",
    ) -> None:
        self.app = app
        self.service = service
        self.track = track
        self.max_body_bytes = max_body_bytes
        self.body_pace = body_pace
        self._in_flight = HTTP_IN_FLIGHT.labels(service)
        # Every series exists from the start (at 0), so rate() sees it before the first event.
        self._disconnects = {p: HTTP_CLIENT_DISCONNECTS.labels(service, p) for p in ("upload", "processing")}
        self._slow_bodies = {r: HTTP_SLOW_BODIES.labels(service, r) for r in ("min_rate", "max_time")}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = Headers(scope=scope)
        request_id = pick_request_id(headers.get(REQUEST_ID_HEADER))
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        exchange = _Exchange(receive, time.monotonic(), self.max_body_bytes, self.body_pace)
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                response_headers = MutableHeaders(scope=message)
                response_headers[REQUEST_ID_HEADER] = request_id
                if exchange.close_connection:
                    response_headers["connection"] = "close"
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                exchange.response_complete = True
            await send(message)

        self._in_flight.inc()
        try:
            cap = self.max_body_bytes
            if cap is not None and _content_length(headers) > cap:
                exchange.close_connection = True
                await error_json(413, "payload_too_large", f"request body exceeds {cap} bytes")(
                    scope, receive, send_with_id
                )
            else:
                with anyio.CancelScope() as cancel_scope:
                    exchange.on_gone = cancel_scope.cancel
                    await self.app(scope, exchange.receive, send_with_id)
        except Exception:
            if exchange.gone is None:  # a client that left explains whatever the app raised after
                error_logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
                if response_started:
                    raise  # Nothing sane can be sent any more; the server drops the connection.
                await error_json(500, "internal_error", "internal server error; quote the request id")(
                    scope, receive, send_with_id
                )
        finally:
            exchange.close()
            self._in_flight.dec()
            if exchange.gone is not None:
                status = CLIENT_CLOSED
                self._disconnects[exchange.gone].inc()
            if exchange.cut is not None:
                self._slow_bodies[exchange.cut].inc()
            elapsed = time.perf_counter() - start
            route = route_template(scope)
            method = scope["method"]
            track = str(scope["state"].get("track") or self.track)
            HTTP_REQUESTS.labels(self.service, route, method, str(status), track).inc()
            if status not in _UNTIMED_STATUSES:
                HTTP_DURATION.labels(self.service, route, method, track).observe(elapsed)
            level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
            logger.log(
                level,
                "method=%s path=%s route=%s status=%d duration_ms=%.1f%s",
                method,
                scope["path"],
                route,
                status,
                elapsed * 1000,
                f" client_left={exchange.gone}" if exchange.gone else "",
            )
            request_id_var.reset(token)


def _content_length(headers: Headers) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0
