"""Settings every service shares, and ``run``: start a service under uvicorn."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from snap2caption.http.metrics import MULTIPROC_ENV

logger = logging.getLogger(__name__)


class ServiceSettings(BaseSettings):
    """Fields every service's ``Settings`` has; each service subclasses it with its env prefix."""

    host: str = Field(default="127.0.0.1", description="Bind address; loopback by default.")
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64, description="uvicorn worker processes.")
    graceful_timeout_s: int = Field(
        default=15,
        ge=1,
        description="On SIGTERM, time in-flight requests get to finish.",
    )


def run(app_path: str, settings: ServiceSettings, *, factory: bool = True) -> None:
    """Serve an app under uvicorn until SIGTERM/SIGINT, then drain gracefully.

    Args:
        app_path: Import string, ``"services.etl.app:create_app"`` (a factory, called in each
            worker so it reads its settings there) or ``"pkg.mod:app"`` with ``factory=False``.
        settings: Host, port, worker count and drain timeout.
        factory: Whether ``app_path`` names an app factory.
    """
    import uvicorn

    if settings.workers > 1 or os.environ.get(MULTIPROC_ENV):
        _prepare_multiprocess_metrics()
    # Workers are fresh processes: hand them the log level this process was configured with.
    os.environ["SNAP2CAPTION_LOG_LEVEL"] = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    logger.info(
        "serving %s on http://%s:%d with %d worker(s)",
        app_path,
        settings.host,
        settings.port,
        settings.workers,
    )
    uvicorn.run(
        app_path,
        factory=factory,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,  # our root handler (snap2caption.logs) formats uvicorn's records too
        access_log=False,  # the request-context middleware logs each request with its id
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        server_header=False,
    )


def _prepare_multiprocess_metrics() -> None:
    """Point prometheus-client at a metrics folder and clear values left by an earlier run."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        folder = tempfile.mkdtemp(prefix="snap2caption-metrics-")
        os.environ[MULTIPROC_ENV] = folder
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
