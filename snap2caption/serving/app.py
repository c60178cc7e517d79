"""``create_model_app``: the FastAPI app of a model service (captioner, detector), written once.

A model service is an engine (batchers + model stores) started in the lifespan, drained on shutdown, and
asked for readiness; only its engine, routes and description differ.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import APIRouter, FastAPI

from snap2caption import __version__
from snap2caption.http import Readiness, create_app
from snap2caption.serving.settings import ModelServiceSettings
from snap2caption.serving.threads import configure_torch_threads


class ModelEngine(Protocol):
    """What the app needs of a service's engine."""

    def start(self) -> None: ...

    async def close(self, timeout_s: float) -> None: ...

    def readiness(self) -> Readiness: ...


def create_model_app(
    service: str,
    settings: ModelServiceSettings,
    engine_factory: Callable[[], ModelEngine],
    router: APIRouter,
    description: str,
) -> FastAPI:
    """Build a model service's app: threads set, engine started in the lifespan and drained on shutdown.

    Args:
        service: Service name (metrics label, OpenAPI title).
        settings: The service's settings (threads, graceful timeout, body cap); stored on ``app.state``.
        engine_factory: Makes the engine, inside the lifespan (after the thread setting).
        router: The service's routes.
        description: OpenAPI description.

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

    return create_app(
        service,
        __version__,
        lifespan=lifespan,
        ready_check=ready,
        routers=[router],
        description=description,
        max_body_bytes=settings.max_body_bytes,
    )
