"""The gateway (port 8000): the public REST API in front of the captioner and the detector.

Started by ``snap2caption serve gateway``; ``create_app`` is the uvicorn factory. The lifespan opens
the database (API keys, inference log, feedback), starts the inference log writer and the backend
readiness poller, and closes them in reverse on shutdown. ``/readyz`` is 200 while both backends'
``/readyz`` answered 200 recently.

App state other modules rely on: ``settings``, ``gateway`` (the engine), ``db_engine``,
``inference_log``, ``auth``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from services.gateway.config import Settings
from services.gateway.engine import Gateway
from services.gateway.routes import authenticate, router
from snap2caption import __version__
from snap2caption.http import REQUEST_ID_HEADER, BodyPace, Readiness
from snap2caption.http import create_app as create_service_app

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Caption, alt text, tags and located objects for any image, uploaded or by URL. One backend failing "
    'gives a partial result (`errors`); every error is the envelope `{"error": {code, message, request_id}}`.'
)


def _optional_router(module: str) -> APIRouter | None:
    """``module.router`` when the module exists (the web page ships separately from the API)."""
    if importlib.util.find_spec(module) is None:
        return None
    router: APIRouter = importlib.import_module(module).router
    return router


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway app.

    Args:
        settings: Defaults to ``Settings()`` read from ``SNAP2CAPTION_GATEWAY_*``.

    Returns:
        The app; its lifespan opens the database and the backends' connection pools.
    """
    resolved = settings or Settings()
    # httpx logs every backend call and readiness poll at INFO; the access log already has each request.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from services.gateway.auth import Auth, KeyStore, RateLimiter
        from services.gateway.db import make_engine
        from services.gateway.inference_log import InferenceLogWriter
        from services.gateway.releases import ReleaseStore

        db_engine = make_engine(resolved.database_url)
        log_writer = InferenceLogWriter(db_engine, max_queue=resolved.inference_log_queue)
        log_writer.start()
        app.state.settings = resolved
        app.state.db_engine = db_engine
        app.state.inference_log = log_writer
        # Limits are per key: without keys every client behind one proxy would share a bucket, and the
        # embedded setup (and its benchmark of 50 clients on loopback) would throttle itself. The buckets
        # live in the database, so every worker and gateway process of a deployment shares them.
        app.state.auth = Auth(
            KeyStore(db_engine) if resolved.auth_enabled else None,
            RateLimiter(db_engine, resolved.rate_limit_per_s, resolved.rate_limit_burst)
            if resolved.auth_enabled
            else None,
            enabled=resolved.auth_enabled,
        )
        gateway = Gateway(resolved, ReleaseStore(db_engine))
        gateway.start()
        app.state.gateway = gateway
        logger.info(
            "gateway: captioner %s, detector %s, canaries %s, profile %s, auth %s",
            resolved.captioner_url,
            resolved.detector_url,
            {name: canary.base_url for name, canary in gateway.canaries.items()} or "none",
            resolved.profile,
            "on" if resolved.auth_enabled else "off",
        )
        try:
            yield
        finally:
            await gateway.close()
            log_writer.close(timeout_s=resolved.graceful_timeout_s)
            db_engine.dispose()

    def ready(app: FastAPI) -> Readiness:
        gateway: Gateway = app.state.gateway
        return gateway.readiness()

    routers = [router]
    feedback = _optional_router("services.gateway.feedback")
    if feedback is not None:
        protected = APIRouter(dependencies=[Depends(authenticate)])
        protected.include_router(feedback)
        routers.append(protected)
    web = _optional_router("services.gateway.web")
    if web is not None:
        routers.append(web)
    app = create_service_app(
        "gateway",
        __version__,
        lifespan=lifespan,
        ready_check=ready,
        routers=routers,
        description=DESCRIPTION,
        max_body_bytes=resolved.max_body_bytes,
        body_pace=BodyPace(resolved.body_min_bytes_per_s, resolved.body_grace_s, resolved.body_max_time_s),
    )
    app.state.settings = resolved
    if resolved.cors_allow_origins:
        # Outermost, so error responses (413 from the body cap, 401, 429) carry CORS headers too.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=resolved.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER, "Retry-After"],
            max_age=600,
        )
    return app
