"""The captioner service (port 8001): images in, captions out, micro-batched, on a hot-swappable model.

Started by ``snap2caption serve captioner``; ``create_app`` is the uvicorn factory. The model is the
version ``models:/<model_name>@<model_alias>`` names in the registry; the service answers ``/readyz``
with 200 once that version is downloaded, verified, loaded and warmed up, and follows the alias from
then on (see ``snap2caption.serving.model_store``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.captioner.config import Settings
from services.captioner.engine import CaptionEngine
from services.captioner.routes import router
from snap2caption import __version__
from snap2caption.service import Readiness
from snap2caption.service import create_app as create_service_app
from snap2caption.serving import configure_torch_threads


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the captioner app.

    Args:
        settings: Defaults to ``Settings()`` read from ``SNAP2CAPTION_CAPTIONER_*``.

    Returns:
        The app; its lifespan starts the batcher and the model watcher, and drains them on shutdown.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_torch_threads(settings.threads)
        engine = CaptionEngine(settings)
        engine.start()
        app.state.settings, app.state.engine = settings, engine
        try:
            yield
        finally:
            # SIGTERM: uvicorn has stopped taking requests and waited for those in flight.
            await engine.close(settings.graceful_timeout_s)

    def ready(app: FastAPI) -> Readiness:
        engine: CaptionEngine = app.state.engine
        return engine.readiness()

    return create_service_app(
        "captioner",
        __version__,
        lifespan=lifespan,
        ready_check=ready,
        routers=[router],
        description="Captions images with the caption model the registry's alias names; micro-batched.",
        max_body_bytes=settings.max_body_bytes,
    )
