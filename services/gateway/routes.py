"""``POST /v1/analyze`` and ``POST /v1/analyze/batch``: the public API social platforms call.

Bodies, judged by ``Content-Type``:

- ``multipart/form-data``: ``file`` (``/v1/analyze``) or ``files`` (``/v1/analyze/batch``, up to 16);
- ``application/json``: ``{"url": ...}`` / ``{"urls": [...]}``, with the options in the same object;
- anything else: the raw image bytes (``/v1/analyze`` only).

Options come from the query string (``features``, ``max_tags``, ``min_confidence``, ``gender_neutral``);
in a JSON body its own fields win. Every request passes the API key check (a FastAPI dependency) and
is written to the inference log after its response is built (one record per image, or per failure),
under a key the gateway makes, answered as each result's ``inference_id``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from services.gateway.config import Settings
from services.gateway.engine import Gateway, Route, within_deadline
from services.gateway.images import NormalisedImage
from services.gateway.inference_log import InferenceRecord, new_inference_id
from services.gateway.releases import TRACK_HEADER
from services.gateway.schemas import AnalyzeBatchUrlRequest, AnalyzeOptions, AnalyzeUrlRequest
from snap2caption.api import FEATURES, AnalyzeBatchResponse, AnalyzeResult, BatchItem, ItemError
from snap2caption.errors import (
    BadRequest,
    Overloaded,
    Snap2CaptionError,
    Timeout,
    UnsupportedFormat,
    UrlFetchFailed,
)
from snap2caption.http import error_responses
from snap2caption.http.errors import validation_message
from snap2caption.http.uploads import is_multipart, read_form_files
from snap2caption.logs import request_id_var
from snap2caption.net.fetch import FetchPolicy, fetch_url
from snap2caption.serving.inputs import request_deadline, to_ms
from snap2caption.serving.schemas import TimeoutMs

logger = logging.getLogger(__name__)

_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _body_doc(
    json_model: type[BaseModel], json_example: dict[str, Any], file_field: str, raw: bool
) -> dict[str, Any]:
    """``openapi_extra`` documenting the route's three kinds of body, with examples."""
    upload: dict[str, Any] = {"type": "string", "format": "binary"}
    field_schema = upload if file_field == "file" else {"type": "array", "items": upload, "maxItems": 16}
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {file_field: field_schema}, "required": [file_field]},
        },
        "application/json": {
            "schema": json_model.model_json_schema(ref_template="#/components/schemas/{model}"),
            "examples": {"url": {"summary": "Analyse an image by URL", "value": json_example}},
        },
    }
    if raw:
        content["image/*"] = _BINARY
        content["application/octet-stream"] = _BINARY
    return {"requestBody": {"required": True, "content": content}}


ANALYZE_BODY = _body_doc(
    AnalyzeUrlRequest,
    {"url": "https://example.com/dog.jpg", "features": ["caption", "alt_text"], "gender_neutral": True},
    "file",
    raw=True,
)
BATCH_BODY = _body_doc(
    AnalyzeBatchUrlRequest,
    {"urls": ["https://example.com/a.jpg", "https://example.com/b.png"], "features": "caption,tags"},
    "files",
    raw=False,
)

router = APIRouter(prefix="/v1", tags=["analyze"])


# ------------------------------------------------------------------------------------------ dependencies


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def api_key_of(request: Request) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key``, or ``None``."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


async def authenticate(request: Request) -> Any:
    """Check the API key and the key's rate limit; the principal is also left on ``request.state``.

    Raises:
        Unauthorized: Missing, unknown or revoked key (when keys are on).
        RateLimited: Over the key's rate (429 with Retry-After).
    """
    client = request.client.host if request.client else "-"
    # On a worker thread: a key lookup and the shared rate limit are database round trips (SQLite may
    # wait for another process's write), and the event loop must not wait with them.
    principal = await run_in_threadpool(request.app.state.auth.check, api_key_of(request), client)
    request.state.principal = principal
    return principal


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
PrincipalDep = Annotated[Any, Depends(authenticate)]

