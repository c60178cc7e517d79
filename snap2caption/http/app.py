"""``create_app``: a FastAPI app with the plumbing every Snap2Caption service shares.

What every app built here gets:

- the error envelope on every route (``snap2caption.http.errors``);
- the request id (``X-Request-ID``), access log, HTTP metrics, body cap and pace (408 for a trickling
  upload), clients that leave counted as 499 (never 500), and the last-resort 500
  (``snap2caption.http.middleware``);
- ``GET /healthz`` (liveness), ``GET /readyz`` (readiness: lifespan done, not draining, and the
  service's own ``ready_check``), ``GET /metrics`` (Prometheus);
- OpenAPI that documents the envelope and says 400 where FastAPI would say 422.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi

from snap2caption.errors import NotReady
from snap2caption.http.errors import install_error_handlers
from snap2caption.http.metrics import READY, mark_worker_dead, render_metrics
from snap2caption.http.middleware import BodyPace, RequestContextMiddleware
from snap2caption.http.schemas import HealthResponse, ReadyResponse, error_responses
from snap2caption.logs import configure_logging

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]


@dataclass
class Readiness:
    """What a service's readiness callback answers.

    Attributes:
        ready: Whether the service can do its job now.
        checks: Per-dependency detail shown by ``/readyz`` either way, e.g. ``{"model": "v3"}``.
        reason: One line saying why not, when not ready.
    """

    ready: bool
    checks: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


ReadyCheck = Callable[[FastAPI], Readiness | Awaitable[Readiness]]


def create_app(
    service: str,
    version: str,
    *,
    lifespan: Lifespan | None = None,
    ready_check: ReadyCheck | None = None,
    routers: Sequence[APIRouter] = (),
    description: str = "",
    max_body_bytes: int | None = None,
    body_pace: BodyPace | None = None,
    track: str = "production",
) -> FastAPI:
    """Build a service's FastAPI app with the shared plumbing installed.

    Args:
        service: Service name (``gateway``, ``captioner``, ``detector``, ``etl``); the ``service``
            label of the metrics and the OpenAPI title.
        version: Service version, shown by ``/healthz`` and OpenAPI.
        lifespan: The service's own lifespan (load models, open stores); it runs inside the shared
            one, and may yield lifespan state.
        ready_check: Called by ``/readyz`` once the lifespan has started, with the app; sync or
            async. Without one, a started, non-draining app is ready.
        routers: The service's routers, included in order.
        description: OpenAPI description.
        max_body_bytes: Cap on request bodies (413 ``payload_too_large`` beyond it), or ``None``.
        body_pace: Slowest acceptable request body (408 ``request_timeout`` below it), or ``None``.
        track: The release track the HTTP metrics are labelled with unless a route sets
            ``request.state.track`` (see :class:`RequestContextMiddleware`).

    Returns:
        The app. ``app.state.service``, ``app.state.started`` and ``app.state.draining`` are set.
    """
    configure_logging(os.environ.get("SNAP2CAPTION_LOG_LEVEL", "INFO"))

    @asynccontextmanager
    async def shared_lifespan(app: FastAPI) -> AsyncIterator[Any]:
        app.state.started = False
        app.state.draining = False
        try:
            if lifespan is None:
                app.state.started = True
                yield None
            else:
                async with lifespan(app) as state:
                    app.state.started = True
                    yield state
                    app.state.draining = True
        finally:
            app.state.draining = True
            mark_worker_dead()

    app = FastAPI(
        title=f"Snap2Caption {service}",
        version=version,
        description=description,
        lifespan=shared_lifespan,
        responses=error_responses(500),
    )
    app.state.service = service
    app.state.started = False
    app.state.draining = False
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware,
        service=service,
        max_body_bytes=max_body_bytes,
        body_pace=body_pace,
        track=track,
    )
    app.include_router(_ops_router(service, version, ready_check))
    for router in routers:
        app.include_router(router)
    _document_errors_as_400(app)
    return app


def _ops_router(service: str, version: str, ready_check: ReadyCheck | None) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/healthz", response_model=HealthResponse, summary="Liveness")
    async def healthz() -> HealthResponse:
        return HealthResponse(service=service, version=version)

    async def readiness(app: FastAPI) -> ReadyResponse:
        """The /readyz answer, or ``NotReady`` (503); keeps ``snap2caption_ready`` current."""
        try:
            if not app.state.started:
                raise NotReady("not ready: starting")
            if app.state.draining:
                raise NotReady("not ready: shutting down")
            answer = Readiness(ready=True)
            if ready_check is not None:
                result = ready_check(app)
                answer = await result if inspect.isawaitable(result) else result
            if not answer.ready:
                raise _NotReadyWithChecks(answer)
        except NotReady:
            READY.labels(service).set(0)
            raise
        READY.labels(service).set(1)
        return ReadyResponse(service=service, checks=answer.checks)

    @router.get("/readyz", response_model=ReadyResponse, summary="Readiness", responses=error_responses(503))
    async def readyz(request: Request) -> ReadyResponse:
        return await readiness(request.app)

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    )
    async def metrics(request: Request) -> Response:
        with contextlib.suppress(NotReady):  # only to refresh snap2caption_ready for this scrape
            await readiness(request.app)
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)

    return router


class _NotReadyWithChecks(NotReady):
    def __init__(self, readiness: Readiness) -> None:
        super().__init__(f"not ready: {readiness.reason or 'a readiness check failed'}")
        self.details = {"checks": readiness.checks}


def _document_errors_as_400(app: FastAPI) -> None:
    """Make OpenAPI say what the service does: validation errors are 400 envelopes, not 422."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    responses = operation.get("responses", {})
                    # Only FastAPI's own validation-error 422 becomes 400; a route's documented 422
                    # (e.g. `corrupt_image`, in the envelope) stays.
                    if "HTTPValidationError" in str(responses.get("422", "")):
                        del responses["422"]
                        responses.setdefault("400", _error_ref(_BAD_REQUEST))
            components = schema.get("components", {}).get("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_BAD_REQUEST = "Bad request: malformed JSON, empty body, missing or wrongly typed fields (`bad_request`)."


def _error_ref(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
