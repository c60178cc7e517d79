"""``POST /v1/feedback``: a corrected caption and/or a rating for a logged inference, and maybe its image.

Feedback refers to an analysis by its ``inference_id`` (made by the gateway, so it names exactly one).
The older reference, the ``request_id``, is still accepted when it names exactly one analysis (clients
may reuse request ids): several give 409 ``ambiguous_request_id``. With API keys on, a key sees only the
analyses it made itself: any other is answered 404 ``not_found``, exactly like an id that does not
exist, so ids cannot be probed.

A JSON body carries the fields; a ``multipart/form-data`` body carries the same fields plus the image
as ``file``. The image goes through the gateway's safe decoder and caps (413, 415, 422 as for
``/v1/analyze``) and must be the very bytes that were analysed (the SHA-256 of the original bytes, which
the log keeps): otherwise 409 ``image_mismatch``. A matching image is kept with the analysis in the
inference log, where retained images live, so ``snap2caption data feedback-export``
(``snap2caption.data.feedback_export``) can turn the feedback into a COCO captions dataset even though the
gateway retains no images by default.

The app must hold the gateway database engine in ``app.state.db_engine`` and its settings in
``app.state.settings``; when the gateway protects this router with its auth dependency, the caller's key
id is stored with the feedback.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import Connection, Engine, Row, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from services.gateway.config import Settings
from services.gateway.db import feedback, inference_log
from snap2caption.api import FeedbackResponse
from snap2caption.data.captions import CaptionPolicy, normalise_caption
from snap2caption.errors import BadRequest, Conflict, NotFound, Overloaded
from snap2caption.http import error_responses
from snap2caption.http.errors import validation_message
from snap2caption.http.uploads import is_multipart
from snap2caption.imaging import DecodeLimits, decode_image

router = APIRouter(tags=["feedback"])

MAX_CAPTION_CHARS = 300
MAX_REASON_CHARS = 500
MAX_ID_CHARS = 160  # inference_log.id and .request_id
# The inference log is written off the request path, a few milliseconds behind the answer: feedback
# sent right after an analysis waits up to this long for its record before answering 404.
LOG_LAG_S = 1.0
_POLL_S = 0.05
# Keep the user's words and case; training-time normalisation (lowercasing etc.) is the ETL's job.
_CAPTION_POLICY = CaptionPolicy(lowercase=False, strip_trailing_period=False, min_words=1, max_words=60)
# A feedback image is decoded only to check it is a sound image within the caps: a small draft will do.
_CHECK_SIDE = 64


class ImageMismatch(Conflict):
    code = "image_mismatch"


class AmbiguousRequestId(Conflict):
    code = "ambiguous_request_id"


class FeedbackRequest(BaseModel):
    """Feedback on one analysis: a better caption, a rating, or both."""

    model_config = ConfigDict(extra="forbid")

    inference_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ID_CHARS,
        description="The analysis' `inference_id` (give this or `request_id`).",
    )
    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ID_CHARS,
        description="The analysis' request id, accepted only when it names one analysis (409 otherwise).",
    )
    caption: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CAPTION_CHARS,
        description="The caption the image should have had (whitespace and Unicode normalised).",
        examples=["a brown dog catching a frisbee on the beach"],
    )
    rating: int | None = Field(default=None, ge=1, le=5, description="How good the answer was, 1 (bad) to 5.")
    reason: str | None = Field(default=None, max_length=MAX_REASON_CHARS, description="Free-text comment.")

    @field_validator("caption")
    @classmethod
    def _normalise_caption(cls, value: str | None) -> str | None:
        if value is None:
            return None
        cleaned = normalise_caption(value, _CAPTION_POLICY)
        if cleaned is None:
            raise ValueError("caption must have 1 to 60 words")
        return cleaned

    @field_validator("reason")
    @classmethod
    def _strip_reason(cls, value: str | None) -> str | None:
        return (value.strip() or None) if value is not None else None

    @model_validator(mode="after")
    def _one_analysis_and_something_to_say(self) -> FeedbackRequest:
        if (self.inference_id is None) == (self.request_id is None):
            raise ValueError("name the analysis by inference_id (or request_id), one of the two")
        if self.caption is None and self.rating is None:
            raise ValueError("give a caption, a rating, or both")
        return self


_JSON_SCHEMA = FeedbackRequest.model_json_schema(ref_template="#/components/schemas/{model}")
FEEDBACK_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": _JSON_SCHEMA,
                "examples": {
                    "correction": {
                        "summary": "A better caption and a rating",
                        "value": {
                            "inference_id": "019a6a4e-3c1d-7b2e-9f40-5d8c2b7a1e63",
                            "caption": "a brown dog catching a frisbee on the beach",
                            "rating": 2,
                        },
                    }
                },
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        **_JSON_SCHEMA["properties"],
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The analysed image, byte for byte, to keep for training data.",
                        },
                    },
                }
            },
        },
    }
}


async def _read_body(request: Request, max_image_bytes: int) -> tuple[FeedbackRequest, bytes | None]:
    """The feedback and its image (multipart), or the feedback alone (any other body is read as JSON)."""
    try:
        if is_multipart(request):
            fields, image = await _read_form(request, max_image_bytes)
            return FeedbackRequest.model_validate(fields), image
        raw = await request.body()
        if not raw.strip():
            raise BadRequest("empty body: send the feedback as JSON (or multipart/form-data with the image)")
        return FeedbackRequest.model_validate_json(raw), None
    except ValidationError as exc:
        raise BadRequest(validation_message(exc)) from None


async def _read_form(request: Request, max_image_bytes: int) -> tuple[dict[str, str], bytes | None]:
    """The text fields, and the ``file`` upload read to at most ``max_image_bytes + 1`` bytes (the
    decoder then refuses an oversized one with 413 without it being read whole)."""
    fields: dict[str, str] = {}
    image: bytes | None = None
    async with request.form(max_files=1, max_fields=8) as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile) != (key == "file"):
                raise BadRequest(
                    f"form field {key!r}: the image goes in a file field 'file', the rest in text fields"
                )
            if key in fields:
                raise BadRequest(f"form field {key!r} given twice")
            if isinstance(value, UploadFile):
                image = await value.read(max_image_bytes + 1)
                if not image:
                    raise BadRequest("empty image: the upload 'file' has no bytes")
            else:
                fields[key] = value
    return fields, image


def _find_analysis(conn: Connection, body: FeedbackRequest, key_id: str | None) -> Row[Any] | None:
    """The logged analysis the feedback names, as the caller may see it; ``None`` when there is none.

    Raises:
        AmbiguousRequestId: ``request_id`` names several analyses.
    """
    query = select(
        inference_log.c.id,
        inference_log.c.request_id,
        inference_log.c.image_sha256,
        inference_log.c.image.is_not(None).label("has_image"),
    )
    if body.inference_id is not None:
        query = query.where(inference_log.c.id == body.inference_id)
    else:
        query = query.where(inference_log.c.request_id == body.request_id)
    if key_id is not None:
        # Keys on: another key's analysis is "not found" like a missing one, never "forbidden", so
        # the answer says nothing about which ids exist.
        query = query.where(inference_log.c.key_id == key_id)
    found = conn.execute(query.limit(2)).all()
    if len(found) > 1:
        raise AmbiguousRequestId(
            f"request id {body.request_id!r} names several analyses (a client reused it): "
            "send the analysis' inference_id instead"
        )
    return found[0] if found else None


def _insert(
    engine: Engine, body: FeedbackRequest, key_id: str | None, image: bytes | None, image_sha256: str | None
) -> FeedbackResponse | None:
    """Store the feedback (and the image); ``None`` when the analysis is not (yet) in the log.

    Raises:
        AmbiguousRequestId: See :func:`_find_analysis`.
        ImageMismatch: The image is not the analysed one.
    """
    with engine.begin() as conn:
        analysis = _find_analysis(conn, body, key_id)
        if analysis is None:
            return None
        if image is not None:
            if analysis.image_sha256 is None:
                raise ImageMismatch("that analysis logged no image (it failed before decoding one)")
            if analysis.image_sha256 != image_sha256:
                raise ImageMismatch(
                    "the image is not the one analysed: send the very bytes that were analysed "
                    "(their SHA-256 is compared)"
                )
            if not analysis.has_image:
                conn.execute(
                    update(inference_log).where(inference_log.c.id == analysis.id).values(image=image)
                )
        result = conn.execute(
            feedback.insert().values(
                inference_id=analysis.id,
                created_at=datetime.now(UTC),
                caption=body.caption,
                rating=body.rating,
                reason=body.reason,
                key_id=key_id,
            )
        )
        primary_key = result.inserted_primary_key
        assert primary_key is not None
        return FeedbackResponse(
            id=int(primary_key[0]),
            inference_id=analysis.id,
            request_id=analysis.request_id,
            image_stored=image is not None,
        )


@router.post(
    "/v1/feedback",
    status_code=201,
    response_model=FeedbackResponse,
    summary="Send a corrected caption or a rating for an analysis, and optionally its image",
    responses=error_responses(400, 401, 404, 409, 413, 415, 422, 429, 503),
    openapi_extra=FEEDBACK_BODY,
)
async def post_feedback(request: Request) -> FeedbackResponse:
    """Store feedback on the analysis that ``inference_id`` (or an unambiguous ``request_id``) names.

    404 when no such analysis was logged (or, with keys on, another key made it); 409 when a
    ``request_id`` names several analyses, or the image sent is not the analysed one.
    """
    engine: Engine = request.app.state.db_engine
    settings: Settings = request.app.state.settings
    principal: Any = getattr(request.state, "principal", None)
    key_id = getattr(principal, "key_id", None)
    body, image = await _read_body(request, settings.max_image_bytes)
    image_sha256: str | None = None
    if image is not None:
        limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        image_sha256 = (await run_in_threadpool(decode_image, image, limits, max_side=_CHECK_SIDE)).sha256
    deadline = time.monotonic() + LOG_LAG_S
    while True:
        try:
            stored = await run_in_threadpool(_insert, engine, body, key_id, image, image_sha256)
        except IntegrityError:
            stored = None  # the log row vanished between the check and the insert
        except SQLAlchemyError as exc:
            raise Overloaded("feedback store unavailable; retry shortly", retry_after=1.0) from exc
        if stored is not None:
            return stored
        if time.monotonic() >= deadline:
            named = (
                f"inference id {body.inference_id!r}"
                if body.inference_id
                else f"request id {body.request_id!r}"
            )
            raise NotFound(f"no analysis with {named}")
        await asyncio.sleep(_POLL_S)
