"""``POST /v1/detect`` (objects with boxes) and ``POST /v1/tags`` (ImageNet tags): image bytes in."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from services.detector.engine import DetectorEngine
from services.detector.schemas import (
    Box,
    DetectedObject,
    DetectResponse,
    DetectSettings,
    ImageObjects,
    ImageSize,
    ImageTag,
    ImageTags,
    TagSettings,
    TagsResponse,
)
from snap2caption.service import error_responses
from snap2caption.serving.inputs import IMAGE_REQUEST_BODY, read_images, request_deadline
from snap2caption.serving.schemas import ModelRef, TimeoutMs, Timings

router = APIRouter(prefix="/v1", tags=["detect"])


def get_engine(request: Request) -> DetectorEngine:
    return request.app.state.engine


EngineDep = Annotated[DetectorEngine, Depends(get_engine)]


@router.post(
    "/detect",
    response_model=DetectResponse,
    summary="Locate objects in images",
    responses=error_responses(400, 413, 415, 422, 503, 504),
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def detect(
    request: Request,
    engine: EngineDep,
    conf: Annotated[
        float | None, Query(ge=0, le=1, allow_inf_nan=False, description="Minimum object score.")
    ] = None,
    iou: Annotated[
        float | None, Query(ge=0, le=1, allow_inf_nan=False, description="NMS IoU threshold (per class).")
    ] = None,
    max_det: Annotated[
        int | None, Query(ge=1, le=10_000, description="Most objects per image (up to the service's limit).")
    ] = None,
    timeout_ms: TimeoutMs = None,
) -> DetectResponse:
    """Detect objects in up to ``max_images_per_request`` images; results come back in request order.

    Boxes are in pixels of each original image after EXIF orientation (``image`` gives its size).
    """
    started = time.monotonic()
    settings = engine.settings
    deadline = request_deadline(started, timeout_ms, settings.request_timeout_s, settings.max_timeout_s)
    options = engine.detect_options(conf, iou, max_det)  # 503 before reading the body when no model
    uploads = await read_images(request, settings.max_images_per_request, settings.max_image_bytes)
    items = await engine.prepare_detect([data for _, data in uploads], options)
    prepared = time.monotonic()
    run = await engine.detect(items, deadline)
    first = run.outputs[0]  # a request's images run in one batch, on one model version
    return DetectResponse(
        model=ModelRef(
            name=settings.detector_model,
            version=first.version,
            alias=settings.detector_alias,
            backend=first.backend,
        ),
        results=[
            ImageObjects(
                index=i,
                filename=name,
                image=ImageSize(width=out.width, height=out.height),
                objects=[
                    DetectedObject(
                        label=d.class_name,
                        class_id=d.class_id,
                        score=d.score,
                        box=Box(x1=d.box_xyxy[0], y1=d.box_xyxy[1], x2=d.box_xyxy[2], y2=d.box_xyxy[3]),
                    )
                    for d in out.objects
                ],
            )
            for i, ((name, _), out) in enumerate(zip(uploads, run.outputs, strict=True))
        ],
        options=DetectSettings(conf=options.conf, iou=options.iou, max_det=options.max_det),
        batch_size=max(run.batch_sizes),
        timings=Timings.measure(started, prepared, run.queue_s, run.inference_s),
    )


@router.post(
    "/tags",
    response_model=TagsResponse,
    summary="Tag images",
    responses=error_responses(400, 413, 415, 422, 503, 504),
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def tags(
    request: Request,
    engine: EngineDep,
    top_k: Annotated[
        int | None, Query(ge=1, le=1000, description="Most tags per image (up to the service's limit).")
    ] = None,
    min_score: Annotated[
        float | None, Query(ge=0, le=1, allow_inf_nan=False, description="Minimum tag probability.")
    ] = None,
    timeout_ms: TimeoutMs = None,
) -> TagsResponse:
    """Tag up to ``max_images_per_request`` images with classifier classes, readable names and hashtags."""
    started = time.monotonic()
    settings = engine.settings
    deadline = request_deadline(started, timeout_ms, settings.request_timeout_s, settings.max_timeout_s)
    options = engine.tag_options(top_k, min_score)  # 503 before reading the body when no model
    uploads = await read_images(request, settings.max_images_per_request, settings.max_image_bytes)
    items = await engine.prepare_tags([data for _, data in uploads], options)
    prepared = time.monotonic()
    run = await engine.tag(items, deadline)
    first = run.outputs[0]
    return TagsResponse(
        model=ModelRef(
            name=settings.tagger_model,
            version=first.version,
            alias=settings.tagger_alias,
            backend=first.backend,
        ),
        results=[
            ImageTags(
                index=i,
                filename=name,
                image=ImageSize(width=out.width, height=out.height),
                tags=[
                    ImageTag(
                        name=t.name,
                        label=t.label,
                        score=t.score,
                        hashtag=t.hashtag,
                        class_index=t.class_index,
                    )
                    for t in out.tags
                ],
            )
            for i, ((name, _), out) in enumerate(zip(uploads, run.outputs, strict=True))
        ],
        options=TagSettings(top_k=options.top_k, min_score=options.min_score),
        batch_size=max(run.batch_sizes),
        timings=Timings.measure(started, prepared, run.queue_s, run.inference_s),
    )
