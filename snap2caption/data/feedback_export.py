"""Feedback -> a COCO captions dataset the ETL consumes (``snap2caption data feedback-export``).

Users send corrected captions and ratings to the gateway's ``POST /v1/feedback`` (``services/gateway/
feedback.py``), which stores them in the gateway database beside the inference log, with the analysed
image when it was retained or sent back. :func:`export_feedback` reads that database and writes
``images/<sha256>.<ext>`` + ``annotations/captions.json``, for ``snap2caption data etl --source coco``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Engine, Integer, LargeBinary, String, Text, column, select, table

from snap2caption.data.files import write_if_changed

# The two gateway tables the export reads, as lightweight clauses naming only the columns it reads:
# their schema and migrations live with the gateway (services/gateway/db.py), which the library
# cannot import.
_inference_log = table(
    "inference_log",
    column("id", String),
    column("outputs", JSON),
    column("format", String),
    column("width", Integer),
    column("height", Integer),
    column("image", LargeBinary),
)
_feedback = table(
    "feedback",
    column("id", Integer),
    column("inference_id", String),
    column("caption", Text),
    column("rating", Integer),
)

_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp", "tiff": "tiff"}
_EXPORTED_NAME = re.compile(r"^[0-9a-f]{64}\.(" + "|".join(sorted(set(_EXTENSIONS.values()))) + r")$")


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
    which keeps the caption the model answered. Only analyses whose original image is in the inference
    log (retained by the gateway, or sent with feedback) can be exported; the rest are counted in
    ``skipped``. Re-running is idempotent:
    unchanged images are not rewritten and images no longer exported are removed from ``out/images``.

    Args:
        engine: The gateway database, at the newest schema revision.
        out: Output folder.
        min_rating: Lowest rating that confirms the logged caption.

    Returns:
        The counts.
    """
    report = ExportReport()
    with engine.connect() as conn:
        rows = conn.execute(
            select(_feedback.c.inference_id, _feedback.c.caption, _feedback.c.rating).order_by(_feedback.c.id)
        ).all()
    by_analysis: dict[str, list[tuple[str | None, int | None]]] = {}
    for row in rows:
        by_analysis.setdefault(row.inference_id, []).append((row.caption, row.rating))

    # sha256 -> (format, width, height, bytes, captions in first-seen order)
    images: dict[str, tuple[str, int | None, int | None, bytes, dict[str, None]]] = {}
    for inference_id, items in by_analysis.items():
        with engine.connect() as conn:
            log = conn.execute(select(_inference_log).where(_inference_log.c.id == inference_id)).first()
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
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, sha in enumerate(sorted(images), start=1):
        fmt, width, height, data, captions = images[sha]
        file_name = f"{sha}.{_EXTENSIONS[fmt]}"
        write_if_changed(image_dir / file_name, data)
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
    write_if_changed(
        annotation_dir / "captions.json", json.dumps(document, indent=1, ensure_ascii=False).encode()
    )
    report.images = len(coco_images)
    return report