FeaturesQuery = Annotated[
    str | None,
    Query(
        description="Comma-separated features: caption, alt_text, tags, objects (default all).",
        examples=["caption,alt_text"],
    ),
]
MaxTagsQuery = Annotated[int | None, Query(ge=1, le=50, description="Most tags per image.", examples=[5])]
MinConfidenceQuery = Annotated[
    float | None,
    Query(ge=0, le=1, allow_inf_nan=False, description="Minimum score of tags and objects.", examples=[0.3]),
]
GenderNeutralQuery = Annotated[
    bool | None,
    Query(description="Neutral wording (man/woman -> person, boy/girl -> child) in caption and alt text."),
]


def query_options(
    features: FeaturesQuery = None,
    max_tags: MaxTagsQuery = None,
    min_confidence: MinConfidenceQuery = None,
    gender_neutral: GenderNeutralQuery = None,
) -> AnalyzeOptions:
    """The options in the query string (how uploads carry them; a JSON body's own fields win).

    Raises:
        BadRequest: An unknown or empty feature list.
    """
    return AnalyzeOptions.model_validate(
        {
            "features": features,
            "max_tags": max_tags,
            "min_confidence": min_confidence,
            "gender_neutral": gender_neutral,
        }
    )


QueryOptionsDep = Annotated[AnalyzeOptions, Depends(query_options)]


# ------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class Source:
    """One image to analyse: uploaded bytes, or a URL to fetch."""

    data: bytes | None = None
    filename: str | None = None
    url: str | None = None


def merge_options(query: AnalyzeOptions, body: AnalyzeOptions | None) -> AnalyzeOptions:
    """The query's options with a JSON body's own (the option fields it sets) over them."""
    if body is None:
        return query
    return query.model_copy(
        update=body.model_dump(include=set(AnalyzeOptions.model_fields), exclude_unset=True)
    )


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def _json_body(request: Request, model: type[BaseModel]) -> Any:
    body = await request.body()
    if not body.strip():
        raise BadRequest("empty body: send JSON with the image URL(s)")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc)) from None


async def _form_uploads(
    request: Request, fields: tuple[str, ...], max_files: int, max_bytes: int
) -> list[Source]:
    """The uploads in the file fields ``fields`` (an empty one is refused later, as its image's error)."""
    uploads = await read_form_files(request, fields, max_files, max_bytes)
    return [Source(data=data, filename=filename) for filename, data in uploads]


# ------------------------------------------------------------------------------------------ one image


def _route(request: Request, gateway: Gateway) -> Route:
    """The request's backends: production, or a model's canary for its share of the request ids."""
    override = request.headers.get(TRACK_HEADER) if gateway.settings.track_header_enabled else None
    route = gateway.route(request_id_var.get() or "-", override.strip().lower() if override else None)
    request.state.track = route.track  # the track label of this request's HTTP metrics, errors included
    return route


async def _analyze_source(
    gateway: Gateway, source: Source, options: AnalyzeOptions, deadline: float, route: Route
) -> tuple[AnalyzeResult, NormalisedImage]:
    """Fetch (for a URL), decode, normalise and analyse one image, all before ``deadline`` (504 after)."""
    started = time.perf_counter()
    fetch_s: float | None = None
    data = source.data
    if source.url is not None:
        s = gateway.settings
        policy = FetchPolicy(
            max_bytes=s.max_image_bytes,
            connect_timeout_s=s.url_connect_timeout_s,
            read_timeout_s=s.url_read_timeout_s,
            max_redirects=s.url_max_redirects,
            allow_private_hosts=s.allow_private_urls,
        )
        async with within_deadline(deadline, "fetching the URL"):
            data = (await fetch_url(source.url, policy)).content
        fetch_s = time.perf_counter() - started
    if not data:
        if source.url is not None:
            raise UrlFetchFailed("the URL returned no bytes")
        raise BadRequest("empty image: the upload has no bytes")
    decode_started = time.perf_counter()
    try:
        async with within_deadline(deadline, "decoding the image"):
            image = await gateway.normalise(data)
    except UnsupportedFormat as exc:
        if source.url is None:
            raise
        raise UrlFetchFailed(f"the URL did not return an image: {exc.message}") from None
    decode_s = time.perf_counter() - decode_started
    result = await gateway.analyze(image, options, decode_s, fetch_s, deadline=deadline, route=route)
    result.timings.total_ms = to_ms(time.perf_counter() - started)
    result.inference_id = new_inference_id()  # the key of its inference log record
    return result, image


