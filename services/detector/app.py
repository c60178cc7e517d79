"""The detector service (port 8002): images in, objects (boxes) and tags out, micro-batched, on two
hot-swappable models.

Started by ``snap2caption serve detector``; ``create_app`` is the uvicorn factory. The models are the
versions ``models:/detector@production`` and ``models:/tagger@production`` name in the registry; the service
answers ``/readyz`` with 200 once both are downloaded, verified, loaded and warmed up, and follows both
aliases from then on (see ``snap2caption.serving.model_store``).
"""

from __future__ import annotations

from fastapi import FastAPI

from services.detector.config import Settings
from services.detector.engine import DetectorEngine
from services.detector.routes import router
from snap2caption.serving.app import create_model_app


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the detector app.

    Args:
        settings: Defaults to ``Settings()`` read from ``SNAP2CAPTION_DETECTOR_*``.

    Returns:
        The app; its lifespan starts both models' batchers and watchers, and drains them on shutdown.
    """
    resolved = settings or Settings()
    return create_model_app(
        "detector",
        resolved,
        lambda: DetectorEngine(resolved),
        router,
        description=(
            "Locates objects (YOLO) and tags images (ImageNet classifier) with the models the registry's "
            "aliases name; micro-batched."
        ),
        alias=resolved.detector_alias,
    )
