"""The ETL service (port 8003): queue dataset builds over REST, run them in child processes.

Started by ``snap2caption serve etl``; ``create_app`` is the uvicorn factory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text

from services.etl.config import Settings
from services.etl.engine import ETL_JOBS, JobRunner
from services.etl.jobs import JobStore
from services.etl.routes import router
from snap2caption import __version__
from snap2caption.http import Readiness
from snap2caption.http import create_app as create_service_app

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the ETL app.

    Args:
        settings: Defaults to ``Settings()`` read from ``SNAP2CAPTION_ETL_*``.

    Returns:
        The app; its lifespan opens the job store, resumes interrupted jobs and starts the runner.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_root.mkdir(parents=True, exist_ok=True)
        db_file = settings.sqlite_path()
        if db_file is not None:
            db_file.parent.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.db_url)
        requeued, failed = store.recover(settings.max_attempts)
        if requeued or failed:
            logger.warning(
                "jobs interrupted by the last stop: %d re-queued, %d failed", len(requeued), len(failed)
            )
        ETL_JOBS.labels("failed").inc(len(failed))
        runner = JobRunner(store, settings)
        runner.start()
        app.state.settings, app.state.store, app.state.runner = settings, store, runner
        try:
            yield
        finally:
            # SIGTERM: uvicorn has stopped taking requests; let a running job finish or re-queue it.
            await asyncio.to_thread(runner.stop, settings.shutdown_grace_s)
            store.close()

    async def ready(app: FastAPI) -> Readiness:
        runner: JobRunner = app.state.runner
        store: JobStore = app.state.store
        checks: dict[str, object] = {
            "runner_threads": f"{runner.alive}/{settings.max_concurrent_jobs}",
            "running_jobs": runner.running,
        }
        try:
            await asyncio.to_thread(_ping, store)
            checks["store"] = "ok"
        except Exception as exc:
            checks["store"] = f"error: {type(exc).__name__}"
            return Readiness(ready=False, checks=checks, reason="the job store is unreachable")
        if runner.alive < settings.max_concurrent_jobs:
            return Readiness(ready=False, checks=checks, reason="a job runner thread died")
        return Readiness(ready=True, checks=checks)

    return create_service_app(
        "etl",
        __version__,
        lifespan=lifespan,
        ready_check=ready,
        routers=[router],
        description="Builds training datasets from COCO, Karpathy and Flickr30K sources, as queued jobs.",
        max_body_bytes=1 << 20,
    )


def _ping(store: JobStore) -> None:
    with store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
