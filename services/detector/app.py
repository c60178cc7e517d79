"""The detector service (port 8002): images in, objects (boxes) and tags out, micro-batched, on two
hot-swappable models.

Started by ``snap2caption serve detector``; ``create_app`` is the uvicorn factory. The models are the
versions ``models:/detector@production`` and ``models:/tagger@production`` name in the registry; the service
answers ``/readyz`` with 200 once both are downloaded, verified, loaded and warmed up, and follows both
aliases from then on (see ``snap2caption.serving.model_store``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.detector.config import Settings
from services.detector.engine import DetectorEngine
from services.detector.routes import router
from snap2caption import __version__
from snap2caption.service import Readiness
from snap2caption.service import create_app as create_service_app
from snap2caption.serving import configure_torch_threads


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the detector app.

    Args:
        settings: Defaults to ``Settings()`` read from ``SNAP2CAPTION_DETECTOR_*``.

    Returns:
        The app; its lifespan starts both models' batchers and watchers, and drains them on shutdown.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_torch_threads(settings.threads)
        engine = DetectorEngine(settings)
        engine.start()
        app.state.settings, app.state.engine = settings, engine
        try:
            yield
        finally:
            # SIGTERM: uvicorn has stopped taking requests and waited for those in flight.
            await engine.close(settings.graceful_timeout_s)

    def ready(app: FastAPI) -> Readiness:
        engine: DetectorEngine = app.state.engine
        return engine.readiness()

    return create_service_app(
        "detector",
        __version__,
        lifespan=lifespan,
        ready_check=ready,
        routers=[router],
        description=(
            "Locates objects (YOLO) and tags images (ImageNet classifier) with the models the registry's "
            "aliases name; micro-batched."
        ),
        max_body_bytes=settings.max_body_bytes,
    )
