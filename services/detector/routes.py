"""``POST /v1/detect`` (objects with boxes), ``POST /v1/tags`` (ImageNet tags) and ``POST /v1/analyze``
(either or both from one call): image bytes in.

``/v1/analyze`` decodes each image once and feeds both models from it; ``/v1/detect`` and ``/v1/tags`` are
the same code asking for one model, for callers that want only that.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from services.detector.config import Settings
from services.detector.engine import DetectOptions, DetectorEngine, ObjectsResult, TagOptions, TagsResult
from services.detector.schemas import (
    AnalyzeResponse,
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
from snap2caption.errors import BadRequest
from snap2caption.http import error_responses
from snap2caption.serving import Batched
from snap2caption.serving.inputs import IMAGE_REQUEST_BODY, Upload, read_images, request_deadline
from snap2caption.serving.schemas import ModelRef, TimeoutMs, Timings

router = APIRouter(prefix="/v1", tags=["detect"])

FEATURES = ("tags", "objects")

Conf = Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False, description="Minimum object score.")]
Iou = Annotated[
    float | None, Query(ge=0, le=1, allow_inf_nan=False, description="NMS IoU threshold (per class).")
]
MaxDet = Annotated[
    int | None, Query(ge=1, le=10_000, description="Most objects per image (up to the service's limit).")
]
TopK = Annotated[
    int | None, Query(ge=1, le=1000, description="Most tags per image (up to the service's limit).")
]
MinScore = Annotated[
    float | None,
    Query(
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Minimum tag probability; default the tagger's calibrated minimum (options.min_score).",
    ),
]
IncludeOutOfDomain = Annotated[
    bool,
    Query(
        description="Return the objects of an image outside the detector's training domain too, flagged "
        "`in_domain: false`; by default they are withheld (`objects` empty, `withheld` counts them)."
    ),
]
Features = Annotated[
    str | None,
    Query(description="Comma-separated subset of `tags,objects` to answer; default both.", examples=["tags"]),
]


def get_engine(request: Request) -> DetectorEngine:
    return request.app.state.engine


EngineDep = Annotated[DetectorEngine, Depends(get_engine)]


def parse_features(value: str | None) -> set[str]:
    """``?features=``: a non-empty subset of :data:`FEATURES` (default all).

    Raises:
        BadRequest: An unknown or empty feature list.
    """
    if value is None:
        return set(FEATURES)
    asked = {part.strip() for part in value.split(",")}
    unknown = sorted(asked - set(FEATURES))
    if unknown or not asked:
        raise BadRequest(f"features must be a comma-separated subset of {','.join(FEATURES)}, got {value!r}")
    return asked


def objects_response(
    settings: Settings,
    uploads: Sequence[Upload],
    options: DetectOptions,
    run: Batched[ObjectsResult],
    started: float,
    prepared: float,
) -> DetectResponse:
    """The ``/v1/detect`` answer for a request's images."""
    first = run.outputs[0]  # a request's images run in one batch, on one model version
    return DetectResponse(
        model=ModelRef(
            name=settings.detector_model,
            version=first.version,
            alias=settings.detector_alias,
            backend=first.runtime,
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
                in_domain=out.in_domain,
                domain_score=out.domain_score,
                withheld=out.withheld,
            )
            for i, ((name, _), out) in enumerate(zip(uploads, run.outputs, strict=True))
        ],
        options=DetectSettings(
            conf=options.conf,
            iou=options.iou,
            max_det=options.max_det,
            include_out_of_domain=options.include_out_of_domain,
        ),
        batch_size=max(run.batch_sizes),
        timings=Timings.measure(started, prepared, run.queue_s, run.inference_s),
    )