def _log(
    request: Request,
    options: AnalyzeOptions,
    *,
    result: AnalyzeResult | None = None,
    image: NormalisedImage | None = None,
    error: Snap2CaptionError | None = None,
    source: Source | None = None,
    record_id: str | None = None,
    route: Route | None = None,
) -> None:
    """Hand one record to the inference log; it drops (and counts) rather than slow the response."""
    writer = getattr(request.app.state, "inference_log", None)
    if writer is None:
        return
    settings: Settings = request.app.state.settings
    principal = getattr(request.state, "principal", None)
    outputs: dict[str, Any] = {}
    model_versions: dict[str, Any] = {}
    latencies: dict[str, Any] = {}
    if result is not None:
        outputs = result.model_dump(mode="json", include={"caption", "alt_text", "tags", "objects", "errors"})
        model_versions = {k: m.model_dump() for k, m in result.models.items()}
        latencies = result.timings.model_dump(exclude_none=True)
    raw_bytes = image.n_bytes if image else len(source.data or b"") if source else 0
    record = InferenceRecord(
        id=result.inference_id if result is not None and result.inference_id else new_inference_id(),
        request_id=record_id or request_id_var.get() or "-",
        created_at=datetime.now(UTC),
        key_id=getattr(principal, "key_id", None),
        image_sha256=image.sha256 if image else None,
        image_bytes=raw_bytes,
        width=image.width if image else None,
        height=image.height if image else None,
        format=image.format if image else None,
        features=sorted(options.features, key=FEATURES.index),
        outputs=outputs,
        model_versions=model_versions,
        latencies_ms=latencies,
        status=200 if error is None else error.status,
        error_code=None if error is None else error.code,
        image=image.original if image is not None and settings.retain_images else None,
        track=route.track if route is not None else "production",
    )
    writer.submit(record)


# ------------------------------------------------------------------------------------------ routes


@router.post(
    "/analyze",
    response_model=AnalyzeResult,
    summary="Analyse one image: caption, alt text, tags, objects",
    responses=error_responses(400, 401, 408, 413, 415, 422, 429, 503, 504),
    openapi_extra=ANALYZE_BODY,
)
async def analyze(
    request: Request,
    response: Response,
    gateway: GatewayDep,
    principal: PrincipalDep,
    query: QueryOptionsDep,
    timeout_ms: TimeoutMs = None,
) -> AnalyzeResult:
    """Analyse one image, uploaded (multipart ``file`` or the raw body) or by URL (JSON ``{"url"}``).

    One backend failing gives 200 with the other features and ``errors``; none answering gives 503.
    Boxes are in pixels of the original image after EXIF orientation (``image`` gives its size).
    Once the body is in, the request has ``timeout_ms`` (default the gateway's ``REQUEST_TIMEOUT_S``): a
    backend still working then is left out (``errors``: ``timeout``); nothing computed by then is 504.
    While a model's canary runs, a share of the requests goes to it; ``X-Snap2Caption-Track`` in the
    answer says which track answered (and, in the request, forces one for testing).
    """
    settings: Settings = gateway.settings
    options = query
    image: NormalisedImage | None = None
    source: Source | None = None
    route: Route | None = None
    try:
        route = _route(request, gateway)
        if _is_json(request.headers.get("content-type", "")):
            body: AnalyzeUrlRequest = await _json_body(request, AnalyzeUrlRequest)
            options = merge_options(query, body)
            source = Source(url=body.url)
        elif is_multipart(request):
            sources = await _form_uploads(request, ("file",), 1, settings.max_image_bytes)
            source = sources[0]
        else:
            data = await request.body()
            if not data:
                raise BadRequest("empty body: send the image bytes, multipart 'file', or JSON {\"url\": ...}")
            source = Source(data=data)
        deadline = request_deadline(
            time.monotonic(), timeout_ms, settings.request_timeout_s, settings.max_timeout_s
        )
        result, image = await _analyze_source(gateway, source, options, deadline, route)
    except Snap2CaptionError as exc:
        _log(request, options, image=image, error=exc, source=source, route=route)
        raise
    _log(request, options, result=result, image=image, source=source, route=route)
    response.headers[TRACK_HEADER] = route.track
    return result


