"""Wire schemas every service shares: the error envelope and the health / readiness bodies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """What went wrong, in a form a program can branch on."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Stable machine-readable code, e.g. `bad_request`, `overloaded`.")
    message: str = Field(description="Human-readable explanation; never a traceback.")
    request_id: str = Field(description="Same value as the `X-Request-ID` response header.")
    details: dict[str, Any] | None = Field(
        default=None, description="Extra structured context, when the error has any (e.g. readiness checks)."
    )


class ErrorResponse(BaseModel):
    """The one error envelope of every route of every service."""

    error: ErrorBody


class HealthResponse(BaseModel):
    """Liveness: the process runs and its event loop answers."""

    status: str = "ok"
    service: str
    version: str


class ReadyResponse(BaseModel):
    """Readiness: the service can do its job now."""

    status: str = "ready"
    service: str
    checks: dict[str, Any] = Field(default_factory=dict)


_DESCRIPTIONS = {
    400: "Bad request: malformed JSON, empty body, missing or wrongly typed fields (`bad_request`).",
    401: "Missing, unknown or revoked API key (`unauthorized`).",
    404: "Not found (`not_found`).",
    405: "Method not allowed (`method_not_allowed`).",
    409: "Conflicts with what the server holds (`image_mismatch`, `ambiguous_request_id`).",
    413: "Payload or image too large (`payload_too_large`, `image_too_large`).",
    415: "Not an allowed image format (`unsupported_format`).",
    422: "Corrupt image or failed fetch (`corrupt_image`, `url_fetch_failed`).",
    429: "Rate limited, see Retry-After (`rate_limited`).",
    500: "Unexpected server error (`internal_error`); the request id finds it in the logs.",
    503: "Overloaded or not ready, see Retry-After (`overloaded`, `not_ready`).",
    504: "Deadline exceeded (`timeout`).",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error envelope for the given statuses.

    Args:
        statuses: HTTP statuses the route can answer with an error.

    Returns:
        A mapping to pass as ``responses=`` to a FastAPI route decorator.
    """
    return {
        status: {"model": ErrorResponse, "description": _DESCRIPTIONS.get(status, "Error.")}
        for status in statuses
    }
