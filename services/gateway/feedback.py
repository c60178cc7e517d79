"""``POST /v1/feedback``: a corrected caption and/or a rating for a logged inference.

Feedback refers to an inference by its request id; ``snap2caption data feedback-export`` later turns
accepted feedback on retained images into a COCO captions dataset the ETL consumes.
The app must hold the gateway database engine in ``app.state.db_engine``; when the gateway protects
this router with its auth dependency, the caller's key id is stored with the feedback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from services.gateway.db import feedback, inference_log
from snap2caption.api import FeedbackResponse
from snap2caption.data.captions import CaptionPolicy, normalise_caption
from snap2caption.errors import NotFound, Overloaded
from snap2caption.service import error_responses

router = APIRouter(tags=["feedback"])

MAX_CAPTION_CHARS = 300
MAX_REASON_CHARS = 500
# The inference log is written off the request path, a few milliseconds behind the answer: feedback
# sent right after an analysis waits up to this long for its record before answering 404.
LOG_LAG_S = 1.0
_POLL_S = 0.05
# Keep the user's words and case; training-time normalisation (lowercasing etc.) is the ETL's job.
_CAPTION_POLICY = CaptionPolicy(lowercase=False, strip_trailing_period=False, min_words=1, max_words=60)


class FeedbackRequest(BaseModel):
    """Feedback on one analysis: a better caption, a rating, or both."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128, description="The analysis' request id.")
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
    def _caption_or_rating(self) -> FeedbackRequest:
        if self.caption is None and self.rating is None:
            raise ValueError("give a caption, a rating, or both")
        return self


def _insert(engine: Engine, body: FeedbackRequest, key_id: str | None) -> int | None:
    """Store the feedback; ``None`` when the request id is not (yet) in the inference log."""
    with engine.begin() as conn:
        found = conn.execute(
            select(inference_log.c.request_id).where(inference_log.c.request_id == body.request_id)
        ).first()
        if found is None:
            return None
        result = conn.execute(
            feedback.insert().values(
                request_id=body.request_id,
                created_at=datetime.now(UTC),
                caption=body.caption,
                rating=body.rating,
                reason=body.reason,
                key_id=key_id,
            )
        )
        primary_key = result.inserted_primary_key
        assert primary_key is not None
        return int(primary_key[0])


@router.post(
    "/v1/feedback",
    status_code=201,
    response_model=FeedbackResponse,
    summary="Send a corrected caption or a rating for an analysis",
    responses=error_responses(400, 401, 404, 429, 503),
)
async def post_feedback(request: Request, body: FeedbackRequest) -> FeedbackResponse:
    """Store feedback on the analysis ``request_id`` names (404 when no such analysis was logged)."""
    engine: Engine = request.app.state.db_engine
    principal: Any = getattr(request.state, "principal", None)
    key_id = getattr(principal, "key_id", None)
    deadline = time.monotonic() + LOG_LAG_S
    while True:
        try:
            feedback_id = await run_in_threadpool(_insert, engine, body, key_id)
        except IntegrityError:
            feedback_id = None  # the log row vanished between the check and the insert
        except SQLAlchemyError as exc:
            raise Overloaded("feedback store unavailable; retry shortly", retry_after=1.0) from exc
        if feedback_id is not None:
            return FeedbackResponse(id=feedback_id, request_id=body.request_id)
        if time.monotonic() >= deadline:
            raise NotFound(f"no analysis with request id {body.request_id!r}")
        await asyncio.sleep(_POLL_S)


# --- export: feedback -> a COCO captions dataset the ETL consumes ------------------------------------

_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp", "tiff": "tiff"}


@dataclass
class ExportReport:
    """What :func:`export_feedback` wrote and why anything was left out.

    Attributes:
        images: Images written (one per distinct image, however many requests showed it).
        captions: Caption annotations written.
        corrected: Of those, corrected captions sent as feedback.
        confirmed: Of those, logged captions kept because of a rating >= ``min_rating``.
        skipped: Feedback left out, by reason: ``rating_below_min``, ``no_logged_caption``,
            ``image_not_retained`` (one per feedback row).
    """

    images: int = 0
    captions: int = 0
    corrected: int = 0
    confirmed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


