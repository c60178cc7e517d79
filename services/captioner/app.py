"""The captioner service (port 8001): images in, captions out, micro-batched, on a hot-swappable model.

Started by ``snap2caption serve captioner``; ``create_app`` is the uvicorn factory. The model is the
version ``models:/<model_name>@<model_alias>`` names in the registry; the service answers ``/readyz``
with 200 once that version is downloaded, verified, loaded and warmed up, and follows the alias from
then on (see ``snap2caption.serving.model_store``).
"""

from __future__ import annotations

from fastapi import FastAPI

from services.captioner.config import Settings
from services.captioner.engine import CaptionEngine
from services.captioner.routes import router
from snap2caption.serving.app import create_model_app


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the captioner app.

    Args:
        settings: Defaults to ``Settings()`` read from ``SNAP2CAPTION_CAPTIONER_*``.

    Returns:
        The app; its lifespan starts the batcher and the model watcher, and drains them on shutdown.
    """
    resolved = settings or Settings()
    return create_model_app(
        "captioner",
        resolved,
        lambda: CaptionEngine(resolved),
        router,
        description="Captions images with the caption model the registry's alias names; micro-batched.",
        alias=resolved.model_alias,
    )
