"""Turn every failure into the one error envelope ``{"error": {"code", "message", "request_id"}}``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from snap2caption.errors import RequestTimeout, Snap2CaptionError
from snap2caption.logs import request_id_var

# Codes for errors raised by the framework itself (routing, body limits) rather than by our code.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    RequestTimeout.status: RequestTimeout.code,  # a body arriving too slowly (the middleware's BodyTooSlow)
    413: "payload_too_large",
    415: "unsupported_format",
    429: "rate_limited",
    503: "overloaded",
    504: "timeout",
}
_MAX_FIELD_ERRORS = 3


def error_json(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    details: dict[str, Any] | None = None,
) -> JSONResponse:
    """Build the envelope response, stamped with the current request id.

    Args:
        status: HTTP status.
        code: Stable error code.
        message: Human-readable message (never a traceback).
        headers: Extra response headers (``Retry-After``, ``Allow``).
        details: Optional structured context.

    Returns:
        The JSON response.
    """
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id_var.get() or "-"}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))


def retry_after_header(seconds: float) -> dict[str, str]:
    """A ``Retry-After`` header in whole seconds (at least 1)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _field_name(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    """Say which fields are wrong and why, in one line, e.g. ``body.source: Field required``.

    Takes FastAPI's errors (locations start with ``body``/``query``) and a route's own
    ``Model.model_validate_json`` (locations are the model's fields) alike.
    """
    errors = list(exc.errors())
    parts: list[str] = []
    for err in errors[:_MAX_FIELD_ERRORS]:
        loc = tuple(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            # FastAPI's location ends at the offset; pydantic's own reason already says where.
            where = f" at position {loc[-1]}" if loc else ""
            parts.append(f"malformed JSON body: {reason}{where}")
        elif kind == "missing" and loc == ("body",):
            parts.append("request body is required (JSON object)")
        else:
            parts.append(f"{_field_name(loc)}: {err.get('msg', 'invalid')}")
    if len(errors) > _MAX_FIELD_ERRORS:
        parts.append(f"and {len(errors) - _MAX_FIELD_ERRORS} more")
    return "; ".join(parts) or "invalid request"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


async def _snap2caption_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Snap2CaptionError)
    retry_after = getattr(exc, "retry_after", None)
    headers = retry_after_header(retry_after) if retry_after is not None else None
    details = getattr(exc, "details", None)
    return error_json(exc.status, exc.code, exc.message, headers=headers, details=details)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_json(400, "bad_request", validation_message(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else _phrase(status)
    if status == 404 and message == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    elif status == 405 and message == "Method Not Allowed":
        message = f"method {request.method} not allowed on {request.url.path}"
    code = _HTTP_CODES.get(status, "internal_error" if status >= 500 else "bad_request")
    return error_json(status, code, message, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the envelope handlers for our errors, validation errors and framework HTTP errors.

    Unhandled exceptions are turned into a 500 envelope by the request-context middleware, which
    wraps the routes and so also stamps that response with the request id.
    """
    app.add_exception_handler(Snap2CaptionError, _snap2caption_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