@router.post(
    "/analyze/batch",
    response_model=AnalyzeBatchResponse,
    summary="Analyse up to 16 images; a result or an error per image",
    responses=error_responses(400, 401, 408, 413, 429, 503, 504),
    openapi_extra=BATCH_BODY,
)
async def analyze_batch(
    request: Request,
    response: Response,
    gateway: GatewayDep,
    principal: PrincipalDep,
    query: QueryOptionsDep,
    timeout_ms: TimeoutMs = None,
) -> AnalyzeBatchResponse:
    """Analyse up to ``max_batch_images`` images (multipart ``files``, or JSON ``{"urls": [...]}``).

    Each image gets its result or its own error (the status it would have got alone); a bad image never
    fails the others. The request itself fails only when malformed, or with 503 when every image did
    for want of capacity (504 when time ran out for any). All images share one ``timeout_ms`` budget.
    """
    started = time.perf_counter()
    settings: Settings = gateway.settings
    options = query
    cap = settings.max_batch_images
    if _is_json(request.headers.get("content-type", "")):
        body: AnalyzeBatchUrlRequest = await _json_body(request, AnalyzeBatchUrlRequest)
        options = merge_options(query, body)
        sources = [Source(url=url) for url in body.urls]
    elif is_multipart(request):
        # One file past the cap is read so that "too many" is said plainly rather than by the parser.
        sources = await _form_uploads(request, ("files", "file"), cap + 1, settings.max_image_bytes)
    else:
        raise BadRequest("send multipart/form-data with 'files' fields, or JSON {\"urls\": [...]}")
    if len(sources) > cap:
        raise BadRequest(f"at most {cap} images per batch, got {len(sources)}")
    deadline = request_deadline(
        time.monotonic(), timeout_ms, settings.request_timeout_s, settings.max_timeout_s
    )

    request_id = request_id_var.get() or "-"
    route = _route(request, gateway)  # one track for every image of the batch

    async def one(index: int, source: Source) -> BatchItem:
        # Each image has its own id (the request's, dot, position) in the result and the inference
        # log, so feedback can name the image it is about.
        item_id = f"{request_id}.{index}"
        image: NormalisedImage | None = None
        item = BatchItem(index=index, filename=source.filename, url=source.url)
        try:
            item.result, image = await _analyze_source(gateway, source, options, deadline, route)
            item.result.request_id = item_id
        except Snap2CaptionError as exc:
            item.error = ItemError(code=exc.code, message=exc.message, status=exc.status)
            _log(request, options, image=image, error=exc, source=source, record_id=item_id, route=route)
            return item
        _log(request, options, result=item.result, image=image, source=source, record_id=item_id, route=route)
        return item

    items = await asyncio.gather(*(one(i, s) for i, s in enumerate(sources)))
    failed = sum(1 for item in items if item.error is not None)
    codes = {item.error.code for item in items if item.error is not None}
    if failed == len(items) and codes <= {Overloaded.code, Timeout.code}:
        # Every image failed for want of capacity or time: so did the request, as one image alone would.
        if Timeout.code in codes:
            raise Timeout("the request's time ran out before any image was analysed")
        raise Overloaded("no image could be analysed: the backends are unavailable", settings.retry_after_s)
    response.headers[TRACK_HEADER] = route.track
    return AnalyzeBatchResponse(
        request_id=request_id,
        items=list(items),
        succeeded=len(items) - failed,
        failed=failed,
        total_ms=to_ms(time.perf_counter() - started),
    )
