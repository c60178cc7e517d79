"""``POST /v1/caption``: image bytes in, one caption per image out."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from services.captioner.engine import CaptionEngine
from services.captioner.schemas import CaptionResponse, DecodeSettings, ImageCaptionResult
from snap2caption.http import error_responses
from snap2caption.serving.inputs import IMAGE_REQUEST_BODY, read_images, request_deadline
from snap2caption.serving.schemas import ModelRef, TimeoutMs, Timings

router = APIRouter(prefix="/v1", tags=["caption"])


def get_engine(request: Request) -> CaptionEngine:
    return request.app.state.engine


EngineDep = Annotated[CaptionEngine, Depends(get_engine)]


@router.post(
    "/caption",
    response_model=CaptionResponse,
    summary="Caption images",
    responses=error_responses(400, 413, 415, 422, 503, 504),
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def caption(
    request: Request,
    engine: EngineDep,
    max_new_tokens: Annotated[
        int | None, Query(ge=1, le=256, description="Most tokens per caption; default the model's.")
    ] = None,
    num_beams: Annotated[
        int | None, Query(ge=1, le=16, description="1 = greedy, more = beam search; default the model's.")
    ] = None,
    timeout_ms: TimeoutMs = None,
) -> CaptionResponse:
    """Caption up to ``max_images_per_request`` images; the captions come back in request order."""
    started = time.monotonic()
    settings = engine.settings
    deadline = request_deadline(started, timeout_ms, settings.request_timeout_s, settings.max_timeout_s)
    options = engine.options(max_new_tokens, num_beams)  # 503 before reading the body when no model
    uploads = await read_images(request, settings.max_images_per_request, settings.max_image_bytes)
    items = await engine.prepare([data for _, data in uploads])
    prepared = time.monotonic()
    run = await engine.caption(items, options, deadline)
    return CaptionResponse(
        model=ModelRef(
            name=settings.model_name,
            version=run.model_version,
            alias=settings.model_alias,
            backend=run.runtime,
        ),
        results=[
            ImageCaptionResult(
                index=i,
                filename=name,
                caption=c.text,
                confidence=c.confidence,
                raw_confidence=c.raw_confidence,
                tokens=c.tokens,
                in_domain=c.in_domain,
                domain_score=c.domain_score,
            )
            for i, ((name, _), c) in enumerate(zip(uploads, run.captions, strict=True))
        ],
        options=DecodeSettings(max_new_tokens=options.max_new_tokens, num_beams=options.num_beams),
        batch_size=run.batch_size,
        timings=Timings.measure(started, prepared, run.queue_s, run.inference_s),
    )