def _logged_caption(outputs: Any) -> str | None:
    caption = outputs.get("caption") if isinstance(outputs, dict) else None
    if isinstance(caption, dict):
        caption = caption.get("text")
    return caption if isinstance(caption, str) and caption.strip() else None


def export_feedback(engine: Engine, out: Path, min_rating: int = 4) -> ExportReport:
    """Turn accepted feedback into ``out/images/<sha256>.<ext>`` + ``out/annotations/captions.json`` (COCO).

    Accepted: a corrected caption (whatever the rating), or a rating >= ``min_rating`` without one,
    which keeps the caption the model answered. Only requests whose original image was retained in
    the inference log can be exported; the rest are counted in ``skipped``. Re-running is idempotent:
    unchanged images are not rewritten and images no longer exported are removed from ``out/images``.

    Args:
        engine: The gateway database.
        out: Output folder.
        min_rating: Lowest rating that confirms the logged caption.

    Returns:
        The counts.
    """
    report = ExportReport()
    with engine.connect() as conn:
        rows = conn.execute(
            select(feedback.c.request_id, feedback.c.caption, feedback.c.rating).order_by(feedback.c.id)
        ).all()
    by_request: dict[str, list[tuple[str | None, int | None]]] = {}
    for row in rows:
        by_request.setdefault(row.request_id, []).append((row.caption, row.rating))

    # sha256 -> (format, width, height, bytes, captions in first-seen order)
    images: dict[str, tuple[str, int | None, int | None, bytes, dict[str, None]]] = {}
    for request_id, items in by_request.items():
        with engine.connect() as conn:
            log = conn.execute(select(inference_log).where(inference_log.c.request_id == request_id)).first()
        if log is None:
            continue
        logged = _logged_caption(log.outputs)
        accepted: list[tuple[str, str]] = []  # (caption, "corrected" | "confirmed")
        for caption, rating in items:
            if caption:
                accepted.append((caption, "corrected"))
            elif rating is not None and rating < min_rating:
                report.skip("rating_below_min")
            elif logged is None:
                report.skip("no_logged_caption")
            else:
                accepted.append((logged, "confirmed"))
        if not accepted:
            continue
        if log.image is None or (log.format or "") not in _EXTENSIONS:
            report.skip("image_not_retained", len(accepted))
            continue
        data = bytes(log.image)
        sha = hashlib.sha256(data).hexdigest()
        entry = images.setdefault(sha, (log.format, log.width, log.height, data, {}))
        for caption, kind in accepted:
            if caption in entry[4]:
                continue  # the same caption twice for one image teaches nothing more
            entry[4][caption] = None
            report.captions += 1
            if kind == "corrected":
                report.corrected += 1
            else:
                report.confirmed += 1

    image_dir, annotation_dir = out / "images", out / "annotations"
    image_dir.mkdir(parents=True, exist_ok=True)
    annotation_dir.mkdir(parents=True, exist_ok=True)
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, sha in enumerate(sorted(images), start=1):
        fmt, width, height, data, captions = images[sha]
        file_name = f"{sha}.{_EXTENSIONS[fmt]}"
        target = image_dir / file_name
        if not target.is_file() or target.stat().st_size != len(data):
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        image: dict[str, Any] = {"id": image_id, "file_name": file_name}
        if width and height:
            image.update(width=width, height=height)
        coco_images.append(image)
        for caption in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    keep = {img["file_name"] for img in coco_images}
    for stale in image_dir.iterdir():
        if _EXPORTED_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()
    document = {
        "info": {"description": "Snap2Caption user feedback", "min_rating": min_rating},
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
    }
    path = annotation_dir / "captions.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1, ensure_ascii=False))
    tmp.replace(path)
    report.images = len(coco_images)
    return report


_EXPORTED_NAME = re.compile(r"^[0-9a-f]{64}\.(" + "|".join(sorted(set(_EXTENSIONS.values()))) + r")$")
