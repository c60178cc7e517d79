"""FastAPI plumbing every Snap2Caption service shares.

Build a service's app with :func:`create_app` and serve it with :func:`run`::

    app = create_app("captioner", __version__, lifespan=lifespan, ready_check=ready, routers=[router])
    run("services.captioner.app:create_app", Settings())

Routes declare ``response_model`` and document their errors with :func:`error_responses`; raising any
``snap2caption.errors.Snap2CaptionError`` gives the envelope with its status and code. Routes that take
image uploads read them with ``snap2caption.http.uploads.read_form_files``.
"""

from __future__ import annotations

from snap2caption.http.app import Readiness, ReadyCheck, create_app
from snap2caption.http.errors import error_json, retry_after_header
from snap2caption.http.middleware import REQUEST_ID_HEADER, BodyPace
from snap2caption.http.schemas import (
    ErrorBody,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    error_responses,
)
from snap2caption.http.server import ServiceSettings, run

__all__ = [
    "REQUEST_ID_HEADER",
    "BodyPace",
    "ErrorBody",
    "ErrorResponse",
    "HealthResponse",
    "Readiness",
    "ReadyCheck",
    "ReadyResponse",
    "ServiceSettings",
    "create_app",
    "error_json",
    "error_responses",
    "retry_after_header",
    "run",
]
