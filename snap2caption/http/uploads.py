"""Reading uploaded images out of ``multipart/form-data`` bodies, the one way every service does it.

The gateway (``/v1/analyze``, ``/v1/analyze/batch``) and the model services (``snap2caption.serving``)
take uploads as file fields of a multipart body. :func:`read_form_files` reads the fields a route names,
in order, each to at most the per-image cap + 1 byte: the decoder then refuses an oversized image with
413 without it being read whole, and the body's own cap (the middleware) bounds the request.
"""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile

from snap2caption.errors import BadRequest

Upload = tuple[str | None, bytes]
"""``(filename, bytes)`` of one uploaded image; the filename is ``None`` for a raw body."""

# Text fields a form may carry beside its files (read and ignored) before the parser refuses it.
_SPARE_FIELDS = 16


def is_multipart(request: Request) -> bool:
    """Whether the request's body is ``multipart/form-data`` (judged by its ``Content-Type``)."""
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_form_files(
    request: Request, fields: tuple[str, ...], max_files: int, max_bytes: int
) -> list[Upload]:
    """The files in the multipart form fields named ``fields``, in body order; other fields are ignored.

    An empty file is returned as such (each caller says how it refuses one: a whole request, or one item
    of a batch).

    Args:
        request: A request whose body is ``multipart/form-data``.
        fields: The file fields to read, e.g. ``("file",)`` or ``("file", "files")``.
        max_files: Most files the parser accepts (starlette refuses more with 400).
        max_bytes: The per-image cap; each file is read to at most ``max_bytes + 1`` bytes.

    Returns:
        ``(filename, bytes)`` per file, at least one.

    Raises:
        BadRequest: A named field that holds text rather than a file, or no named file field at all
            (the message lists the fields that were found).
    """
    uploads: list[Upload] = []
    others: set[str] = set()
    async with request.form(max_files=max_files, max_fields=max_files + _SPARE_FIELDS) as form:
        for key, value in form.multi_items():
            if key not in fields:
                others.add(key)
                continue
            if not isinstance(value, UploadFile):
                raise BadRequest(f"form field {key!r} must be a file upload, not text")
            uploads.append((value.filename, await value.read(max_bytes + 1)))
    if not uploads:
        found = f"; found fields {sorted(others)}" if others else ""
        named = " or ".join(repr(name) for name in fields)
        wanted = "a multipart file field" if len(fields) == 1 else "multipart file fields"
        raise BadRequest(f"no image: send {wanted} named {named}{found}")
    return uploads
