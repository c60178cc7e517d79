"""Pure ASGI middleware: request id, access log, HTTP metrics, body cap, and the last-resort 500.

A pure ASGI class (not ``BaseHTTPMiddleware``) so each request costs a few function calls and the
request id context variable is set in the same task that runs the route.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from snap2caption.logs import request_id_var
from snap2caption.service.errors import error_json
from snap2caption.service.metrics import HTTP_DURATION, HTTP_IN_FLIGHT, HTTP_REQUESTS

logger = logging.getLogger("snap2caption.access")
error_logger = logging.getLogger("snap2caption.service")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Probes and scrapes would drown the access log; they are logged at DEBUG.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
UNMATCHED_ROUTE = "<unmatched>"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the cap; the handlers turn it into a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds {limit} bytes")


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


class RequestContextMiddleware:
    """Per request: set the request id, time it, count it, log it, and never leak a traceback.

    Args:
        app: The wrapped ASGI app.
        service: Service name, the ``service`` label of the HTTP metrics.
        max_body_bytes: Refuse request bodies larger than this with 413 ``payload_too_large``
            (checked from ``Content-Length`` up front and while streaming); ``None`` for no cap.
    """

    def __init__(self, app: ASGIApp, service: str, max_body_bytes: int | None = None) -> None:
        self.app = app
        self.service = service
        self.max_body_bytes = max_body_bytes
        self._in_flight = HTTP_IN_FLIGHT.labels(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = Headers(scope=scope)
        request_id = pick_request_id(headers.get(REQUEST_ID_HEADER))
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        self._in_flight.inc()
        try:
            cap = self.max_body_bytes
            if cap is not None and _content_length(headers) > cap:
                await error_json(413, "payload_too_large", f"request body exceeds {cap} bytes")(
                    scope, receive, send_with_id
                )
            else:
                await self.app(scope, receive if cap is None else _capped(receive, cap), send_with_id)
        except Exception:
            error_logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if response_started:
                raise  # Nothing sane can be sent any more; the server drops the connection.
            await error_json(500, "internal_error", "internal server error; quote the request id")(
                scope, receive, send_with_id
            )
        finally:
            self._in_flight.dec()
            elapsed = time.perf_counter() - start
            route = route_template(scope)
            method = scope["method"]
            HTTP_REQUESTS.labels(self.service, route, method, str(status)).inc()
            HTTP_DURATION.labels(self.service, route, method).observe(elapsed)
            level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
            logger.log(
                level,
                "method=%s path=%s route=%s status=%d duration_ms=%.1f",
                method,
                scope["path"],
                route,
                status,
                elapsed * 1000,
            )
            request_id_var.reset(token)


def _content_length(headers: Headers) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


def _capped(receive: Receive, cap: int) -> Receive:
    seen = 0

    async def receive_capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise BodyTooLarge(cap)
        return message

    return receive_capped
