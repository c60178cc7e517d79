"""How the model services take images in: upload parsing, decoding off the event loop, deadlines.

Every model service (captioner, detector) accepts the same request bodies, documented once by
:data:`IMAGE_REQUEST_BODY`:

- one image as the raw body (any content type: the format is judged from the bytes by the decoder);
- several as ``multipart/form-data`` file fields named ``file`` or ``files``, in order.

:func:`read_images` reads them (each upload to at most the per-image cap + 1 byte, so the decoder
refuses an oversized one with 413 without it being read whole); :func:`prepare_images` runs the
service's decode + preprocess function on worker threads and reports the first refused image by its
position; :func:`request_deadline` turns ``?timeout_ms=`` into the deadline the batcher enforces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from anyio import CapacityLimiter
from anyio.to_thread import run_sync
from fastapi import Request

from snap2caption.errors import BadRequest, ImageError
from snap2caption.http.uploads import Upload, is_multipart, read_form_files

T = TypeVar("T")

FILE_FIELDS = ("file", "files")

_BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "One image as the raw body (`image/*` or `application/octet-stream`), or several as "
            "`multipart/form-data` file fields named `file` or `files`. The format is judged from the "
            "bytes, never from the name or content type."
        ),
        "content": {
            "image/*": _BINARY,
            "application/octet-stream": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "file": {"type": "string", "format": "binary"},
                    },
                }
            },
        },
    }
}
"""``openapi_extra`` of a route that reads its images with :func:`read_images`."""


async def read_images(request: Request, max_images: int, max_bytes: int) -> list[Upload]:
    """The request's images as ``(filename, bytes)``: the raw body, or multipart ``file``/``files`` fields.

    Each upload is read to at most ``max_bytes + 1`` bytes, so the decoder refuses an oversized one (413)
    without it being read whole.

    Raises:
        BadRequest: An empty body, no file field, a file field that is not a file, too many images.
    """
    if not is_multipart(request):
        body = await request.body()
        if not body:
            raise BadRequest("empty body: send the image bytes, or multipart/form-data with a 'file' field")
        return [(None, body)]
    images = await read_form_files(request, FILE_FIELDS, max_images, max_bytes)
    for index, (filename, data) in enumerate(images):
        if not data:
            raise BadRequest(f"image {index} ({filename or 'unnamed'}) is empty")
    if len(images) > max_images:
        raise BadRequest(f"at most {max_images} images per request, got {len(images)}")
    return images


async def prepare_images(
    images: Sequence[bytes], prepare: Callable[[bytes], T], limiter: CapacityLimiter
) -> list[T]:
    """Run ``prepare`` (decode + preprocess) on each image on worker threads, at most ``limiter``'s
    tokens at once, and return the results in order.

    Raises:
        ImageError: The first refused image's error, its message prefixed with its position when the
            request has several (``image 2: ...``).
    """
    results = await asyncio.gather(
        *(run_sync(prepare, data, limiter=limiter) for data in images), return_exceptions=True
    )
    prepared: list[T] = []
    for index, result in enumerate(results):
        if isinstance(result, ImageError) and len(images) > 1:
            raise type(result)(f"image {index}: {result.message}") from result
        if isinstance(result, BaseException):
            raise result
        prepared.append(result)
    return prepared


def request_deadline(started: float, timeout_ms: int | None, default_s: float, max_s: float) -> float:
    """The ``time.monotonic()`` deadline of a request that started at ``started``.

    Args:
        started: When the route started (``time.monotonic()``).
        timeout_ms: The request's ``?timeout_ms=``, or ``None`` for the service default.
        default_s: The service's default budget.
        max_s: The largest budget a request may ask for (larger ones are capped, not refused).
    """
    budget = default_s if timeout_ms is None else min(timeout_ms / 1000, max_s)
    return started + budget


def to_ms(seconds: float) -> float:
    """Seconds -> milliseconds, rounded to the microsecond, for response timings."""
    return round(seconds * 1000, 3)