def tags_response(
    settings: Settings,
    uploads: Sequence[Upload],
    options: TagOptions,
    run: Batched[TagsResult],
    started: float,
    prepared: float,
) -> TagsResponse:
    """The ``/v1/tags`` answer for a request's images."""
    first = run.outputs[0]
    return TagsResponse(
        model=ModelRef(
            name=settings.tagger_model,
            version=first.version,
            alias=settings.tagger_alias,
            backend=first.runtime,
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


async def answer(
    request: Request,
    engine: DetectorEngine,
    started: float,
    timeout_ms: int | None,
    *,
    objects: DetectOptions | None = None,
    tags: TagOptions | None = None,
) -> AnalyzeResponse:
    """Read the request's images, decode each once, run the models asked for, answer for each.

    Args:
        request: The request (its body not read yet).
        engine: The service's engine.
        started: When the route started (``time.monotonic()``).
        timeout_ms: The request's ``?timeout_ms=``.
        objects: The detection options, to answer objects.
        tags: The tagging options, to answer tags.
    """
    settings = engine.settings
    deadline = request_deadline(started, timeout_ms, settings.request_timeout_s, settings.max_timeout_s)
    uploads = await read_images(request, settings.max_images_per_request, settings.max_image_bytes)
    items = await engine.prepare([data for _, data in uploads], objects=objects, tags=tags)
    prepared = time.monotonic()
    objects_run, tags_run = await engine.analyze(items, deadline)
    result = AnalyzeResponse()
    if tags is not None and tags_run is not None:
        result.tags = tags_response(settings, uploads, tags, tags_run, started, prepared)
    if objects is not None and objects_run is not None:
        result.objects = objects_response(settings, uploads, objects, objects_run, started, prepared)
    return result


@router.post(
    "/analyze",
    response_model=AnalyzeResponse,
    response_model_exclude_unset=True,  # a feature not asked for has no key (not a null)
    summary="Tags and objects from one call",
    responses=error_responses(400, 413, 415, 422, 503, 504),
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def analyze(
    request: Request,
    engine: EngineDep,
    features: Features = None,
    conf: Conf = None,
    iou: Iou = None,
    max_det: MaxDet = None,
    include_out_of_domain: IncludeOutOfDomain = False,
    top_k: TopK = None,
    min_score: MinScore = None,
    timeout_ms: TimeoutMs = None,
) -> AnalyzeResponse:
    """Tags and objects of up to ``max_images_per_request`` images, each image decoded once for both models.

    ``tags`` is exactly what ``/v1/tags`` answers and ``objects`` what ``/v1/detect`` answers, with the
    same options; a refused image fails the whole call with one error.
    """
    started = time.monotonic()
    asked = parse_features(features)
    # 503 before reading the body when a model asked for is not loaded
    objects = engine.detect_options(conf, iou, max_det, include_out_of_domain) if "objects" in asked else None
    tags = engine.tag_options(top_k, min_score) if "tags" in asked else None
    return await answer(request, engine, started, timeout_ms, objects=objects, tags=tags)


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
    conf: Conf = None,
    iou: Iou = None,
    max_det: MaxDet = None,
    include_out_of_domain: IncludeOutOfDomain = False,
    timeout_ms: TimeoutMs = None,
) -> DetectResponse:
    """Detect objects in up to ``max_images_per_request`` images; results come back in request order.

    Boxes are in pixels of each original image after EXIF orientation (``image`` gives its size). An image
    outside the detector's training domain gets no objects (``withheld`` counts them) unless
    ``include_out_of_domain`` is set.
    """
    started = time.monotonic()
    # 503 before reading the body when no model
    options = engine.detect_options(conf, iou, max_det, include_out_of_domain)
    result = await answer(request, engine, started, timeout_ms, objects=options)
    assert result.objects is not None
    return result.objects


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
    top_k: TopK = None,
    min_score: MinScore = None,
    timeout_ms: TimeoutMs = None,
) -> TagsResponse:
    """Tag up to ``max_images_per_request`` images with classifier classes, readable names and hashtags."""
    started = time.monotonic()
    options = engine.tag_options(top_k, min_score)  # 503 before reading the body when no model
    result = await answer(request, engine, started, timeout_ms, tags=options)
    assert result.tags is not None
    return result.tags
