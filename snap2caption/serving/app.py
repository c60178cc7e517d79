"""``create_model_app``: the FastAPI app of a model service (captioner, detector), written once.

A model service is an engine (batchers + model stores) started in the lifespan, drained on shutdown, and
asked for readiness; only its engine, routes and description differ.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import APIRouter, FastAPI, Request, Response

from snap2caption import __version__
from snap2caption.http import Readiness, create_app
from snap2caption.http.errors import error_json
from snap2caption.serving.settings import ModelServiceSettings
from snap2caption.serving.threads import configure_torch_threads

logger = logging.getLogger(__name__)


class ModelEngine(Protocol):
    """What the app needs of a service's engine."""

    def start(self) -> None: ...

    async def close(self, timeout_s: float) -> None: ...

    def readiness(self) -> Readiness: ...


def release_track(alias: str) -> str:
    """The release track of a model service serving ``alias``: ``canary`` for the canary alias, else
    ``production`` (a service pinned to a version number or another alias is not part of a release)."""
    return "canary" if alias.strip().lower() == "canary" else "production"


def create_model_app(
    service: str,
    settings: ModelServiceSettings,
    engine_factory: Callable[[], ModelEngine],
    router: APIRouter,
    description: str,
    alias: str = "production",
) -> FastAPI:
    """Build a model service's app: threads set, engine started in the lifespan and drained on shutdown.

    Args:
        service: Service name (metrics label, OpenAPI title).
        settings: The service's settings (threads, graceful timeout, body cap); stored on ``app.state``.
        engine_factory: Makes the engine, inside the lifespan (after the thread setting).
        router: The service's routes.
        description: OpenAPI description.
        alias: The registry alias the service serves; a service serving ``canary`` labels its HTTP metrics
            ``track="canary"`` (:func:`release_track`).

    Returns:
        The app; ``app.state.settings`` and ``app.state.engine`` are set while it runs.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_torch_threads(settings.threads)
        engine = engine_factory()
        engine.start()
        app.state.settings, app.state.engine = settings, engine
        try:
            yield
        finally:
            # SIGTERM: uvicorn has stopped taking requests and waited for those in flight.
            await engine.close(settings.graceful_timeout_s)

    def ready(app: FastAPI) -> Readiness:
        engine: ModelEngine = app.state.engine
        return engine.readiness()

    app = create_app(
        service,
        __version__,
        lifespan=lifespan,
        ready_check=ready,
        routers=[router],
        description=description,
        max_body_bytes=settings.max_body_bytes,
        track=release_track(alias),
    )
    if settings.test_fault_errors or settings.test_fault_slowdown > 1.0:
        _inject_test_faults(app, service, settings)
    return app


def _inject_test_faults(app: FastAPI, service: str, settings: ModelServiceSettings) -> None:
    """TEST ONLY: make the model routes fail or slow down, as a broken model would (``test_fault_*``).

    The canary tests need a canary that errors and one that is several times slower than production
    while serving the very same model; only the model routes (``POST /v1/...``) are touched, so the
    service still reports ready and Prometheus still scrapes it.
    """
    logger.warning(
        "%s: TEST FAULTS ON: errors=%s, slowdown=x%g",
        service, settings.test_fault_errors, settings.test_fault_slowdown,
    )  # fmt: skip

    @app.middleware("http")
    async def test_faults(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.method != "POST" or not request.url.path.startswith("/v1/"):
            return await call_next(request)
        if settings.test_fault_errors:
            return error_json(500, "injected_fault", f"{service}: test fault injected (test_fault_errors)")
        started = time.perf_counter()
        response = await call_next(request)
        await asyncio.sleep((settings.test_fault_slowdown - 1.0) * (time.perf_counter() - started))
        return response
